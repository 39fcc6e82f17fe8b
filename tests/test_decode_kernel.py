"""Ragged decode: twin vs a cache-writing simulation; Triton kernel vs twin; the torch op.

Oracles:
* ``naive_decode``: replays the writes of positions 0..i through ``slot(p)`` into each group's
  slot array, lists the kept positions from the keep rule, and attends per (row, head) with
  an explicit gather. It never inverts the slot map, so it checks the twin's slot arithmetic.
* the twin ``ragged_decode_reference`` (float64) for the kernel and the op.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA it runs compiled on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_flex.kernels import decode
from moa_flex.kernels.triton_support import sm_count
from moa_flex.kernels.decode import (
    decode_work_list,
    ragged_decode_reference,
    ragged_decode_triton,
)
from moa_flex.kernels.quant import quantize_fp8
from decode_cases import cached_positions, layouts, naive_decode, scalars, tensors

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_OK = decode.triton is not None and (KERNEL_DEVICE != "cpu" or decode.interpreting())
needs_kernel = pytest.mark.skipif(
    not KERNEL_OK,
    reason="Triton kernel needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)


# ---------------------------------------------------------------------------------- the twin
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_twin_matches_cache_simulation(lay: dict) -> None:
    args = tensors(lay, torch.float64)
    got = ragged_decode_reference(*args, *scalars(lay))
    want = naive_decode(*args, *scalars(lay))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_twin_known_values() -> None:
    """One group, cap 5, sink 2, i = 9: slots hold positions [0, 1, 8, 9, 7]."""
    assert cached_positions(5, 2, 9) == [0, 1, 8, 9, 7]
    S, D = 5, 4
    k = torch.zeros(1, S, D, dtype=torch.float64)
    v = torch.arange(S, dtype=torch.float64).view(1, S, 1)  # value = slot index
    q = torch.zeros(1, 2, D, dtype=torch.float64)  # uniform attention over kept slots
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    caps = torch.tensor([[5]], dtype=torch.int32)
    spans = torch.tensor([[5, 3]], dtype=torch.int32)  # head 1 keeps sinks + the last position
    pos = torch.tensor([9])
    out = ragged_decode_reference(q, k, v, offsets, caps, spans, pos, 2, 0, 1.0, 0.0)
    assert out[0, 0, 0].item() == pytest.approx((0 + 1 + 2 + 3 + 4) / 5)
    assert out[0, 1, 0].item() == pytest.approx((0 + 1 + 3) / 3)  # slot 3 holds position 9
    out = ragged_decode_reference(q, k, v, offsets, caps, spans, pos, 2, 2, 1.0, 0.0)  # window 2: 8, 9
    assert out[0, 0, 0].item() == pytest.approx((2 + 3) / 2)


def test_twin_nothing_kept_is_zero() -> None:
    lay = {"B": 2, "G": 2, "hpg": 2, "sink": 0, "widths": [4, 3], "caps": [[0, 3], [4, 3]],
           "spans": [[0, 0, 3, 0], [4, 4, 3, 3]], "pos": [5, 0], "D": 8, "Dv": 8, "window": 0,
           "softcap": 0.0, "scale": 1.0, "seed": 0}
    out = ragged_decode_reference(*tensors(lay), *scalars(lay))
    assert out[0, :2].eq(0).all() and out[0, 3].eq(0).all()  # cap 0; span 0 without sink
    assert out[0, 2].ne(0).any() and out[1].ne(0).any()


# ---------------------------------------------------------------------------------- the kernel
def lay_sinks(lay: dict, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Learned sink logits [H] for a layout: around the scores' range, some far above it."""
    gen = torch.Generator().manual_seed(lay.get("seed", 0) + 7)
    return (torch.randn(lay["G"] * lay["hpg"], generator=gen) * 3).to(dtype)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_twin_with_learned_sinks_matches_cache_simulation(lay: dict) -> None:
    args = tensors(lay, torch.float64)
    sinks = lay_sinks(lay)
    got = ragged_decode_reference(*args, *scalars(lay), sinks=sinks)
    want = naive_decode(*args, *scalars(lay), sinks=sinks)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_kernel
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts(max_b=2, max_g=2, max_hpg=3, max_width=40, dims=(16, 32)), chunk=st.sampled_from([16, None]))
def test_kernel_with_learned_sinks_matches_twin(lay: dict, chunk: int | None) -> None:
    args = tensors(lay, torch.float32, KERNEL_DEVICE)
    sinks = lay_sinks(lay, torch.float32)
    out = torch.full((lay["B"], lay["G"] * lay["hpg"], lay["Dv"]), float("nan"), device=KERNEL_DEVICE)
    ragged_decode_triton(*args, *scalars(lay), out=out, chunk=chunk, block_n=16, sinks=sinks.to(KERNEL_DEVICE))
    want = ragged_decode_reference(*(a.cpu() for a in args), *scalars(lay), sinks=sinks)
    assert not out.isnan().any()
    assert (out.cpu() - want).abs().max().item() <= 1e-5


