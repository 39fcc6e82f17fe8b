"""Masks: the analytic BlockMask against the brute-force keep rule; FlexAttention against dense."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

from moa_flex.masks import block_mask, mask_mod, reference_mask
from moa_flex.plan import ModelShape, Plan
from moa_flex.masks import BLOCK_MASK_CACHE


@st.composite
def plans(draw: st.DrawFn, max_layers: int = 2) -> Plan:
    """Random plans: shapes, granularity, sink, rules (alpha tokens, beta)."""
    kvh = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    layers = draw(st.integers(1, max_layers))
    granularity = draw(st.sampled_from(["kv_head", "head"]))
    sink = draw(st.integers(0, 96))
    min_span = draw(st.integers(sink + 1, sink + 160))
    span_multiple = draw(st.sampled_from([1, 7, 16, 64]))
    g = kvh if granularity == "kv_head" else kvh * group
    alpha = draw(st.lists(st.lists(st.integers(-600, 600).map(float), min_size=g, max_size=g), min_size=layers, max_size=layers))
    beta = draw(st.lists(st.lists(st.sampled_from([0.0, 0.1, 0.125, 0.3, 0.5, 0.77, 1.0]), min_size=g, max_size=g), min_size=layers, max_size=layers))
    return Plan(
        ModelShape(layers, kvh * group, kvh, 8, "random"), alpha, beta, granularity=granularity,
        sink=sink, span_multiple=span_multiple, min_span=min_span,
    )


def dense_blocks(count: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Ordered block lists [..., R] / [..., R, C] -> bool [..., R, n_cols] (independent expansion)."""
    out = torch.zeros((*count.shape, n_cols), dtype=torch.bool)
    for pos in _ndindex(tuple(count.shape)):
        listed = idx[pos][: int(count[pos])].tolist()
        assert listed == sorted(set(listed)), f"block list not ascending/unique at {pos}: {listed}"
        out[pos][listed] = True
    return out


def _ndindex(shape: tuple[int, ...]):
    import itertools

    return itertools.product(*(range(s) for s in shape))


