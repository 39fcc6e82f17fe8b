"""Where a rewritten graph goes: inductor (with an inductor mode) or eager execution; and the
first-call check's eager run (:mod:`moa_flex.runtime.verify`)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.fx

from moa_flex.runtime.verify import CURRENT, Outcome, VerifyError

from .regional import RegionReport, compile_regions
from .saved import InductorCode


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list, inner: str, mode: str | None,
                  regional: bool = False, on_regions: Callable[[RegionReport], None] | None = None) -> Callable:
    """A rewritten graph, compiled by inductor (with an inductor ``mode``) or run eagerly.
    ``regional``: decoder layers with equal graphs share one compile
    (:mod:`moa_flex.passes.regional`); ``on_regions`` hears what it did."""
    if inner == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode else None
    if regional:
        report = RegionReport()
        on_gpu = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)
        split = compile_regions(gm, example_inputs,
                                lambda part, args: InductorCode(compile_fx(part, args, config_patches=patches)),
                                report, compile_outer=on_gpu)
        if on_regions is not None:
            on_regions(report)
        if split is not None:
            return split
    return InductorCode(compile_fx(gm, example_inputs, config_patches=patches))


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """An independent copy of a traced graph (same attributes, its own nodes), to rewrite
    differently from the original."""
    return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))


class CheckedFirstCall:
    """``compiled``, except that its first call runs ``checked`` (the graph with the
    first-call checks) eagerly instead, once; its checks raise if attention differs, and
    then every later call raises the same error. ``required`` (attention in the model's own
    code, whose masks only the check confirms): a one-element list shared by the model's
    graphs, True once any of them passed a check; until then a first call too large to check
    raises instead of returning, and the check runs again on the graph's next call.

    Written to disk (:mod:`moa_flex.passes.saved`) with its check still pending, so a process
    that reads it back checks its first call too; ``say`` and the shared ``required`` flag are
    reconnected there (:meth:`reattach`)."""

    def __init__(self, checked: torch.fx.GraphModule | None, compiled: Callable, say: Callable[[str], None] | None,
                 required: list[bool] | None) -> None:
        self.pending = [] if checked is None else [checked]  # None: checked already
        self.failed: list[BaseException] = []
        self.compiled, self.say, self.required = compiled, say, required

    def parts(self) -> list:
        return [*self.pending, self.compiled]

    def reattach(self, say: Callable[[str], None] | None, confirmed: list[bool] | None) -> None:
        self.say = say
        if self.required is not None and confirmed is not None:
            self.required = confirmed

    def map_parts(self, f: Callable[[object], object]) -> "CheckedFirstCall":
        """A copy with ``f`` applied to its graphs, check state and links kept (for writing)."""
        return CheckedFirstCall(f(self.pending[0]) if self.pending else None, f(self.compiled), self.say,
                                self.required)

    def __reduce__(self) -> tuple:
        own_code = self.required is not None
        return _checked_again, (self.pending[0] if self.pending else None, self.compiled, own_code)

    def __call__(self, *args: object) -> object:
        if self.failed:  # a graph that failed its check never runs
            raise self.failed[0]
        if not self.pending:
            return self.compiled(*args)
        graph = self.pending.pop()
        outcome = Outcome()
        CURRENT.append(outcome)
        try:
            with torch.no_grad():
                out = graph(*args)
        except VerifyError as e:
            self.failed.append(e)
            raise
        finally:
            CURRENT.pop()
        required = self.required
        too_large = sorted({layer for layer, why in outcome.skipped if "scores >" in why})
        if required is not None and outcome.checked and not too_large:
            required[0] = True  # the model's own attention matched moa-flex's on a call of this model
        if required is not None and not required[0] and too_large:
            self.pending.append(graph)
            raise ValueError(
                f"this model computes attention in its own code, which moa-flex runs only after the first-call check "
                f"has compared it with the model's (its masks are values the passes cannot see), and this call is too "
                f"large to check for layers {too_large} ({outcome.skipped[0][1]}): make the first call a short one "
                "(model.moa_flex.warmup(batch_size, max_length), or a short generate), then any length runs")
        if self.say is not None:
            _tell(self.say, outcome)
        return out


def _checked_again(checked: torch.fx.GraphModule | None, compiled: Callable, own_code: bool) -> CheckedFirstCall:
    """A written :class:`CheckedFirstCall` read back: its check pending again (the graph was
    checked in the process that wrote it, on that process's inputs; the first call here is
    checked on its own), the log and the own-code flag to be reattached."""
    return CheckedFirstCall(checked, compiled, None, [False] if own_code else None)


def _tell(say: Callable[[str], None], outcome: Outcome) -> None:
    if outcome.checked:
        worst = max(diff for _, diff in outcome.checked)
        say(f"verify: {len(outcome.checked)} layers' attention equals the model's own on this call "
            f"(max difference {worst:.2g})")
    if outcome.skipped:
        layers = sorted({layer for layer, _ in outcome.skipped})
        say(f"verify: not checked on this call for layers {layers} ({outcome.skipped[0][1]}); the check runs on the "
            "first call of each graph: warm up with a short one (model.moa_flex.warmup)")
