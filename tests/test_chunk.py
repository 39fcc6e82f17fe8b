"""Chunk attention over the ragged MoA cache (moa_flex.kernels.chunk) and the cache's chunk
write (moa_flex.runtime.slots.cache_extend_reference): a prompt prefilled chunk by chunk gives
what attention over the whole prompt gives, by a brute-force reference that never sees a cache;
the Triton kernel (Triton's interpreter on the CPU) equals the twin."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_flex.kernels.chunk import check_chunk_inputs, chunk_attention_reference, chunk_attention_triton
from moa_flex.kernels.quant import quantize_fp8
from moa_flex.kernels.triton_support import interpreting, triton
from moa_flex.runtime.slots import cache_extend_reference
from chunk_cases import chunk_oracle, layouts, random_select, real_rows, tensors, whole_prompt_attention

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(triton is None or (KERNEL_DEVICE == "cpu" and not interpreting()),
                                  reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def chunked(lay: dict, q, k, v, attend) -> torch.Tensor:  # noqa: ANN001
    """Prefill chunk by chunk: attention of each chunk over the cache, then the cache write."""
    B, T, C = lay["B"], lay["T"], lay["chunk"]
    S = int(lay["offsets"][-1])
    keys = torch.zeros(B, S, q.shape[-1], dtype=q.dtype)
    values = torch.zeros_like(keys)
    length = torch.zeros(B, dtype=torch.long)
    pads = torch.tensor(lay["pads"])
    outs = []
    scale = 1 / math.sqrt(q.shape[-1])
    for a in range(0, T, C):
        b = min(a + C, T)
        start = length - (pads - a).clamp(min=0, max=b - a)  # logical position of chunk index 0
        kn, vn = k[:, :, a:b].contiguous(), v[:, :, a:b].contiguous()
        outs.append(attend(q[:, :, a:b].contiguous(), kn, vn, keys, values, lay["offsets"], lay["caps"], lay["spans"],
                           length.clone(), start, lay["sink"], lay["window"], scale, lay["softcap"]))
        cache_extend_reference(keys, values, length, kn, vn, start, lay["caps"], lay["offsets"], lay["sink"])
    assert length.tolist() == [T - p for p in lay["pads"]]
    return torch.cat(outs, dim=2)


@HYP
@given(lay=layouts())
def test_chunked_prefill_equals_whole_prompt_attention(lay: dict) -> None:
    """The twin, chunk by chunk over the cache it writes, equals attention over the whole
    prompt: the cache's sinks and rings hold every key a later query keeps."""
    q, k, v = tensors(lay, torch.float64)
    scale = 1 / math.sqrt(lay["D"])
    want = whole_prompt_attention(q, k, v, lay["pads"], lay["spans"], lay["sink"], lay["window"], scale, lay["softcap"])
    got = chunked(lay, q, k, v, chunk_attention_reference)
    for g, w in zip(real_rows(got, lay["pads"]), real_rows(want, lay["pads"])):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    for b, p in enumerate(lay["pads"]):
        assert not got[b, :, :p].any(), "padding queries give zeros"


def layout_sinks(lay: dict) -> torch.Tensor:
    return torch.randn(lay["H"], generator=torch.Generator().manual_seed(lay["seed"] + 3), dtype=torch.float64) * 3