def run_kernel(lay: dict, dtype: torch.dtype, chunk: int | None, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel output (into a NaN-poisoned buffer) and the twin on the same values (float32)."""
    args = tensors(lay, dtype, KERNEL_DEVICE)
    out = torch.full((lay["B"], lay["G"] * lay["hpg"], lay["Dv"]), float("nan"), dtype=dtype, device=KERNEL_DEVICE)
    got = ragged_decode_triton(*args, *scalars(lay), out=out, chunk=chunk, block_n=block_n)
    assert got is out
    ref_args = tuple(a.cpu().float() if a.is_floating_point() else a.cpu() for a in args)
    return out.cpu(), ragged_decode_reference(*ref_args, *scalars(lay))


@needs_kernel
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    lay=layouts(max_b=2, max_g=3, max_hpg=4, max_width=48, dims=(16, 64, 128, 80)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    chunk=st.sampled_from([16, 32, None]),
    block_n=st.sampled_from([16, 32]),
)
def test_kernel_matches_twin(lay: dict, dtype: torch.dtype, chunk: int | None, block_n: int) -> None:
    if chunk is not None and chunk < block_n:
        chunk = block_n
    got, want = run_kernel(lay, dtype, chunk, block_n)
    assert not got.isnan().any(), "output not fully written"
    err = (got.float() - want).abs().max().item() if got.numel() else 0.0
    # bf16: probabilities enter the MMA in bf16 (2^-8 relative), so the bound scales with the output
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    assert err <= (1e-5 if dtype == torch.float32 else 2e-2 * scale), f"max abs error {err}"


@needs_kernel
def test_kernel_fp16_and_nothing_kept() -> None:
    """fp16; rows/heads with nothing kept (cap 0, span 0 without sink) come out as zeros."""
    lay = {"B": 2, "G": 2, "hpg": 2, "sink": 0, "widths": [40, 3], "caps": [[0, 3], [37, 3]],
           "spans": [[0, 0, 3, 0], [37, 20, 3, 3]], "pos": [50, 101], "D": 64, "Dv": 64, "window": 0,
           "softcap": 0.0, "scale": 0.125, "seed": 1}
    got, want = run_kernel(lay, torch.float16, 16, 16)
    assert got[0, :2].eq(0).all() and got[0, 3].eq(0).all()
    assert (got.float() - want).abs().max().item() <= 5e-3



@needs_kernel
@pytest.mark.parametrize("window", [0, 40])
def test_tiles_kept_whole_skip_the_mask_and_no_other(window: int) -> None:
    """The kernel skips the mask on a tile whose slots every head keeps. Tiles of 16 over a
    wrapped ring of 96 slots (the query's own ring slot is 16): the first holds the 4 sinks and
    ring slots at distances 5-16 (whole without a window; with a window of 40 the sinks, 496
    tokens back, must be masked), one holds the ring's wrap (distances up to 95, masked for the
    heads of span 30 and 60), the last runs past the cap (slots 100-111 are not the cache's).
    Chunks of 32 and 48 start work items at and between tiles."""
    lay = {"B": 2, "G": 2, "hpg": 2, "sink": 4, "widths": [100, 112], "caps": [[100, 100], [100, 112]],
           "spans": [[100, 60, 100, 30], [100, 100, 90, 112]], "pos": [500, 1000], "D": 16, "Dv": 16,
           "window": window, "softcap": 0.0, "scale": 0.25, "seed": 3}
    for chunk in (32, 48, None):
        got, want = run_kernel(lay, torch.float32, chunk, 16)
        assert not got.isnan().any()
        assert (got - want).abs().max().item() <= 1e-5, f"chunk {chunk}"

# ---------------------------------------------------------------------------------- ALiBi
def lay_alibi(lay: dict) -> torch.Tensor:
    """ALiBi slopes float32 [H] for a layout: mostly in ALiBi's range (2^-8 .. 2^-1), a few
    negative (any finite slope is allowed)."""
    gen = torch.Generator().manual_seed(lay.get("seed", 0) + 11)
    return torch.rand(lay["G"] * lay["hpg"], generator=gen) * 0.6 - 0.1


def alibi_slopes(H: int) -> torch.Tensor:
    """The ALiBi paper's slopes for H heads (a power of two): 2^(-8 (h + 1) / H)."""
    return torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.booleans())
def test_twin_with_alibi_matches_cache_simulation(lay: dict, with_sinks: bool) -> None:
    """The twin's bias uses the distance from its slot arithmetic; the oracle's, from the
    positions it replays into the slots."""
    args = tensors(lay, torch.float64)
    alibi, sinks = lay_alibi(lay), lay_sinks(lay) if with_sinks else None
    got = ragged_decode_reference(*args, *scalars(lay), sinks=sinks, alibi=alibi)
    want = naive_decode(*args, *scalars(lay), sinks=sinks, alibi=alibi)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_twin_alibi_known_values() -> None:
    """Equal scores at distances 0 and 1 weigh 1 : exp(-s); the bias comes after the soft-cap
    (before it, tanh would flatten it away); a learned sink takes no bias; slopes of zero are
    no bias, bit for bit."""
    s = 0.7
    alibi = torch.tensor([s])
    w = math.exp(-float(alibi[0]))  # the float32 slope, as the twin reads it
    i32 = {"dtype": torch.int32}
    # one group of cap 2, no sink, i = 1: slot 0 holds position 0 (distance 1), slot 1 position 1
    ints = (torch.tensor([0, 2], **i32), torch.tensor([[2]], **i32), torch.tensor([[2]], **i32), torch.tensor([1]))
    v = torch.tensor([[[10.0], [20.0]]], dtype=torch.float64)
    q, k = torch.zeros(1, 1, 4, dtype=torch.float64), torch.zeros(1, 2, 4, dtype=torch.float64)
    out = ragged_decode_reference(q, k, v, *ints, 0, 0, 1.0, 0.0, alibi=alibi)
    assert out.item() == pytest.approx((20 + 10 * w) / (1 + w), rel=1e-12)
    q[0, 0, 0], k[0, :, 0] = 10.0, 10.0  # q.k = 100 for both, capped at 0.5
    out = ragged_decode_reference(q, k, v, *ints, 0, 0, 1.0, 0.5, alibi=alibi)
    assert out.item() == pytest.approx((20 + 10 * w) / (1 + w), rel=1e-12)
    q.zero_()
    out = ragged_decode_reference(q, k, v, *ints, 0, 0, 1.0, 0.0, sinks=torch.tensor([1.5]), alibi=alibi)
    assert out.item() == pytest.approx((20 + 10 * w) / (1 + w + math.exp(1.5)), rel=1e-12)
    # the wrapped ring of test_twin_known_values: slots hold positions [0, 1, 8, 9, 7], i = 9
    v = torch.arange(5, dtype=torch.float64).view(1, 5, 1)
    ints = (torch.tensor([0, 5], **i32), torch.tensor([[5]], **i32), torch.tensor([[5]], **i32), torch.tensor([9]))
    out = ragged_decode_reference(q, torch.zeros(1, 5, 4, dtype=torch.float64), v, *ints, 2, 0, 1.0, 0.0, alibi=alibi)
    weights = [math.exp(-float(alibi[0]) * (9 - p)) for p in (0, 1, 8, 9, 7)]
    assert out.item() == pytest.approx(sum(j * x for j, x in enumerate(weights)) / sum(weights), rel=1e-12)
    lay = dict(OP_LAYOUT, softcap=5.0)
    args, zeros = tensors(lay), torch.zeros(lay["G"] * lay["hpg"])
    assert torch.equal(ragged_decode_reference(*args, *scalars(lay), alibi=zeros),
                       ragged_decode_reference(*args, *scalars(lay)))
    if KERNEL_OK:
        dev_args = tensors(lay, device=KERNEL_DEVICE)
        assert torch.equal(ragged_decode_triton(*dev_args, *scalars(lay), alibi=zeros.to(KERNEL_DEVICE)),
                           ragged_decode_triton(*dev_args, *scalars(lay)))


@needs_kernel
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts(max_b=2, max_g=2, max_hpg=4, max_width=40, dims=(16, 32), min_hpg=2),
       chunk=st.sampled_from([16, None]), with_sinks=st.booleans())