def tile_counts(mask: torch.Tensor, qb: int, kb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (h, q block, kv block): number of kept positions and of real positions."""
    H, Q, K = mask.shape
    nq, nk = math.ceil(Q / qb), math.ceil(K / kb)
    padded = torch.zeros(H, nq * qb, nk * kb, dtype=torch.int32)
    real = torch.zeros_like(padded)
    padded[:, :Q, :K] = mask.int()
    real[:, :Q, :K] = 1
    fold = lambda t: t.view(H, nq, qb, nk, kb).sum(dim=(2, 4))  # noqa: E731
    return fold(padded), fold(real)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(), data=st.data())
def test_block_mask_equals_reference(plan: Plan, data: st.DataObject) -> None:
    N = data.draw(st.integers(1, 700), label="N")
    q_len = data.draw(st.integers(1, N), label="q_len")
    q_offset = data.draw(st.integers(0, N - q_len), label="q_offset")
    kv_len = data.draw(st.integers(q_offset + q_len, q_offset + q_len + 50), label="kv_len")
    qb = data.draw(st.sampled_from([1, 3, 16, 64, 100, 128, 256]), label="q_block")
    kb = data.draw(st.sampled_from([1, 5, 16, 64, 128, 200]), label="kv_block")
    layer = data.draw(st.integers(0, plan.num_layers - 1), label="layer")
    BLOCK_MASK_CACHE.clear()

    bm = block_mask(plan, layer, N, q_len, q_offset, block_size=(qb, kb), kv_len=kv_len)
    ref = reference_mask(plan, layer, N, q_len, q_offset, kv_len)
    H = plan.num_heads
    nq, nk = math.ceil(q_len / qb), math.ceil(kv_len / kb)
    assert bm.seq_lengths == (q_len, kv_len)
    assert bm.kv_indices.shape == (1, H, nq, nk) and bm.q_indices.shape == (1, H, nk, nq)

    partial = dense_blocks(bm.kv_num_blocks[0], bm.kv_indices[0], nk)
    full = dense_blocks(bm.full_kv_num_blocks[0], bm.full_kv_indices[0], nk)
    assert not (partial & full).any(), "a block is both partial and full"
    kept, real = tile_counts(ref, qb, kb)
    assert (kept[full] == real[full]).all(), "a full block holds a dropped position"
    assert (kept[~(partial | full)] == 0).all(), "a kept position falls in a skipped block"
    # Tight: every partial block really mixes kept and dropped positions.
    assert ((kept[partial] > 0) & (kept[partial] < real[partial])).all(), "a partial block is not mixed"

    # Expanded to tokens (full block, or partial block and mask_mod) equals the reference.
    h = torch.arange(H).view(-1, 1, 1)
    q = torch.arange(q_len).view(1, -1, 1)
    k = torch.arange(kv_len).view(1, 1, -1)
    mm = bm.mask_mod(torch.zeros((), dtype=torch.long), h, q, k)
    blk = lambda b: b.repeat_interleave(qb, 1)[:, :q_len].repeat_interleave(kb, 2)[:, :, :kv_len]  # noqa: E731
    assert torch.equal(blk(full) | (blk(partial) & mm), ref)

    # The q-side lists are the transpose of the kv side.
    assert torch.equal(dense_blocks(bm.q_num_blocks[0], bm.q_indices[0], nq), partial.transpose(1, 2))
    assert torch.equal(dense_blocks(bm.full_q_num_blocks[0], bm.full_q_indices[0], nq), full.transpose(1, 2))
    # Filler entries past the counts are valid block indices.
    assert int(bm.kv_indices.min()) >= 0 and int(bm.kv_indices.max()) < nk
    assert int(bm.q_indices.min()) >= 0 and int(bm.q_indices.max()) < nq


def test_mask_mod_is_the_keep_rule() -> None:
    plan = Plan.uniform(ModelShape(1, 4, 2, 8), alpha=100.0, beta=0.25, sink=8, min_span=32, span_multiple=16)
    N, q_offset = 300, 200
    mm = mask_mod(plan, 0, N, q_offset=q_offset)
    h = torch.arange(4).view(-1, 1, 1)
    got = mm(torch.zeros((), dtype=torch.long), h, torch.arange(N - q_offset).view(1, -1, 1), torch.arange(N).view(1, 1, -1))
    assert torch.equal(got, reference_mask(plan, 0, N, N - q_offset, q_offset))


# --- FlexAttention against dense attention with the reference mask ----------------------------

_flex = torch.compile(flex_attention, dynamic=False)
FLEX_CASES = [  # (H, KVH, granularity, N, q_len, q_offset): shapes shared to limit compiles
    (4, 2, "kv_head", 333, None, None),
    (4, 2, "head", 333, None, None),
    (4, 4, "head", 333, None, None),
    (4, 2, "head", 333, 77, 256),
    (4, 2, "kv_head", 333, 1, 332),
]


def _hetero_plan(H: int, KVH: int, granularity: str) -> Plan:
    g = KVH if granularity == "kv_head" else H
    alphas = [[float(a) for a in ([0, 64, -64, 200] * H)[:g]]]
    betas = [[b for b in ([0.25, 0.0, 0.5, 0.125] * H)[:g]]]
    return Plan(ModelShape(1, H, KVH, 16), alphas, betas, granularity=granularity, sink=16, min_span=48, span_multiple=16)


def dense_reference_attention(q, k, v, mask):  # noqa: ANN001, ANN201
    """Plain softmax attention in float64 with an explicit boolean mask [H, Q, K]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ v).float()


@pytest.mark.parametrize("H,KVH,granularity,N,q_len,q_offset", FLEX_CASES)
def test_flex_attention_matches_dense(H: int, KVH: int, granularity: str, N: int, q_len, q_offset) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    plan = _hetero_plan(H, KVH, granularity)
    assert len(set(plan.head_spans(N)[0].tolist())) > 1, "test needs heterogeneous spans"
    bm = block_mask(plan, 0, N, q_len, q_offset)
    ref = reference_mask(plan, 0, N, q_len, q_offset)
    Q, K = ref.shape[1:]
    q, k, v = torch.randn(2, H, Q, 16), torch.randn(2, KVH, K, 16), torch.randn(2, KVH, K, 16)
    out = _flex(q, k, v, block_mask=bm, enable_gqa=KVH != H)
    assert (out - dense_reference_attention(q, k, v, ref)).abs().max() <= 1e-5