@HYP
@given(lay=layouts())
def test_chunked_prefill_with_learned_sinks_equals_whole_prompt_attention(lay: dict) -> None:
    q, k, v = tensors(lay, torch.float64)
    sinks = layout_sinks(lay)
    scale = 1 / math.sqrt(lay["D"])
    want = whole_prompt_attention(q, k, v, lay["pads"], lay["spans"], lay["sink"], lay["window"], scale, lay["softcap"],
                                  sinks)
    got = chunked(lay, q, k, v, functools.partial(chunk_attention_reference, sinks=sinks))
    for g, w in zip(real_rows(got, lay["pads"]), real_rows(want, lay["pads"])):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@needs_kernel
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts())
def test_kernel_with_learned_sinks_equals_twin(lay: dict) -> None:
    q, k, v = tensors(lay)
    sinks = layout_sinks(lay).float()

    def kernel(*args):  # noqa: ANN002, ANN202
        out = torch.full(args[0].shape[:3] + args[2].shape[3:], float("nan"), device=KERNEL_DEVICE)
        return chunk_attention_triton(*(a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args),
                                      out=out, block_q=16, block_n=16, sinks=sinks.to(KERNEL_DEVICE)).cpu()

    got = chunked(dict(lay), q, k, v, kernel)
    want = chunked(dict(lay), q, k, v, functools.partial(chunk_attention_reference, sinks=sinks))
    for g, w in zip(real_rows(got, lay["pads"]), real_rows(want, lay["pads"])):
        assert (g - w).abs().max().item() <= 1e-5


@needs_kernel  # 15 layouts (about 0.5 s each in the interpreter): the FP8, sink and ALiBi tests below draw more
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts(), block_q=st.sampled_from([16, 32, 128]), block_n=st.sampled_from([16, 64]))
def test_kernel_equals_twin_at_every_chunk(lay: dict, block_q: int, block_n: int) -> None:
    """The Triton kernel in the chunked schedule, output poisoned first, against the twin."""
    q, k, v = tensors(lay)

    def kernel(*args):  # noqa: ANN002, ANN202
        qq = args[0]
        out = torch.full(qq.shape[:3] + args[2].shape[3:], float("nan"), dtype=qq.dtype, device=KERNEL_DEVICE)
        return chunk_attention_triton(*(a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args),
                                      out=out, block_q=block_q, block_n=block_n).cpu()

    def twin(*args):  # noqa: ANN002, ANN202
        return chunk_attention_reference(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))

    lay_cpu = dict(lay)
    got = chunked(lay_cpu, q.cpu(), k.cpu(), v.cpu(), kernel)
    want = chunked(lay_cpu, q.cpu(), k.cpu(), v.cpu(), twin)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_extend_writes_only_the_newest_and_keeps_the_rest() -> None:
    """A known case: one group, cap 6 with sink 2 (ring 4), positions 0..8 written in chunks of
    3 and 6: slots hold 0, 1 (sink) and 5..8 on the ring (slot 2 + (p - 2) mod 4)."""
    caps = torch.tensor([[6]], dtype=torch.int32)
    offsets = torch.tensor([0, 6], dtype=torch.int32)
    keys = torch.zeros(1, 6, 1)
    values = torch.zeros(1, 6, 1)
    length = torch.zeros(1, dtype=torch.long)
    tokens = torch.arange(9.0).view(1, 1, 9, 1)  # key value = its position
    for a, b in ((0, 3), (3, 9)):
        cache_extend_reference(keys, values, length, tokens[:, :, a:b], tokens[:, :, a:b], length.clone(), caps, offsets, 2)
    assert keys.flatten().tolist() == [0, 1, 6, 7, 8, 5] and length.tolist() == [9]


def small_chunk_args() -> list:
    """A valid small chunk call (1 row, 4 heads in 2 groups of 5 slots, a 5-token chunk) for the input checks."""
    q = torch.randn(1, 4, 5, 8)
    kn = torch.randn(1, 2, 5, 8)
    cache = torch.zeros(1, 10, 8)
    offsets = torch.tensor([0, 5, 10], dtype=torch.int32)
    caps = torch.full((1, 2), 5, dtype=torch.int32)
    spans = torch.full((1, 4), 5, dtype=torch.int32)
    n = torch.zeros(1, dtype=torch.long)
    return [q, kn, kn, cache, cache, offsets, caps, spans, n, n.clone(), 2, 0, 0.3, 0.0]


