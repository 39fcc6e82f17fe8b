"""Query-aware sparse attention's block selection (Qwen4-Exp's indexer): the vectorized
:func:`moa_flex.runtime.block_selection.block_select` against transformers' own per-query loop
(``QSAIndexer._select_tokens``), called on the same inputs with any visible mask (a MoA rule's
kept keys among them), ties broken towards the earlier block in both."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_flex.reference import earliest_ties
from moa_flex.runtime import block_selection
from moa_flex.runtime.block_selection import block_select
from moa_flex.support import tiny_config
from tiny_models import qwen4_exp_indexed

pytestmark = pytest.mark.skipif(not qwen4_exp_indexed(), reason=f"transformers {transformers.__version__} has no "
                                "Qwen4-Exp with indexed_attention layers")


@functools.lru_cache(maxsize=None)
def _indexer(heads: int, dim: int) -> torch.nn.Module:
    """A stock Qwen4-Exp indexer with a random key norm (budget and block set per call)."""
    config = tiny_config("qwen4_exp_text")
    config.indexer_n_heads, config.indexer_head_dim = heads, dim
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    layer = config.layer_types.index("indexed_attention")
    indexer = model.model.layers[layer].self_attn.indexer
    indexer.k_layernorm.weight.data.normal_()
    return indexer


def _stock(indexer: torch.nn.Module, q: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           visible: torch.Tensor, block: int, budget: int) -> torch.Tensor:
    indexer.compress_ratio, indexer.token_budget, indexer.block_topk = block, budget, budget // block
    hidden = torch.zeros(q.shape[0], q.shape[1], 1)
    with torch.no_grad(), earliest_ties():
        return indexer._select_tokens(hidden, q, keys, cos, sin, visible.unsqueeze(1))[:, 0]


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 2), Q=st.integers(1, 7), extra=st.integers(0, 9), block=st.integers(1, 4),
       budget=st.integers(0, 12), heads=st.sampled_from([1, 3]), dim=st.sampled_from([4, 8]),
       rotary=st.sampled_from([1.0, 0.5]), seed=st.integers(0, 2**16), density=st.floats(0.2, 1.0))
def test_block_select_is_the_stock_loop(B: int, Q: int, extra: int, block: int, budget: int, heads: int, dim: int,
                                        rotary: float, seed: int, density: float) -> None:
    """Any visible mask (random, not only causal), any budget and block, partial rotary too:
    the vectorized selection is the stock loop's, key for key."""
    g = torch.Generator().manual_seed(seed)
    K = Q + extra
    q = torch.randn(B, Q, heads, dim, generator=g)
    keys = torch.randn(B, K, dim, generator=g)
    r = max(2, int(dim * rotary))
    cos, sin = torch.randn(B, K, r, generator=g), torch.randn(B, K, r, generator=g)
    visible = torch.rand(B, Q, K, generator=g) < density
    indexer = _indexer(heads, dim)
    want = _stock(indexer, q, keys, cos, sin, visible, block, budget)
    got = block_select(q, keys, cos, sin, visible, indexer.k_layernorm.weight, indexer.k_layernorm.eps, block, budget)
    assert got.dtype == torch.bool and got.shape == (B, Q, K)
    assert torch.equal(got, want)


def test_ties_go_to_the_earlier_block() -> None:
    """Queries orthogonal to every block key score every block 0 (ReLU): the earliest blocks win,
    as in the stock loop under the reference's tie rule."""
    indexer = _indexer(1, 4)
    q = torch.zeros(1, 1, 1, 4)
    keys = torch.randn(1, 12, 4, generator=torch.Generator().manual_seed(3))
    cos, sin = torch.ones(1, 12, 4), torch.zeros(1, 12, 4)
    visible = torch.ones(1, 1, 12, dtype=torch.bool)
    got = block_select(q, keys, cos, sin, visible, indexer.k_layernorm.weight, 1e-6, 3, 6)
    assert got[0, 0].tolist() == [True] * 6 + [False] * 6
    assert torch.equal(got, _stock(indexer, q, keys, cos, sin, visible, 3, 6))


def test_chunks_of_queries_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory bound (a chunk of queries at a time) does not change the selection."""
    g = torch.Generator().manual_seed(5)
    q, keys = torch.randn(2, 9, 2, 8, generator=g), torch.randn(2, 14, 8, generator=g)
    cos, sin = torch.randn(2, 14, 8, generator=g), torch.randn(2, 14, 8, generator=g)
    visible = torch.ones(2, 9, 14, dtype=torch.bool).tril(5)
    w = torch.randn(8, generator=g)
    whole = block_select(q, keys, cos, sin, visible, w, 1e-6, 2, 6)
    monkeypatch.setattr(block_selection, "CHUNK_ELEMENTS", 1)
    assert torch.equal(block_select(q, keys, cos, sin, visible, w, 1e-6, 2, 6), whole)
    assert whole.sum() < visible.sum()  # the selection cut: the comparison means something


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="block >= 1"):
        block_select(torch.zeros(1, 1, 1, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4),
                     torch.ones(1, 1, 2, dtype=torch.bool), torch.zeros(4), 1e-6, 0, 4)


@settings(max_examples=40, deadline=None)
@given(Q=st.integers(1, 5), K=st.integers(1, 14), block=st.integers(1, 3), budget=st.integers(0, 9),
       extra=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_columns_in_ring_order_change_nothing(Q: int, K: int, block: int, budget: int, extra: int, seed: int) -> None:
    """Over a MoA cache the columns are slots in ring order, then a chunk's keys: with each
    column's position given, the choice is the one over the keys in position order."""
    g = torch.Generator().manual_seed(seed)
    n = K + extra  # K slot columns, then ``extra`` chunk columns
    q, keys = torch.randn(2, Q, 2, 8, generator=g), torch.randn(2, n, 8, generator=g)
    cos, sin = torch.randn(2, n, 8, generator=g), torch.randn(2, n, 8, generator=g)
    visible = torch.rand(2, Q, n, generator=g) < 0.7
    w = torch.randn(8, generator=g)
    want = block_select(q, keys, cos, sin, visible, w, 1e-6, block, budget)
    ring = torch.cat([torch.randperm(K, generator=g), torch.arange(K, n)])  # the ring's order of the slots
    got = block_select(q, keys[:, ring], cos[:, ring], sin[:, ring], visible[..., ring], w, 1e-6, block, budget,
                       torch.arange(n).expand(2, n)[:, ring])
    assert torch.equal(got, want[..., ring])