def test_kernel_with_alibi_matches_twin(lay: dict, chunk: int | None, with_sinks: bool) -> None:
    """float32, GQA (2 to 4 heads a group), output poisoned first."""
    args = tensors(lay, torch.float32, KERNEL_DEVICE)
    alibi, sinks = lay_alibi(lay), lay_sinks(lay, torch.float32) if with_sinks else None
    out = torch.full((lay["B"], lay["G"] * lay["hpg"], lay["Dv"]), float("nan"), device=KERNEL_DEVICE)
    ragged_decode_triton(*args, *scalars(lay), out=out, chunk=chunk, block_n=16, alibi=alibi.to(KERNEL_DEVICE),
                         sinks=None if sinks is None else sinks.to(KERNEL_DEVICE))
    want = ragged_decode_reference(*(a.cpu() for a in args), *scalars(lay), sinks=sinks, alibi=alibi)
    assert not out.isnan().any(), "output not fully written"
    err = (out.cpu() - want).abs().max().item() if out.numel() else 0.0
    assert err <= 1e-5, err


# two groups of 4 heads, wrapped rings (distances up to 120: biases up to 60), sinks kept
ALIBI_LAYOUT = {"B": 2, "G": 2, "hpg": 4, "sink": 2, "widths": [40, 24], "caps": [[37, 24], [40, 17]],
                "spans": [[37, 20, 5, 2, 24, 24, 10, 3], [40, 33, 8, 1, 17, 12, 17, 6]], "pos": [120, 30],
                "D": 32, "Dv": 32, "window": 0, "softcap": 0.0, "scale": 32**-0.5, "seed": 11}