def test_bad_inputs_are_named() -> None:
    args = small_chunk_args()
    spans, n = args[7], args[8]
    chunk_attention_reference(*args)
    for index, bad, match in ((1, torch.randn(1, 3, 5, 8), "k_new"), (7, spans[:, :3], "spans"),
                              (8, n.int(), "length"), (5, torch.tensor([0, 3, 6, 10], dtype=torch.int32), "divisible")):
        broken = list(args)
        broken[index] = bad
        with pytest.raises((ValueError, TypeError), match=match):
            chunk_attention_reference(*broken)


@needs_kernel
@pytest.mark.parametrize("full_tiles", [True, False])
@pytest.mark.parametrize("granularity_spans", [[200, 200], [200, 40]])
def test_kernel_full_tiles_equal_twin(granularity_spans: list[int], full_tiles: bool) -> None:
    """Wide spans over a long filled ring and a chunk of 4 query blocks: most tiles are full
    (kept by every query of the block) and run without masks; the result equals the twin."""
    G, hpg, D, sink, C = 1, 2, 16, 4, 64
    caps = torch.tensor([[200]], dtype=torch.int32)
    offsets = torch.tensor([0, 200], dtype=torch.int32)
    spans = torch.tensor([granularity_spans], dtype=torch.int32)
    length = torch.tensor([170])  # ring of 196 holds positions 4..169, sink 0..3
    start = length.clone()
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, G * hpg, C, D, generator=gen)
    k_new, v_new = torch.randn(1, G, C, D, generator=gen), torch.randn(1, G, C, D, generator=gen)
    keys, values = torch.randn(1, 200, D, generator=gen), torch.randn(1, 200, D, generator=gen)
    args = (q, k_new, v_new, keys, values, offsets, caps, spans, length, start, sink, 0, 0.25, 0.0)
    want = chunk_attention_reference(*args)
    dev = [a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    got = chunk_attention_triton(*dev, block_q=16, block_n=16, full_tiles=full_tiles).cpu()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------- ALiBi
def layout_alibi(lay: dict) -> torch.Tensor:
    """float32 [H] slopes: ALiBi's geometric ones (2^(-8 (h+1) / H)) scaled at random, one
    negative now and then (the spec allows any finite slope)."""
    H = lay["H"]
    gen = torch.Generator().manual_seed(lay["seed"] + 5)
    geometric = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float64) / H)
    return (geometric * (torch.rand(H, generator=gen, dtype=torch.float64) * 2.5 - 0.5)).float()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts(), with_sinks=st.booleans())
def test_chunked_prefill_with_alibi_equals_whole_prompt_attention(lay: dict, with_sinks: bool) -> None:
    """The twin with ALiBi, chunk by chunk over the cache it writes, equals the brute force over
    the whole prompt: the bias follows each key's logical position, cached or in the chunk."""
    q, k, v = tensors(lay, torch.float64)
    alibi = layout_alibi(lay)
    sinks = layout_sinks(lay) if with_sinks else None
    scale = 1 / math.sqrt(lay["D"])
    want = whole_prompt_attention(q, k, v, lay["pads"], lay["spans"], lay["sink"], lay["window"], scale, lay["softcap"],
                                  sinks, alibi)
    got = chunked(lay, q, k, v, functools.partial(chunk_attention_reference, sinks=sinks, alibi=alibi))
    for g, w in zip(real_rows(got, lay["pads"]), real_rows(want, lay["pads"])):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    for b, p in enumerate(lay["pads"]):
        assert not got[b, :, :p].any(), "padding queries give zeros"


@needs_kernel
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts().filter(lambda lay: lay["H"] > lay["G"]), block_q=st.sampled_from([16, 32]),
       with_sinks=st.booleans())