def test_new_span_values_do_not_recompile() -> None:
    """Spans live in captured tensors: another plan with the same block shapes reuses the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    flex = torch.compile(flex_attention, backend=counter, dynamic=False)
    torch.manual_seed(0)
    N = FLEX_CASES[0][3]  # the first case's shapes: inductor's cache may serve the compile
    q, k, v = torch.randn(2, 4, N, 16), torch.randn(2, 2, N, 16), torch.randn(2, 2, N, 16)
    for alpha in (0.0, 64.0, 128.0):
        plan = Plan.uniform(ModelShape(1, 4, 2, 16), alpha=alpha, beta=0.25, sink=16, min_span=32, span_multiple=16)
        out = flex(q, k, v, block_mask=block_mask(plan, 0, N), enable_gqa=True)
        assert (out - dense_reference_attention(q, k, v, reference_mask(plan, 0, N))).abs().max() <= 1e-5
    assert counter.frame_count == 1


def test_identical_spans_share_one_mask() -> None:
    BLOCK_MASK_CACHE.clear()
    plan = Plan.uniform(ModelShape(3, 4, 2, 8), alpha=0.0, beta=0.5)
    plan2 = Plan.from_dict({**plan.to_dict(), "beta": [[0.5, 0.5], [0.25, 0.25], [0.5, 0.5]]})
    a, b, c = (block_mask(plan2, layer, 1024) for layer in range(3))
    assert a is c and a is not b
    assert block_mask(plan, 1, 1024) is a  # another plan, same spans


def test_a_broadcast_mask_is_not_served_one_rows_mask() -> None:
    """One row's spans [1, H] (a padded batch of one) and the same spans [H] broadcast over the
    batch cover the same blocks, but the first's mask_mod indexes row b: the cache once handed it
    to a later broadcast call, whose rows b >= 1 then read past it (an IndexError where
    FlexAttention evaluates the mask_mod per row, eagerly with a score_mod; past the tensor on a
    GPU)."""
    from moa_flex.masks import block_mask_from_spans

    BLOCK_MASK_CACHE.clear()
    spans = torch.tensor([40, 24, 64, 16])
    one_row = block_mask_from_spans(spans.view(1, -1), 4, 128, 0, 128, pads=torch.tensor([0]))
    broadcast = block_mask_from_spans(spans, 4, 128, 0, 128)
    assert broadcast is not one_row
    b, h, q, kv = (torch.tensor(x) for x in (1, 2, 70, 20))
    assert bool(broadcast.mask_mod(b, h, q, kv)) == bool((kv <= q) & ((kv < 4) | (q - kv < 64 - 4)))
    assert block_mask_from_spans(spans, 4, 128, 0, 128) is broadcast, "still cached"


def test_bad_windows_raise() -> None:
    plan = Plan.uniform(ModelShape(1, 2, 1, 8), alpha=0.0, beta=0.5)
    with pytest.raises(ValueError, match="q_offset"):
        block_mask(plan, 0, 100, q_len=50, q_offset=60)
    with pytest.raises(ValueError, match="kv_len"):
        block_mask(plan, 0, 100, q_len=10, q_offset=10, kv_len=15)
    with pytest.raises(ValueError, match="layer"):
        reference_mask(plan, 3, 100)
    with pytest.raises(ValueError, match="N"):
        block_mask(plan, 0, 0)


def test_large_mask_is_built_from_blocks_only() -> None:
    """128K tokens, 32 heads of distinct spans: the block lists match the closed-form counts."""
    H, N = 32, 131072
    alphas = [[float(512 * (h - 16)) for h in range(H)]]
    betas = [[(h % 9) / 8 for h in range(H)]]
    plan = Plan(ModelShape(1, H, 8, 128), alphas, betas, granularity="head")
    bm = block_mask(plan, 0, N)
    spans = plan.head_spans(N)[0]
    nk = N // 128
    for h in (0, 7, 31):  # kept blocks per q block row r: sink block + window blocks (tokens aligned)
        w = int(spans[h]) - plan.sink
        r = torch.arange(nk)
        lo = torch.div((r * 128 - (w - 1)).clamp(min=0), 128, rounding_mode="floor")
        expect = torch.where(lo <= 0, r + 1, r - lo + 2)
        total = bm.kv_num_blocks[0, h].long() + bm.full_kv_num_blocks[0, h].long()
        assert torch.equal(total, expect), h


@pytest.mark.slow
def test_mask_build_bar_128k() -> None:
    """Issue bar: H=32 distinct spans at N=131072 builds in < 1 s with < 1 GiB extra memory."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("mask_build", Path(__file__).parents[1] / "bench" / "mask_build.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plan = bench.worst_case_plan(32)
    block_mask(plan, 0, 1024)  # warm-up
    seconds, extra, _ = bench.measure(plan, 131072, "cpu", repeats=3)
    assert seconds < 1.0 and extra < 2**30, (seconds, extra)