@needs_kernel
@pytest.mark.parametrize("case", ["softcap", "fp8 pairs", "fp8 q"])
def test_kernel_with_alibi_softcap_and_fp8(case: str) -> None:
    """The slopes of the ALiBi paper, with a soft-cap (float32), and over an FP8 cache in both
    read modes (bf16 queries in pairs, float32 in q), against the twin on the values read;
    the bias moves the output by far more than the bound."""
    lay = dict(ALIBI_LAYOUT, softcap=5.0 if case == "softcap" else 0.0)
    q, k, v, *ints = tensors(lay)
    scales = {}
    if case.startswith("fp8"):
        (k, ks), (v, vs) = quantize_fp8(k), quantize_fp8(v)
        scales = {"k_scale": ks, "v_scale": vs}
    dtype = torch.bfloat16 if case == "fp8 pairs" else torch.float32
    q = q.to(dtype)
    alibi = alibi_slopes(lay["G"] * lay["hpg"])
    dev = KERNEL_DEVICE
    out = torch.full((lay["B"], lay["G"] * lay["hpg"], lay["Dv"]), float("nan"), dtype=dtype, device=dev)
    ragged_decode_triton(q.to(dev), k.to(dev), v.to(dev), *(t.to(dev) for t in ints), *scalars(lay), out=out, chunk=16,
                         block_n=16, alibi=alibi.to(dev), fp8_mode=case.removeprefix("fp8 ") if scales else None,
                         **{n: t.to(dev) for n, t in scales.items()})
    want = ragged_decode_reference(q.float(), k, v, *ints, *scalars(lay), alibi=alibi, **scales)
    plain = ragged_decode_reference(q.float(), k, v, *ints, *scalars(lay), **scales)
    assert not out.isnan().any(), "output not fully written"
    err = (out.cpu().float() - want).abs().max().item()
    bound = 2e-2 * max(1.0, want.abs().max().item()) if dtype == torch.bfloat16 else 1e-5
    assert err <= bound, err
    assert (want - plain).abs().max().item() > 10 * bound