def test_kernel_with_alibi_equals_twin_at_every_chunk(lay: dict, block_q: int, with_sinks: bool) -> None:
    """The kernel with ALiBi (GQA: several heads per group, each its own slope) in the chunked
    schedule, output poisoned first, against the twin."""
    q, k, v = tensors(lay)
    alibi = layout_alibi(lay)
    sinks = layout_sinks(lay).float() if with_sinks else None

    def kernel(*args):  # noqa: ANN002, ANN202
        out = torch.full(args[0].shape[:3] + args[2].shape[3:], float("nan"), device=KERNEL_DEVICE)
        return chunk_attention_triton(*(a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args),
                                      out=out, block_q=block_q, block_n=16, alibi=alibi.to(KERNEL_DEVICE),
                                      sinks=None if sinks is None else sinks.to(KERNEL_DEVICE)).cpu()

    got = chunked(dict(lay), q, k, v, kernel)
    want = chunked(dict(lay), q, k, v, functools.partial(chunk_attention_reference, sinks=sinks, alibi=alibi))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def full_tile_case(spans: list[int], fp8: bool) -> tuple[tuple, dict]:
    """test_kernel_full_tiles_equal_twin's layout with two groups of two heads (args, FP8
    scales): a long filled ring, a chunk of 4 query blocks of 16; FP8 cache and chunk if
    ``fp8`` (quantize_fp8, as the cache's writes store them)."""
    G, hpg, D, C = 2, 2, 16, 64
    caps = torch.tensor([[200, 200]], dtype=torch.int32)
    offsets = torch.tensor([0, 200, 400], dtype=torch.int32)
    length = torch.tensor([170])  # ring of 196 holds positions 4..169, sink 0..3
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, G * hpg, C, D, generator=gen)
    k_new, v_new = torch.randn(1, G, C, D, generator=gen), torch.randn(1, G, C, D, generator=gen)
    keys, values = torch.randn(1, 400, D, generator=gen), torch.randn(1, 400, D, generator=gen)
    scales = {}
    if fp8:
        (keys, ks), (values, vs) = quantize_fp8(keys), quantize_fp8(values)
        (k_new, kns), (v_new, vns) = quantize_fp8(k_new), quantize_fp8(v_new)
        scales = {"k_scale": ks, "v_scale": vs, "kn_scale": kns, "vn_scale": vns}
    args = (q, k_new, v_new, keys, values, offsets, caps, torch.tensor([spans], dtype=torch.int32), length,
            length.clone(), 4)
    return args, scales


@needs_kernel
@pytest.mark.parametrize(("spans", "softcap", "fp8"), [([200, 200, 200, 200], 0.0, False),
                                                       ([200, 40, 120, 200], 1.5, False),
                                                       ([200, 200, 60, 200], 0.0, True)])
