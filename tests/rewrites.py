"""Watching a prefill rewrite: which nodes it removed, and that they were attention's alone
(tests/test_pass_invariants.py, test_key_bias.py)."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from moa_flex.passes import attention_pass
from moa_flex.passes.attention_pass import rewrite_attention
from moa_flex.passes.nodes import SDPA_TARGETS, keeps_effects


def _attention_only(graph: torch.fx.Graph) -> set[str]:
    """Nodes whose value reaches nothing but attention calls (their masks): what a rewrite may drop."""
    only: set[str] = set()
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output") or keeps_effects(node) or not node.users:
            continue
        if all(u.target in SDPA_TARGETS or u.name in only for u in node.users):
            only.add(node.name)
    return only


def watch_rewrites(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dict, dict, set]]:
    """From now on, each prefill rewrite appends (node targets before, after, the nodes only
    attention used) to the list returned."""
    seen: list[tuple[dict, dict, set]] = []

    def watched(gm: torch.fx.GraphModule, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        before = {n.name: n.target for n in gm.graph.nodes}
        only = _attention_only(gm.graph)
        report = rewrite_attention(gm, *args, **kwargs)
        seen.append((before, {n.name: n.target for n in gm.graph.nodes}, only))
        return report

    monkeypatch.setattr(attention_pass, "rewrite_attention", watched)
    return seen


def check_only_attention_changed(seen: list[tuple[dict, dict, set]]) -> dict:
    """One rewrite was watched (:func:`watch_rewrites`): it removed the attention calls and
    what fed only them, and every other node is still there with its target. Returns the
    targets after."""
    (before, after, only), = seen
    removed = before.keys() - after.keys()
    attention = {name for name, target in before.items() if target in SDPA_TARGETS}
    assert attention and attention <= removed
    assert removed <= attention | only, f"removed nodes that were not attention's alone: {removed - attention - only}"
    assert all(after[name] == before[name] for name in before.keys() - removed)
    return after