@pytest.mark.parametrize("bad,text", [
    (torch.zeros(7), r"alibi must be a float32 tensor \[H\] = \[6\]"),
    (torch.zeros(1, 6), r"float32 tensor \[H\]"),
    (torch.zeros(6, dtype=torch.float64), r"float32 tensor \[H\].*float64"),
    (torch.zeros(6, dtype=torch.int32), r"float32 tensor \[H\].*int32"),
    ([0.5] * 6, r"float32 tensor \[H\]"),
    (torch.tensor([0.5, float("nan"), 0, 0, 0, 0]), "alibi slopes must be finite"),
    (torch.tensor([0.5, 0, 0, 0, 0, float("-inf")]), "alibi slopes must be finite"),
    (torch.zeros(6, device="meta"), "alibi is on meta but q is on"),
], ids=["length", "rank", "float64", "int32", "list", "nan", "inf", "device"])
def test_bad_alibi(bad: object, text: str) -> None:
    """Both the twin and the kernel's wrapper refuse bad slopes (before any launch); the values
    (finiteness) only on the CPU: reading GPU slopes would sync every decode step."""
    with pytest.raises(ValueError, match=text):
        ragged_decode_reference(*tensors(OP_LAYOUT), *scalars(OP_LAYOUT), alibi=bad)
    if KERNEL_OK and not (KERNEL_DEVICE != "cpu" and "finite" in text):
        if isinstance(bad, torch.Tensor) and bad.device.type == "cpu":
            bad = bad.to(KERNEL_DEVICE)
        with pytest.raises(ValueError, match=text):
            ragged_decode_triton(*tensors(OP_LAYOUT, device=KERNEL_DEVICE), *scalars(OP_LAYOUT), alibi=bad)


def lay_select(lay: dict, density: float = 0.5) -> torch.Tensor:
    """A random selection of slots per row (an indexer's picks), seeded by the layout."""
    S = sum(lay["widths"])
    return torch.rand(lay["B"], S, generator=torch.Generator().manual_seed(lay["seed"] + 7)) < density


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.sampled_from([0.0, 0.3, 0.7, 1.0]))
def test_twin_with_select_matches_cache_simulation(lay: dict, density: float) -> None:
    args = tensors(lay, torch.float64)
    select = lay_select(lay, density)
    got = ragged_decode_reference(*args, *scalars(lay), select=select)
    torch.testing.assert_close(got, naive_decode(*args, *scalars(lay), select=select), rtol=1e-12, atol=1e-12)


def test_a_selection_of_every_slot_changes_nothing() -> None:
    lay = ALIBI_LAYOUT
    args = tensors(lay, torch.float64)
    every = torch.ones(lay["B"], sum(lay["widths"]), dtype=torch.bool)
    assert torch.equal(ragged_decode_reference(*args, *scalars(lay), select=every),
                       ragged_decode_reference(*args, *scalars(lay)))


@needs_kernel
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts(max_b=2, max_g=2, max_hpg=4, max_width=40, dims=(16, 32)),
       chunk=st.sampled_from([16, None]), density=st.sampled_from([0.2, 0.6]))
def test_kernel_with_select_matches_twin(lay: dict, chunk: int | None, density: float) -> None:
    """float32, output poisoned first; tiles the rule keeps whole are masked by the selection too."""
    args = tensors(lay, torch.float32, KERNEL_DEVICE)
    select = lay_select(lay, density)
    out = torch.full((lay["B"], lay["G"] * lay["hpg"], lay["Dv"]), float("nan"), device=KERNEL_DEVICE)
    ragged_decode_triton(*args, *scalars(lay), out=out, chunk=chunk, block_n=16, select=select.to(KERNEL_DEVICE))
    want = ragged_decode_reference(*(a.cpu() for a in args), *scalars(lay), select=select)
    assert not out.isnan().any(), "output not fully written"
    err = (out.cpu() - want).abs().max().item() if out.numel() else 0.0
    assert err <= 1e-5, err


@needs_kernel
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts(max_b=2, max_g=2, min_hpg=2, max_hpg=5, max_width=40, dims=(16, 32)), heads=st.integers(1, 3),
       with_select=st.booleans())
def test_kernel_with_a_groups_heads_split_over_programs_matches_twin(lay: dict, heads: int, with_select: bool) -> None:
    """``heads_per_program`` below the group's heads (a latent cache's 128 heads run 16 a
    program): each program holds a block of the group's heads, the last one partly; heads of
    their own spans each, float32, output poisoned first, with and without a selection."""
    args = tensors(lay, torch.float32, KERNEL_DEVICE)
    select = lay_select(lay, 0.6) if with_select else None
    out = torch.full((lay["B"], lay["G"] * lay["hpg"], lay["Dv"]), float("nan"), device=KERNEL_DEVICE)
    ragged_decode_triton(*args, *scalars(lay), out=out, chunk=16, block_n=16, heads_per_program=heads,
                         select=None if select is None else select.to(KERNEL_DEVICE))
    want = ragged_decode_reference(*(a.cpu() for a in args), *scalars(lay), select=select)
    assert not out.isnan().any(), "output not fully written"
    err = (out.cpu() - want).abs().max().item() if out.numel() else 0.0
    assert err <= 1e-5, err