def test_kernel_full_tiles_with_alibi_equal_twin(spans: list[int], softcap: float, fp8: bool) -> None:
    """Full tiles (no masks) get the bias too: wide spans over a long ring, slopes small enough
    that far keys still count, output poisoned first, against the twin; FP8 cache and chunk in
    one case."""
    args, scales = full_tile_case(spans, fp8)
    alibi = torch.tensor([0.0625, -0.002, 0.25, 0.004])
    want = chunk_attention_reference(*args, 0, 0.25, softcap, alibi=alibi, **scales)
    dev = [a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    dev_scales = {name: t.to(KERNEL_DEVICE) for name, t in scales.items()}
    out = torch.full(want.shape, float("nan"), device=KERNEL_DEVICE)
    got = chunk_attention_triton(*dev, 0, 0.25, softcap, out=out, block_q=16, block_n=16,
                                 alibi=alibi.to(KERNEL_DEVICE), **dev_scales).cpu()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    plain = chunk_attention_reference(*args, 0, 0.25, softcap, **scales)
    assert (plain - want).abs().max() > 0.1, "the bias changes the result"


def test_bad_alibi_is_refused() -> None:
    """alibi must be None or float32 [H] of finite slopes on q's device: ValueError otherwise,
    from the twin and from the kernel's wrapper (before any launch)."""
    args = small_chunk_args()
    chunk_attention_reference(*args, alibi=torch.full((4,), 0.5))
    fns = [chunk_attention_reference] + ([chunk_attention_triton] if triton is not None else [])
    for bad, match in ((torch.full((3,), 0.5), "alibi must be a float32"), (torch.full((4,), 0.5).double(), "float32"),
                       (torch.full((1, 4), 0.5), r"\[H\]"), ([0.5] * 4, "alibi must be"),
                       (torch.tensor([0.5, float("nan"), 0.1, 0.2]), "finite"),
                       (torch.tensor([0.5, 0.1, float("inf"), 0.2]), "finite"),
                       (torch.full((4,), 0.5, device="meta"), "alibi is on meta")):
        for fn in fns:
            with pytest.raises(ValueError, match=match):
                fn(*args, alibi=bad)


# ---------------------------------------------------------------------------------- an indexer's selection
def selecting(attend, density: float, seed: int, **extra):  # noqa: ANN001, ANN201
    """``attend`` with a fresh random selection per chunk call (:func:`random_select`, drawn in
    call order from ``seed``: two schedules over the same layout draw the same selections)."""
    gen = torch.Generator().manual_seed(seed)

    def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        B, _, C, _ = args[0].shape
        return attend(*args, select=random_select(B, C, args[3].shape[1], gen, density), **extra, **kwargs)
    return call


def kernel_on_device(*args, select: torch.Tensor, block_q: int = 16, block_n: int = 16,  # noqa: ANN002, ANN003
                     **kwargs) -> torch.Tensor:
    """The kernel on KERNEL_DEVICE with its output poisoned first (NaN), back on the CPU."""
    dev = [a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    out = torch.full(args[0].shape[:3] + args[2].shape[3:], float("nan"), dtype=args[0].dtype, device=KERNEL_DEVICE)
    kw = {k: t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for k, t in kwargs.items()}
    return chunk_attention_triton(*dev, out=out, block_q=block_q, block_n=block_n, select=select.to(KERNEL_DEVICE), **kw).cpu()


DENSITIES = st.sampled_from([1.0, 0.7, 0.3])  # 1: select all; below, some queries keep no key at all


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts(), density=DENSITIES, with_sinks=st.booleans(), with_alibi=st.booleans())
def test_twin_with_select_equals_brute_force(lay: dict, density: float, with_sinks: bool, with_alibi: bool) -> None:
    """The twin with a selection, at every chunk of the chunked schedule (wrapped rings, padding),
    equals a brute force built from the definition one (row, head, query) at a time: slot
    positions written one by one, the keep rule and the selection, float64 softmax."""
    q, k, v = tensors(lay, torch.float64)
    extra = {"sinks": layout_sinks(lay) if with_sinks else None, "alibi": layout_alibi(lay) if with_alibi else None}

    def checked(*args, select: torch.Tensor) -> torch.Tensor:  # noqa: ANN002
        got = chunk_attention_reference(*args, select=select, **extra)
        torch.testing.assert_close(got, chunk_oracle(*args, select=select, **extra), rtol=1e-9, atol=1e-9)
        return got

    chunked(lay, q, k, v, selecting(checked, density, lay["seed"]))


@pytest.mark.slow  # 4.5 s (make test-slow); the default run compares the kernel's selection on full tiles, FP8 included
@needs_kernel  # about 0.8 s a layout in the interpreter (two selections per chunk schedule)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=layouts(), density=DENSITIES, block_q=st.sampled_from([16, 32]), with_sinks=st.booleans(),
       with_alibi=st.booleans())
