"""passes/value_fusion.py: a layer's attention calls that differ only in their values become one.

The graphs come from Dynamo, as the passes see them (module paths, example values); the
fused graph must compute what the traced one did, and calls that do not share their scores
must be left alone.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from moa_flex.passes.nodes import attention_nodes
from moa_flex.passes.value_fusion import fuse_value_splits
from moa_flex.support import check_type


def _expand(x: torch.Tensor, r: int) -> torch.Tensor:
    """HF's repeat_kv: each KV head r times in place."""
    b, g, s, d = x.shape
    return x[:, :, None].expand(b, g, r, s, d).reshape(b, g * r, s, d)


class _Attn(torch.nn.Module):
    def __init__(self, body: Callable) -> None:
        super().__init__()
        self.body = body

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.body(q, k, v, mask)


class _Model(torch.nn.Module):
    """One 'decoder layer' (module path layers.0.self_attn), as node_layer maps calls."""

    def __init__(self, body: Callable) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].self_attn = _Attn(body)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layers[0].self_attn(q, k, v, mask)


def differential(q, k, v, mask):  # noqa: ANN001, ANN201 - DiffLlama's two calls on the value halves
    halves = torch.chunk(v, 2, dim=1)
    v1, v2 = (h.repeat(1, 2, 1, 1) for h in halves)
    o1 = F.scaled_dot_product_attention(q, _expand(k, 2), _expand(v1, 2), attn_mask=mask, scale=0.3)
    o2 = F.scaled_dot_product_attention(q, _expand(k, 2), _expand(v2, 2), attn_mask=mask, scale=0.3)
    return torch.cat([o1.transpose(1, 2), o2.transpose(1, 2)], dim=-1)


def other_keys(q, k, v, mask):  # noqa: ANN001, ANN201
    o1 = F.scaled_dot_product_attention(q, _expand(k, 2), _expand(v, 2), attn_mask=mask)
    o2 = F.scaled_dot_product_attention(q, _expand(k * 2, 2), _expand(v, 2), attn_mask=mask)
    return o1 + o2


def other_scale(q, k, v, mask):  # noqa: ANN001, ANN201
    o1 = F.scaled_dot_product_attention(q, _expand(k, 2), _expand(v, 2), attn_mask=mask, scale=0.3)
    o2 = F.scaled_dot_product_attention(q, _expand(k, 2), _expand(v, 2), attn_mask=mask, scale=0.5)
    return o1 + o2


def chained(q, k, v, mask):  # noqa: ANN001, ANN201 - the second call's values are the first's output
    o1 = F.scaled_dot_product_attention(q, _expand(k, 2), _expand(v, 2), attn_mask=mask)
    return F.scaled_dot_product_attention(q, _expand(k, 2), o1, attn_mask=mask)


def _traced(body: Callable) -> tuple[torch.fx.GraphModule, list[torch.Tensor], list[torch.Tensor]]:
    """The graph Dynamo traced from ``body``, the model's inputs, and the graph's (Dynamo's order)."""
    captured = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        captured.append((gm, list(example_inputs)))
        return gm

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 8, generator=gen) for h in (4, 2, 2))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    torch._dynamo.reset()
    torch.compile(_Model(body), backend=backend, fullgraph=True)(q, k, v, mask)
    ((gm, graph_inputs),) = captured
    return gm, [q, k, v, mask], graph_inputs


@pytest.mark.parametrize("body,fused", [(differential, 1), (other_keys, 0), (other_scale, 0), (chained, 0)])
def test_calls_sharing_their_scores_become_one(body: Callable, fused: int) -> None:
    """DiffLlama's pair is fused into one call over both value halves side by side (and the
    graph computes what it did); calls with other keys or another scale, or whose values are
    another call's output, are left as they were."""
    gm, inputs, graph_inputs = _traced(body)
    want = body(*inputs)
    calls = len(attention_nodes(gm.graph))
    assert fuse_value_splits(gm.graph) == fused
    gm.recompile()
    assert len(attention_nodes(gm.graph)) == calls - fused
    got = gm(*graph_inputs)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_differential_attention_passes_the_matrix() -> None:
    """DiffLlama (two calls per layer on the halves of its value heads): one call over both, a
    MoA cache of twice the value width, and dense == stock, sparse == the independent reference
    (which runs the model's own two calls), generate token-exact."""
    r = check_type("diffllama")
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")