@needs_kernel
def test_wide_caches_split_a_groups_heads() -> None:
    """A latent cache's widths hold at most LATENT_HEADS heads a program, past 1024 in tiles of
    16 slots (what tests/kernel_aot.py latent compiles for sm_90); heads_per_program is checked."""
    from moa_flex.kernels.decode import LATENT_HEADS, default_tiling

    assert default_tiling(128, 128, False).heads_per_program is None
    assert default_tiling(576, 512, False).heads_per_program == LATENT_HEADS
    assert (default_tiling(1088, 1024, False).block_n, default_tiling(1088, 1024, False).heads_per_program) == (
        16, LATENT_HEADS)
    lay = WHOLE_LAYOUT
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="heads_per_program must be an integer >= 1"):
            ragged_decode_triton(*tensors(lay, torch.float32, KERNEL_DEVICE), *scalars(lay), heads_per_program=bad)


# every head keeps every slot: tiles kept whole by the rule, which the selection must still mask
WHOLE_LAYOUT = {"B": 2, "G": 1, "hpg": 2, "sink": 0, "widths": [64], "caps": [[64], [64]],
                "spans": [[64, 64], [64, 64]], "pos": [100, 63], "D": 16, "Dv": 16, "window": 0, "softcap": 0.0,
                "scale": 0.25, "seed": 3}


@needs_kernel
def test_kernel_masks_whole_tiles_by_the_selection() -> None:
    lay = WHOLE_LAYOUT
    args = tensors(lay, torch.float32, KERNEL_DEVICE)
    select = lay_select(lay, 0.5)
    out = ragged_decode_triton(*args, *scalars(lay), block_n=16, select=select.to(KERNEL_DEVICE))
    want = ragged_decode_reference(*(a.cpu() for a in args), *scalars(lay), select=select)
    assert (out.cpu() - ragged_decode_reference(*(a.cpu() for a in args), *scalars(lay))).abs().max() > 1e-3
    assert (out.cpu() - want).abs().max().item() <= 1e-5


@needs_kernel
def test_kernel_with_select_over_an_fp8_cache() -> None:
    lay = ALIBI_LAYOUT
    q, k, v, *ints = tensors(lay, torch.float32)
    (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
    select = lay_select(lay, 0.4)
    dev = KERNEL_DEVICE
    out = ragged_decode_triton(q.to(dev).bfloat16(), k8.to(dev), v8.to(dev), *(t.to(dev) for t in ints), *scalars(lay),
                               k_scale=ks.to(dev), v_scale=vs.to(dev), block_n=16, select=select.to(dev))
    want = ragged_decode_reference(q.bfloat16(), k8, v8, *ints, *scalars(lay), k_scale=ks, v_scale=vs, select=select)
    assert (out.cpu().float() - want.float()).abs().max().item() <= 2e-2


@pytest.mark.parametrize(("bad", "text"), [
    (torch.ones(2, 3, dtype=torch.bool), r"select must be a bool tensor \[B, S\]"),
    ("ones", r"select must be a bool tensor"),
])
def test_bad_select(bad: object, text: str) -> None:
    lay = OP_LAYOUT
    if isinstance(bad, str):
        bad = torch.ones(lay["B"], sum(lay["widths"]), dtype=torch.uint8)
    with pytest.raises(ValueError, match=text):
        ragged_decode_reference(*tensors(lay), *scalars(lay), select=bad)


def test_work_list_covers_each_slot_once() -> None:
    offsets = (0, 0, 5, 69, 70)
    for chunk in (1, 16, 64, 100):
        wl = decode_work_list(offsets, chunk, "cpu")
        assert decode_work_list(offsets, chunk, "cpu") is wl  # cached per allocation
        seen = []
        for g in range(len(offsets) - 1):
            lo, hi = int(wl.group_items[g]), int(wl.group_items[g + 1])
            assert hi > lo, "every group has at least one item"
            for gg, base, start, stop in wl.items[lo:hi].tolist():
                assert gg == g and base == offsets[g] and stop - start <= chunk
                seen += [base + s for s in range(start, stop)]
        assert sorted(seen) == list(range(offsets[-1])), f"chunk {chunk}"
        assert wl.n_items == len(wl.items) == int(wl.group_items[-1])


def _items_by_group(wl, offsets: tuple[int, ...]) -> list[list[tuple[int, int]]]:  # noqa: ANN001
    """(start, stop) of every item of every group, checking group ids and bases."""
    out = []
    for g in range(len(offsets) - 1):
        lo, hi = int(wl.group_items[g]), int(wl.group_items[g + 1])
        rows = wl.items[lo:hi].tolist()
        assert rows and all(gg == g and base == offsets[g] for gg, base, _, _ in rows)
        out.append([(start, stop) for _, _, start, stop in rows])
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=10), st.integers(1, 40), st.sampled_from([16, 64, 128]),
       st.sampled_from([3, 4]))