def test_kernel_with_select_equals_twin_at_every_chunk(lay: dict, density: float, block_q: int, with_sinks: bool,
                                                       with_alibi: bool) -> None:
    """The kernel with a selection in the chunked schedule, output poisoned first, against the
    twin: queries whose keys the selection drops all give zeros in both."""
    q, k, v = tensors(lay)
    extra = {"sinks": layout_sinks(lay).float() if with_sinks else None,
             "alibi": layout_alibi(lay) if with_alibi else None}
    got = chunked(dict(lay), q, k, v, selecting(kernel_on_device, density, lay["seed"], block_q=block_q, **extra))
    want = chunked(dict(lay), q, k, v, selecting(chunk_attention_reference, density, lay["seed"], **extra))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@needs_kernel
@pytest.mark.parametrize(("spans", "fp8", "extras"), [([200, 200, 200, 200], False, False),
                                                      ([200, 40, 120, 200], True, True)])
def test_kernel_with_select_on_full_tiles_equals_twin(spans: list[int], fp8: bool, extras: bool) -> None:
    """Tiles the rule keeps whole still apply the selection: wide spans over a long ring (most
    tiles full), a random selection with a third of the queries left no key, output poisoned
    first, against the twin; FP8 cache and chunk with learned sinks, ALiBi and a soft-cap in
    one case."""
    args, scales = full_tile_case(spans, fp8)
    B, _, C, _ = args[0].shape
    S = args[3].shape[1]
    select = random_select(B, C, S, torch.Generator().manual_seed(5), 0.5)
    select[:, ::3] = False
    extra = {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0]), "alibi": torch.tensor([0.0625, -0.002, 0.25, 0.004])} \
        if extras else {}
    call = (*args, 0, 0.25, 1.5 if extras else 0.0)
    want = chunk_attention_reference(*call, select=select, **scales, **extra)
    got = kernel_on_device(*call, select=select, block_q=32, block_n=32, **scales, **extra)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert not got[:, :, ::3].any(), "queries with no selected key give zeros"
    assert (want - chunk_attention_reference(*call, **scales, **extra)).abs().max() > 0.1, "the selection matters"


@needs_kernel
def test_select_all_true_equals_no_select_exactly() -> None:
    """A selection of every key (here a stride-0 expanded tensor) changes nothing, bit for bit,
    in the kernel (full and masked tiles) and in the twin."""
    args, _ = full_tile_case([200, 40, 120, 200], False)
    call = (*args, 0, 0.25, 0.0)
    B, _, C, _ = args[0].shape
    every = torch.ones(1, 1, 1, dtype=torch.bool).expand(B, C, args[3].shape[1] + C)
    assert torch.equal(chunk_attention_reference(*call, select=every), chunk_attention_reference(*call))
    dev = [a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in call]
    plain = chunk_attention_triton(*dev, block_q=32, block_n=32)
    assert torch.equal(chunk_attention_triton(*dev, block_q=32, block_n=32, select=every.to(KERNEL_DEVICE)), plain)


def test_bad_select_is_refused() -> None:
    """select must be None or bool [B, C, S + C] on q's device: ValueError naming the shape, from
    the twin and the kernel's wrapper (before any launch); the check reads no tensor value."""
    args = small_chunk_args()  # B = 1, C = 5, S = 10
    ok = torch.ones(1, 5, 15, dtype=torch.bool)
    chunk_attention_reference(*args, select=ok)
    fns = [chunk_attention_reference] + ([chunk_attention_triton] if triton is not None else [])
    for bad, match in ((ok.to(torch.uint8), r"select must be a bool tensor \[B, C, S \+ C\] = \[1, 5, 15\]"),
                       (ok[:, :, :10], r"\[1, 5, 15\].*got torch.bool \(1, 5, 10\)"), (ok[0], r"\[1, 5, 15\]"),
                       (ok.tolist(), "select must be a bool tensor"), (ok.to("meta"), "select is on meta")):
        for fn in fns:
            with pytest.raises(ValueError, match=match):
                fn(*args, select=bad)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    check_chunk_inputs(*meta, select=ok.to("meta"))  # metadata only: meta tensors hold no values