def padded_reference(plan: Plan, layer: int, Ns: list[int], pads: list[int], q_len: int, q_offset: int, kv_len: int) -> torch.Tensor:
    """Bool [B, H, q_len, kv_len] in index space: row b's keys before pads[b] are padding and
    its logical positions are index - pads[b]; built from reference_mask row by row."""
    out = torch.zeros(len(pads), plan.num_heads, q_len, kv_len, dtype=torch.bool)
    for b, (N, p) in enumerate(zip(Ns, pads)):
        r0 = max(0, p - q_offset)  # first query row at or after the pad
        if r0 >= q_len:
            continue
        lq = q_len - r0
        out[b, :, r0:, p:] = reference_mask(plan, layer, N, lq, q_offset + r0 - p, kv_len - p)
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(max_layers=1), data=st.data())
def test_padded_batch_block_mask_equals_reference(plan: Plan, data: st.DataObject) -> None:
    from moa_flex.masks import block_mask_from_spans

    kv_len = data.draw(st.integers(2, 400), label="kv_len")
    q_len = data.draw(st.integers(1, kv_len), label="q_len")
    q_offset = kv_len - q_len
    B = data.draw(st.integers(1, 3), label="B")
    pads = data.draw(st.lists(st.integers(0, kv_len - 1), min_size=B, max_size=B), label="pads")
    extra = data.draw(st.integers(0, 60), label="planned extra tokens")
    Ns = [kv_len - p + extra for p in pads]
    qb, kb = data.draw(st.sampled_from([(16, 16), (64, 32), (128, 128), (3, 7)]), label="blocks")
    dense = data.draw(st.booleans(), label="with dense mask")
    spans = torch.stack([plan.head_spans(N)[0] for N in Ns])
    extra_mask = torch.rand(B, 1, q_len, kv_len) > 0.3 if dense else None
    BLOCK_MASK_CACHE.clear()
    bm = block_mask_from_spans(spans, plan.sink, q_len, q_offset, kv_len, (qb, kb), pads=torch.tensor(pads), dense_mask=extra_mask)
    ref = padded_reference(plan, 0, Ns, pads, q_len, q_offset, kv_len)
    H = plan.num_heads
    nq, nk = math.ceil(q_len / qb), math.ceil(kv_len / kb)
    partial = dense_blocks(bm.kv_num_blocks, bm.kv_indices, nk)
    full = dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
    if dense:
        assert not full.any(), "with a dense mask every kept block must be partial"
    for b in range(B):
        kept, real = tile_counts(ref[b], qb, kb)
        assert (kept[full[b]] == real[full[b]]).all()
        assert (kept[~(partial[b] | full[b])] == 0).all()
        assert ((kept[partial[b]] > 0) & (dense or (kept[partial[b]] < real[partial[b]]))).all()
    h = torch.arange(H).view(1, -1, 1, 1)
    q = torch.arange(q_len).view(1, 1, -1, 1)
    k = torch.arange(kv_len).view(1, 1, 1, -1)
    mm = bm.mask_mod(torch.arange(B).view(-1, 1, 1, 1), h, q, k)
    blk = lambda x: x.repeat_interleave(qb, 2)[:, :, :q_len].repeat_interleave(kb, 3)[:, :, :, :kv_len]  # noqa: E731
    want = ref & extra_mask if dense else ref
    assert torch.equal(blk(full) | (blk(partial) & mm), want)
    assert torch.equal(dense_blocks(bm.q_num_blocks, bm.q_indices, nq), partial.transpose(2, 3))
    assert torch.equal(dense_blocks(bm.full_q_num_blocks, bm.full_q_indices, nq), full.transpose(2, 3))