def test_auto_work_list_one_round_of_equal_items(widths: list[int], batch: int, block_n: int, per_sm: int) -> None:
    """The default work list covers every slot once; when one item per group fits in the
    resident programs (``per_sm`` an SM: 4 with bf16 tiles, 3 with FP8's), all batch x items
    programs fit, the items of a group are one multiple of block_n but the last (no larger),
    and no smaller chunk (in tiles) would fit; otherwise it is the fixed-chunk list."""
    offsets = tuple([0, *torch.tensor(widths).cumsum(0).tolist()])
    dev = torch.device("cpu")
    resident = per_sm * sm_count(dev)
    wl = decode.auto_work_list(offsets, batch, dev, block_n, per_sm)
    assert decode.auto_work_list(offsets, batch, dev, block_n, per_sm) is wl  # cached per allocation
    groups = _items_by_group(wl, offsets)
    for g, items in enumerate(groups):  # every slot of every group exactly once, in order
        slots = [s for start, stop in items for s in range(start, stop)]
        assert slots == list(range(widths[g]))
    if batch * len(widths) > resident:
        assert wl is decode.decode_work_list(offsets, decode.auto_chunk(batch, offsets, dev, block_n), dev)
        return

    def programs_at(chunk: int) -> int:  # brute force: cut every group as the rule says
        total = 0
        for w in widths:
            n = max(1, math.ceil(w / chunk))
            size = max(block_n, math.ceil(math.ceil(w / n) / block_n) * block_n)
            total += max(1, math.ceil(w / size))
        return batch * total

    assert batch * wl.n_items <= resident
    assert wl.chunk % block_n == 0 and wl.chunk >= 2 * block_n
    if wl.chunk > 2 * block_n:
        assert programs_at(wl.chunk - block_n) > resident, "a smaller chunk would fit"
    for items in groups:
        sizes = [stop - start for start, stop in items]
        assert max(sizes) <= wl.chunk
        full = sizes[:-1]  # all the same multiple of block_n; the last item no larger
        assert all(x == sizes[0] and x % block_n == 0 for x in full) and sizes[-1] <= sizes[0]
    assert wl.n_items == len(wl.items) == int(wl.group_items[-1])


def test_auto_chunk_depends_on_allocation_only() -> None:
    offs = (0, 1000, 3000, 3100)
    chunk = decode.auto_chunk(4, offs, torch.device("cpu"), 64)
    assert chunk % 64 == 0 and 64 <= chunk <= decode.MAX_CHUNK
    assert decode.auto_chunk(4, offs, torch.device("cpu"), 64) == chunk


# ---------------------------------------------------------------------------------- the op
OP_LAYOUT = {"B": 2, "G": 2, "hpg": 3, "sink": 2, "widths": [9, 14], "caps": [[9, 14], [5, 11]],
             "spans": [[9, 4, 6, 14, 14, 3], [5, 5, 2, 11, 7, 8]], "pos": [40, 6], "D": 16, "Dv": 16,
             "window": 0, "softcap": 0.0, "scale": 0.3, "seed": 3}


def test_op_cpu_under_torch_compile_matches_twin() -> None:
    lay = dict(OP_LAYOUT)
    fn = torch.compile(
        lambda q, k, v, o, c, s, p: torch.ops.moa_flex.ragged_decode(q, k, v, o, c, s, p, 2, 0, 0.3, 0.0),
        fullgraph=True,
    )
    args = tensors(lay)
    torch.testing.assert_close(fn(*args), ragged_decode_reference(*args, *scalars(lay)), rtol=0, atol=0)
    lay.update(caps=[[7, 12], [9, 3]], spans=[[3, 7, 2, 12, 1, 5], [9, 9, 9, 3, 3, 0]], pos=[7, 1000], seed=4)
    args = tensors(lay)
    with torch.compiler.set_stance("fail_on_recompile"):  # new values, same graph
        got = fn(*args)
    torch.testing.assert_close(got, ragged_decode_reference(*args, *scalars(lay)), rtol=0, atol=0)


def test_op_fake_impl_and_opcheck() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    lay = dict(OP_LAYOUT, Dv=32)
    args = tensors(lay, torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) for a in args]
        out = torch.ops.moa_flex.ragged_decode(*fake, *scalars(lay))
    assert out.shape == (2, 6, 32) and out.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.moa_flex.ragged_decode.default, (*args, *scalars(lay)))


# ---------------------------------------------------------------------------------- bad input
def _bad(args: list, what: str) -> list:
    q, k, v, offsets, caps, spans, pos = args
    return {
        "q rank": [q[:, :, None], k, v, offsets, caps, spans, pos],
        "k head dim": [q, k[..., :8], v, offsets, caps, spans, pos],
        "v slots": [q, k, v[:, :-1], offsets, caps, spans, pos],
        "k dtype": [q, k.double(), v, offsets, caps, spans, pos],
        "q dtype": [q.to(torch.int32), k, v, offsets, caps, spans, pos],
        "offsets dtype": [q, k, v, offsets.long(), caps, spans, pos],
        "caps dtype": [q, k, v, offsets, caps.float(), spans, pos],
        "pos dtype": [q, k, v, offsets, caps, spans, pos.int()],
        "caps shape": [q, k, v, offsets, caps[:, :1], spans, pos],
        "spans shape": [q, k, v, offsets, caps, spans[:, :-1], pos],
        "heads vs groups": [q[:, :-1], k, v, offsets, caps, spans[:, :-1], pos],
        "offsets values": [q, k, v, offsets.flip(0), caps, spans, pos],
        "caps values": [q, k, v, offsets, caps + 100, spans, pos],
        "spans values": [q, k, v, offsets, caps, spans + 100, pos],
    }[what]


BAD = [
    ("q rank", ValueError, "q must be"), ("k head dim", ValueError, "k.shape"), ("v slots", ValueError, "v.shape"),
    ("k dtype", TypeError, "k.dtype"), ("q dtype", TypeError, "q must be"), ("offsets dtype", TypeError, "offsets"),
    ("caps dtype", TypeError, "caps"), ("pos dtype", TypeError, "pos"), ("caps shape", ValueError, "caps"),
    ("spans shape", ValueError, "spans"), ("heads vs groups", ValueError, "divisible"),
    ("offsets values", ValueError, "offsets"), ("caps values", ValueError, "caps"), ("spans values", ValueError, "spans"),
]


@pytest.mark.parametrize("what,exc,text", BAD)
def test_bad_input_errors(what: str, exc: type, text: str) -> None:
    args = _bad(list(tensors(OP_LAYOUT)), what)
    with pytest.raises(exc, match=text):
        ragged_decode_reference(*args, *scalars(OP_LAYOUT))
    with pytest.raises(exc, match=text):
        torch.ops.moa_flex.ragged_decode(*args, *scalars(OP_LAYOUT))


def test_bad_scalars() -> None:
    args = tensors(OP_LAYOUT)
    for sink, window, scale, softcap, text in [(-1, 0, 1.0, 0.0, "sink"), (0, 2.5, 1.0, 0.0, "window"),
                                                (0, 0, float("nan"), 0.0, "scale"), (0, 0, 1.0, -1.0, "softcap")]:
        with pytest.raises(ValueError, match=text):
            ragged_decode_reference(*args, sink, window, scale, softcap)


@needs_kernel
def test_kernel_bad_offsets_and_out() -> None:
    args = list(tensors(OP_LAYOUT, device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        ragged_decode_triton(*args, *scalars(OP_LAYOUT), out=torch.empty(1, device=KERNEL_DEVICE))
    args[3] = torch.tensor([0, 9, 22], dtype=torch.int32, device=KERNEL_DEVICE)  # ends before S = 23
    with pytest.raises(ValueError, match="offsets"):
        ragged_decode_triton(*args, *scalars(OP_LAYOUT))
