"""Ragged MoA decode kernel alone against FlexAttention dense decode and SDPA (one new token).

    python bench/decode_kernel.py [--batches 1 8 32] [--lengths 16384 65536 131072]
                                  [--densities 0.25 0.5] [--kv-dtypes bf16 fp8] [--repeats 50] [--record]
    python bench/decode_kernel.py --sweep --batches 8 --lengths 65536   # also the kernel's tiling grid
    python bench/decode_kernel.py --smoke --kv-dtypes bf16 fp8   # tiny shapes on the CPU (op -> twin): checks the script
    python bench/decode_kernel.py --batches 8 --lengths 65536 --kv-dtypes bf16 fp8 --fp8-modes q   # fp8: also the q-dtype read mode
    TRITON_INTERPRET=1 python bench/decode_kernel.py --smoke --sweep   # the sweep too, in Triton's interpreter

Llama-3-8B attention shape: 32 query / 8 KV heads, head dim 128, bf16. For each KV density a
random kv_head plan (random alpha and beta per KV head, beta scaled so that
``Plan.kv_density(N)`` hits the target) gives per-head spans (``Plan.head_spans``) and per-group
caps (``Plan.cache_spans``); the allocation is the caps, every row is at its last planned
position (``pos = N - 1``: the ring has wrapped, every slot is read). Baselines: FlexAttention
(compiled, q_len 1, dense [B, 8, N, 128] cache, enable_gqa, a full BlockMask built
for one query so that its decoding kernel runs) and SDPA (default backend, and
flash when it accepts the inputs). Bandwidth counts the bytes each method must read: kept K
and V (sum of caps x D x 2 tensors x 2 bytes per row) for the kernel, the dense cache for the
baselines. Copy bandwidth (read + write of a ``--copy-gib`` GiB ``copy_``, harness.copy_bandwidth)
is measured in the same run.

``--kv-dtypes bf16 fp8`` (default bf16): per density a kernel row per cache dtype, in the same
table. The fp8 row ("moa-flex d=0.25 fp8") is the same kernel over an FP8 cache
(float8_e4m3fn values and a float32 scale per slot for K and for V, ``k_scale``/``v_scale``),
quantized (``quant.quantize_fp8``) from the very bf16 K/V the bf16 row reads; its bytes are
what it must read: kept slots x (D x 1 byte + 4 bytes of scale) x 2 (K and V) per row, against
kept slots x D x 2 bytes x 2 for bf16 (``quant.bytes_per_vector``). Queries and output stay
bf16; the baselines (dense bf16 caches) run once per case. The checks below run for each
cache dtype (FP8: against the twin over the same FP8 values and scales, and against
FlexAttention over the dequantized cache).

Timing: each method is captured in a CUDA graph (decode runs under CUDA graphs; this leaves
out Python launch overhead, the same for every method) and replayed; before every replay a
256 MiB buffer is read to flush L2 (``--l2-flush write``: zeroed, which leaves dirty lines whose
write-back the timed call pays; harness.Timer); CUDA events around the replay; median of
``--repeats``.
A method that cannot be captured is timed eagerly and marked so. Before timing, the kernel is
checked against the twin on a small config, against FlexAttention with a dense plan on a
large one, and under CUDA-graph replay with new caps/pos/spans values.

``--sweep``: per (B, N, density) the Triton kernel at its default configuration and at every
(block_n, num_warps, num_stages, chunk) of ``SWEEP_GRID`` (chunk: the default balanced work
list, or fixed chunks of 0.5 / 1 / 2 times ``auto_chunk``), timed as above; a table of the
default and the fastest ``SWEEP_TOP``. It also adds FlexAttention dense decode without a
BlockMask to the baselines (it then runs its prefill kernel: the fair baseline is the one with).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from harness import COPY_GIB, KV_CHOICES, L2_FLUSHES, Timer, copy_bandwidth, kv_suffix, quantize_fp8_slabs, record, storage_dtype
from moa_flex.kernels import decode
from moa_flex.kernels.decode import ragged_decode_reference
from moa_flex.kernels.quant import bytes_per_vector, dequantize_fp8
from moa_flex.kernels.triton_support import interpreting
from moa_flex.plan import ModelShape, Plan

BARS = {"bandwidth": 0.8, "bandwidth fp8": 0.85, 0.25: 3.0, 0.5: 1.7}  # share of copy bandwidth; speed-up over flex dense
BAR_AT = (8, 65536)  # (B, N) of the bandwidth bar
# --sweep: the kernel's tiling grid. Chunk None is the default work list (auto_work_list: every
# group cut into nearly equal items, one round of resident programs); a number x is fixed
# chunks of x times auto_chunk's slots (decode_work_list).
SWEEP_GRID = ((32, 64, 128), (4, 8), (2, 3, 4), (None, 0.5, 1, 2))  # block_n, num_warps, num_stages, chunk
SWEEP_GRID_SMOKE = ((16, 32), (4,), (2,), (None, 1))
SWEEP_TOP = 5  # configurations shown per layout, besides the default


# ---------------------------------------------------------------------------------- set-up
def plan_at_kv_density(shape: ModelShape, N: int, density: float, seed: int = 0, alpha_fraction: float = 0.05) -> Plan:
    """kv_head plan with random alpha/beta per KV head whose kv_density at N is close to `density`
    (alpha uniform in [0, alpha_fraction * N] tokens; beta scaled to hit the density)."""
    gen = torch.Generator().manual_seed(seed)
    raw_beta = torch.rand(shape.num_layers, shape.num_kv_heads, generator=gen) * 0.95 + 0.05
    alpha = (torch.rand(shape.num_layers, shape.num_kv_heads, generator=gen) * alpha_fraction * N).round().tolist()

    def build(c: float) -> Plan:
        beta = (raw_beta * c).clamp(max=1.0).tolist()
        return Plan(shape, alpha, beta, granularity="kv_head", meta={"source": f"bench kv density {density} at {N}"})

    lo, hi = 0.0, 20.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if build(mid).kv_density(N) < density else (lo, mid)
    return build(hi)


def ragged_inputs(plan: Plan, B: int, N: int, D: int, dtype: torch.dtype, device: str) -> tuple:
    """(q, k, v, offsets, caps, spans, pos) for every row planned for N tokens, at pos N - 1."""
    caps_g = plan.cache_spans(N)[0].to(torch.int32)  # [KVH], slots
    spans_h = plan.head_spans(N)[0].to(torch.int32)  # [H], tokens
    offsets = torch.zeros(caps_g.numel() + 1, dtype=torch.int32)
    offsets[1:] = caps_g.cumsum(0)
    S = int(offsets[-1])
    q = torch.randn(B, plan.num_heads, D, device=device, dtype=dtype)
    k = torch.randn(B, S, D, device=device, dtype=dtype)
    v = torch.randn(B, S, D, device=device, dtype=dtype)
    return (
        q, k, v, offsets.to(device), caps_g.expand(B, -1).contiguous().to(device),
        spans_h.expand(B, -1).contiguous().to(device), torch.full((B,), N - 1, dtype=torch.int64, device=device),
    )


def as_cache(k: torch.Tensor, v: torch.Tensor, kv: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """K and V [B, S, D] as a cache of ``--kv-dtypes`` name ``kv`` holds them: (k, v, {}) for
    the inputs' own dtype, FP8 values and their scales ({"k_scale", "v_scale"}) for fp8."""
    if storage_dtype(kv, k.dtype) == k.dtype:
        return k, v, {}
    (k8, ks), (v8, vs) = quantize_fp8_slabs(k), quantize_fp8_slabs(v)
    return k8, v8, {"k_scale": ks, "v_scale": vs}


def cache_label(kv: str, dtype: torch.dtype) -> str:
    """How a check names its inputs: their dtype, or "<dtype> queries, fp8 cache"."""
    return f"{dtype}" if storage_dtype(kv, dtype) == dtype else f"{dtype} queries, {kv} cache"


def kernel_op(device: str) -> object:
    """What the checks call: the op (CUDA: Triton; CPU: the twin), or on the CPU under
    TRITON_INTERPRET=1 the Triton kernel itself in the interpreter (so a smoke run checks it)."""
    if device == "cpu" and interpreting():
        return decode.ragged_decode_triton
    return torch.ops.moa_flex.ragged_decode


# ---------------------------------------------------------------------------------- checks
def check_against_twin(device: str, dtype: torch.dtype, kv: str = "bf16") -> str:
    """Kernel (through the op) vs the twin on a small heterogeneous config with wrapped rings;
    an FP8 cache: both read the same FP8 values and scales."""
    torch.manual_seed(0)
    B, KVH, hpg, D, sink = 3, 4, 4, 128, 64
    widths = [300, 1000, 129, 700]
    offsets = torch.tensor([0, *torch.tensor(widths).cumsum(0).tolist()], dtype=torch.int32)
    caps = torch.tensor([[300, 1000, 129, 700], [250, 512, 100, 700], [0, 1000, 129, 65]], dtype=torch.int32)
    spans = torch.stack([torch.stack([torch.randint(0, int(c) + 1, (hpg,)) for c in row]).flatten() for row in caps]).int()
    pos = torch.tensor([5000, 333, 100000])
    S = int(offsets[-1])
    q, k, v = (torch.randn(B, n, D, dtype=dtype) for n in (KVH * hpg, S, S))
    k, v, scales = as_cache(k, v, kv)
    layout = (offsets, caps, spans, pos)
    # the twin over what the kernel reads: bf16/fp32 K/V as float32, an FP8 cache as stored (the twin dequantizes it)
    ref_kv = (k, v) if scales else (k.float(), v.float())
    op = kernel_op(device)
    dev = {name: t.to(device) for name, t in scales.items()}

    def got_want(window: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        got = op(*(t.to(device) for t in (q, k, v, *layout)), sink, window, D**-0.5, softcap, **dev).cpu()
        return got, ragged_decode_reference(q.float(), *ref_kv, *layout, sink, window, D**-0.5, softcap, **scales)

    got, want = got_want(0, 0.0)
    got_cap, want_cap = got_want(700, 30.0)
    err = (got.float() - want).abs().max().item()
    err_cap = (got_cap.float() - want_cap).abs().max().item()
    ok = err <= 2e-2 and err_cap <= 2e-2 and not got.isnan().any()
    return (f"kernel vs twin ({cache_label(kv, dtype)}, B={B}, 16 heads, wrapped rings, empty group): max abs error "
            f"{err:.2e}, with window+softcap {err_cap:.2e} [{'pass' if ok else 'FAIL'}]")


def check_dense_plan(device: str, dtype: torch.dtype, flex, kv: str = "bf16") -> str:  # noqa: ANN001
    """With span = cap = N at pos N - 1 the kernel is plain dense attention: compare with flex
    (an FP8 cache: flex over its dequantized K/V)."""
    B, N, H, KVH, D = 4, 8192, 32, 8, 128
    torch.manual_seed(1)
    q = torch.randn(B, H, D, device=device, dtype=dtype)
    kd = torch.randn(B, KVH, N, D, device=device, dtype=dtype)
    vd = torch.randn(B, KVH, N, D, device=device, dtype=dtype)
    offsets = torch.arange(0, (KVH + 1) * N, N, dtype=torch.int32, device=device)
    caps = torch.full((B, KVH), N, dtype=torch.int32, device=device)
    spans = torch.full((B, H), N, dtype=torch.int32, device=device)
    pos = torch.full((B,), N - 1, dtype=torch.int64, device=device)
    k, v, scales = as_cache(*(t.reshape(B, KVH * N, D) for t in (kd, vd)), kv)
    if scales:  # flex reads what the FP8 cache holds
        kd, vd = (dequantize_fp8(t, scales[f"{n}_scale"], dtype).view(B, KVH, N, D) for t, n in ((k, "k"), (v, "v")))
    got = torch.ops.moa_flex.ragged_decode(q, k, v, offsets, caps, spans, pos, 64, 0, D**-0.5, 0.0, **scales)
    want = flex(q[:, :, None], kd, vd, enable_gqa=True)[:, :, 0]
    err = (got.float() - want.float()).abs().max().item()
    return (f"dense plan vs FlexAttention ({cache_label(kv, dtype) + ', ' if scales else ''}B={B}, N={N}): max abs error {err:.2e} "
            f"[{'pass' if err <= 2e-2 else 'FAIL'}]")


def check_graph_replay(device: str, dtype: torch.dtype, kv: str = "bf16") -> str:
    """Capture the op once, then change caps/pos/spans in place and replay: output must follow."""
    torch.manual_seed(2)
    B, KVH, hpg, D, sink, W = 2, 2, 4, 128, 16, 512
    offsets = torch.tensor([0, W, 2 * W], dtype=torch.int32, device=device)
    caps = torch.full((B, KVH), W, dtype=torch.int32, device=device)
    spans = torch.full((B, KVH * hpg), W, dtype=torch.int32, device=device)
    pos = torch.full((B,), 3 * W, dtype=torch.int64, device=device)
    q = torch.randn(B, KVH * hpg, D, device=device, dtype=dtype)
    k, v, scales = as_cache(*(torch.randn(B, 2 * W, D, device=device, dtype=dtype) for _ in range(2)), kv)
    run = lambda: torch.ops.moa_flex.ragged_decode(q, k, v, offsets, caps, spans, pos, sink, 0, D**-0.5, 0.0, **scales)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    caps.copy_(torch.tensor([[100, 400], [W, 33]], dtype=torch.int32))
    spans.copy_(torch.tensor([[100, 50, 17, 100, 400, 400, 200, 20], [W, 300, 64, 16, 33, 33, 20, 0]], dtype=torch.int32))
    pos.copy_(torch.tensor([777, 20]))
    g.replay()
    torch.cuda.synchronize()
    ref_kv = (k.cpu(), v.cpu()) if scales else (k.float().cpu(), v.float().cpu())
    want = ragged_decode_reference(q.float().cpu(), *ref_kv, offsets.cpu(), caps.cpu(), spans.cpu(), pos.cpu(), sink,
                                   0, D**-0.5, 0.0, **{n: t.cpu() for n, t in scales.items()})
    err = (out.float().cpu() - want).abs().max().item()
    return (f"CUDA-graph replay with new caps/pos/spans{' (' + cache_label(kv, dtype) + ')' if scales else ''}: max abs error {err:.2e} "
            f"[{'pass' if err <= 2e-2 else 'FAIL'}]")


# ---------------------------------------------------------------------------------- bench
def fits(device: str, nbytes: int) -> bool:
    if device != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info()
    return nbytes < 0.8 * free


def bench(args: argparse.Namespace, rows: list, notes: list, sweeps: list) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    dev, D, KVH = args.device, args.head_dim, args.kv_heads
    timer = Timer(dev, args.repeats, args.l2_flush)
    flex = torch.compile(flex_attention, dynamic=False) if dev == "cuda" else flex_attention
    esize = torch.finfo(args.dtype).bits // 8
    for B in args.batches:
        for N in args.lengths:
            dense_bytes = B * KVH * N * D * 2 * esize
            if not fits(dev, 2 * dense_bytes):
                notes.append(f"skipped B={B}, N={N}: dense cache {dense_bytes / 2**30:.1f} GiB does not fit")
                continue
            try:
                base = baselines(args, timer, flex, B, N, rows, notes)  # its dense cache is freed on return
                for density in args.densities:
                    kernel_rows(args, timer, B, N, density, base, rows, sweeps)
            except torch.cuda.OutOfMemoryError:
                notes.append(f"B={B}, N={N}: out of memory, skipped the rest of this config")
            if dev == "cuda":
                torch.cuda.empty_cache()


def baselines(args: argparse.Namespace, timer: Timer, flex: Callable, B: int, N: int, rows: list,
              notes: list) -> dict[str, float]:
    """FlexAttention and SDPA over a dense bf16 cache [B, KVH, N, D] (once per case, whatever
    the kernel's cache dtypes): rows appended, {method: ms} returned."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    dev, dtype, D, H, KVH = args.device, args.dtype, args.head_dim, args.heads, args.kv_heads
    dense_bytes = B * KVH * N * D * 2 * (torch.finfo(dtype).bits // 8)
    q4 = torch.randn(B, H, 1, D, device=dev, dtype=dtype)
    kd = torch.randn(B, KVH, N, D, device=dev, dtype=dtype)
    vd = torch.randn(B, KVH, N, D, device=dev, dtype=dtype)
    base = {}
    # FlexAttention's decoding kernel needs a BlockMask built for one query: without one
    # it runs its prefill kernel at about a third of the speed (RESULTS.md, "Ragged decode
    # kernel", Tuning; --sweep times that form too)
    full = create_block_mask(lambda b, h, qi, kv: kv >= 0, None, None, 1, N, device=dev) if dev == "cuda" else None
    cases = [("flex dense", lambda: flex(q4, kd, vd, block_mask=full, enable_gqa=True)),
             ("sdpa default", lambda: F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True))]
    if dev == "cuda":
        def sdpa_flash() -> torch.Tensor:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True)
        cases.append(("sdpa flash", sdpa_flash))
        if args.sweep:
            cases.append(("flex dense (no BlockMask)", lambda: flex(q4, kd, vd, enable_gqa=True)))
    for name, fn in cases:
        try:
            ms, mode = timer(fn)
        except Exception as e:  # noqa: BLE001 - a backend that refuses these inputs
            notes.append(f"{name} at B={B}, N={N} not run: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
            continue
        base[name] = ms
        rows.append({"B": B, "N": N, "density": 1.0, "method": name, "ms": ms, "mode": mode, "bytes": dense_bytes})
    return base


def kernel_rows(args: argparse.Namespace, timer: Timer, B: int, N: int, density: float, base: dict, rows: list,
                sweeps: list) -> None:
    """The ragged kernel at one KV density, a row per ``--kv-dtypes`` cache dtype, every dtype
    from the same random K/V (fp8: quantized from the bf16 row's), and its tiling sweep."""
    dev, dtype, D, H, KVH = args.device, args.dtype, args.head_dim, args.heads, args.kv_heads
    plan = plan_at_kv_density(ModelShape(1, H, KVH, D), N, density, seed=B * 7 + N % 1000)
    inputs = ragged_inputs(plan, B, N, D, dtype, dev)
    slots = int(inputs[3][-1])
    out = torch.empty(B, H, D, device=dev, dtype=dtype)
    for kv in args.kv_dtypes:
        k, v, scales = as_cache(inputs[1], inputs[2], kv)
        cached = (inputs[0], k, v, *inputs[3:])
        # what the kernel must read: kept K and V slots, an FP8 cache's scales included
        nbytes = B * slots * 2 * bytes_per_vector(k.dtype, D)
        modes = [None] + [m for m in args.fp8_modes if m != "default"] if kv == "fp8" and dev == "cuda" else [None]
        for fp8_mode in modes:
            tuning = args.tuning if fp8_mode is None else {**args.tuning, "fp8_mode": fp8_mode}
            ms, mode = timer(kernel_call(dev, cached, scales, plan.sink, out, tuning))
            rows.append({"B": B, "N": N, "density": slots / (KVH * N), "target": density, "kv": kv,
                         "method": f"moa-flex d={density}{kv_suffix(kv)}{f' ({fp8_mode})' if fp8_mode else ''}",
                         "fp8_mode": fp8_mode, "ms": ms, "mode": mode, "bytes": nbytes,
                         "vs_flex": base.get("flex dense", float("nan")) / ms})
        if args.sweep_grid:
            sweeps.append({"B": B, "N": N, "density": slots / (KVH * N), "bytes": nbytes, "kv": kv,
                           "results": sweep(cached, plan.sink, out, timer, args.sweep_grid, scales, tuple(modes))})


def kernel_call(dev: str, inputs: tuple, scales: dict, sink: int, out: torch.Tensor, tuning: dict) -> Callable[[], object]:
    """The timed kernel call: CUDA: the Triton kernel (with ``--chunk``/``--block-n``/... and
    an FP8 cache's ``scales``) into ``out``; CPU (smoke): the op, i.e. the twin."""
    D = inputs[0].shape[-1]
    if dev == "cuda":
        return functools.partial(decode.ragged_decode_triton, *inputs, sink, 0, D**-0.5, 0.0, out=out, **tuning, **scales)
    return functools.partial(torch.ops.moa_flex.ragged_decode, *inputs, sink, 0, D**-0.5, 0.0, **scales)


def sweep(inputs: tuple, sink: int, out: torch.Tensor, timer: Timer, grid: tuple, scales: dict | None = None,
          modes: tuple = (None,)) -> list[dict]:
    """The Triton kernel on one layout at its default configuration and at every (block_n,
    num_warps, num_stages, chunk) of `grid`, for each FP8 read mode of `modes` (None: the
    default): the default first, then the rest fastest first. ``scales``: an FP8 cache's
    k_scale/v_scale."""
    B, _, D = inputs[0].shape
    device = inputs[0].device
    offs = decode.host_offsets(inputs[3], inputs[1].shape[1])
    tiling = decode.default_tiling(D, inputs[2].shape[2], bool(scales))
    default = (tiling.block_n, 4, tiling.num_stages, None, None)
    # the default (ragged_decode_triton's own: default tiles, 4 warps, chunk None, default mode) first, once
    configs = [(None, 4, None, None, None)] + [(*c, m) for m in modes for c in itertools.product(*grid)
                                               if (*c, m) != default]
    results = []
    for block_n, warps, stages, mult, fp8_mode in configs:
        tile = block_n or tiling.block_n
        chunk = None if mult is None else max(tile, int(decode.auto_chunk(B, offs, device, tile) * mult))
        fn = functools.partial(decode.ragged_decode_triton, *inputs, sink, 0, D**-0.5, 0.0, out=out, chunk=chunk,
                               block_n=block_n, num_warps=warps, num_stages=stages, **(scales or {}),
                               **({"fp8_mode": fp8_mode} if fp8_mode is not None else {}))
        try:
            ms, mode = timer(fn)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile (shared memory)
            print(f"  sweep: block_n={tile} warps={warps} stages={stages} chunk={chunk}: {type(e).__name__}")
            continue
        auto = decode.auto_work_list(offs, B, device, tile, tiling.resident_per_sm)
        shown = chunk if chunk is not None else f"auto ({auto.chunk})"
        results.append({"config": "default" if block_n is None else "", "block_n": tile, "warps": warps, "fp8_mode": fp8_mode,
                        "stages": stages or tiling.num_stages, "chunk": shown, "ms": ms, "mode": mode})
    return [r for r in results if r["config"]] + sorted((r for r in results if not r["config"]), key=lambda r: r["ms"])


def sweep_table(sweeps: list, copy_bw: float) -> str:
    lines = [
        "| B | N | kv density | cache | config | block_n | warps | stages | chunk (slots) | fp8 mode | time (ms) | timing | TB/s | % copy bw |",
        "|---:|---:|---:|---|---|---:|---:|---:|---|---|---:|---|---:|---:|",
    ]
    for s in sweeps:
        others = [r for r in s["results"] if r["config"] != "default"][:SWEEP_TOP]
        shown = [r for r in s["results"] if r["config"] == "default"] + [dict(r, config=f"#{i}") for i, r in enumerate(others, 1)]
        for r in shown:
            bw = s["bytes"] / (r["ms"] * 1e-3)
            lines.append(
                f"| {s['B']} | {s['N']} | {s['density']:.3f} | {s['kv']} | {r['config']} | {r['block_n']} | {r['warps']} | "
                f"{r['stages']} | {r['chunk']} | {r['fp8_mode'] or 'default'} | {r['ms']:.4f} | {r['mode']} | {bw / 1e12:.2f} | {100 * bw / copy_bw:.0f} |"
            )
    return "\n".join(lines)


def table(rows: list, copy_bw: float) -> str:
    lines = [
        "| B | N | method | kv density | time (ms) | timing | GB read | TB/s | % copy bw | x flex dense | bar |",
        "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        bw = r["bytes"] / (r["ms"] * 1e-3)
        bar = ""
        if "target" in r:
            if r["target"] in BARS and math.isnan(r["vs_flex"]):
                bar = "speed: n/a (no FlexAttention baseline)"
            elif r["target"] in BARS:
                bar = f"speed >= {BARS[r['target']]}x: {'pass' if r['vs_flex'] >= BARS[r['target']] else 'FAIL'}"
            if (r["B"], r["N"]) == BAR_AT:
                need = BARS["bandwidth fp8" if r.get("kv") == "fp8" else "bandwidth"]
                bar += f"; bw >= {100 * need:.0f}% copy: {'pass' if bw >= need * copy_bw else 'FAIL'}"
        ratio = f"{r['vs_flex']:.2f}" if "vs_flex" in r else ""
        lines.append(
            f"| {r['B']} | {r['N']} | {r['method']} | {r['density']:.3f} | {r['ms']:.4f} | {r['mode']} | "
            f"{r['bytes'] / 1e9:.3f} | {bw / 1e12:.2f} | {100 * bw / copy_bw:.0f} | {ratio} | {bar} |"
        )
    return "\n".join(lines)


def kv_notes(rows: list) -> list[str]:
    """Per (B, N, density) with more than one cache dtype: each other dtype's kernel time
    against the first's, and the share of its bytes it reads."""
    first: dict = {}
    out = []
    for r in rows:
        if "kv" not in r:
            continue
        key = (r["B"], r["N"], r["target"])
        if key not in first:
            first[key] = r
            continue
        a = first[key]
        what = r["kv"] + (f" ({r['fp8_mode']})" if r.get("fp8_mode") else "")
        out.append(f"B={r['B']}, N={r['N']}, d={r['target']}: {what} kernel {r['ms']:.4f} ms vs {a['kv']} "
                   f"{a['ms']:.4f} ms: speed-up {a['ms'] / r['ms']:.2f}x, bytes read {r['bytes'] / a['bytes']:.3f}x")
    return out


def parse_grid(text: str) -> tuple:
    """``--sweep-grid``: four slash-separated comma lists (block_n, warps, stages, chunk; a
    chunk of ``auto`` is the default work list, a number a multiple of the fixed chunk)."""
    parts = text.split("/")
    if len(parts) != 4:
        raise SystemExit(f"--sweep-grid needs BLOCK_NS/WARPS/STAGES/CHUNKS, got {text!r}")
    ints = [tuple(int(x) for x in p.split(",")) for p in parts[:3]]
    chunks = tuple(None if x == "auto" else float(x) for x in parts[3].split(","))
    return (*ints, chunks)


def sweep_grid(sweep: bool, grid_text: str | None, smoke: bool) -> tuple | None:
    """The grid ``--sweep`` times: ``--sweep-grid``'s (``grid_text``) if given, else the default
    (the smoke run's on the CPU); None without ``--sweep``, or on the CPU outside Triton's
    interpreter (said in a note)."""
    if grid_text and not sweep:
        raise SystemExit("--sweep-grid is the grid of --sweep: pass --sweep too")
    if not sweep:
        return None
    if smoke and not interpreting():
        print("note: --sweep on the CPU runs the Triton kernel in its interpreter: set TRITON_INTERPRET=1; no sweep")
        return None
    if grid_text:
        return parse_grid(grid_text)
    return SWEEP_GRID_SMOKE if smoke else SWEEP_GRID


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--kv-dtypes", nargs="+", choices=KV_CHOICES, default=["bf16"],
                    help="the kernel's cache dtypes, a row each per density (fp8: FP8 values + float32 scales)")
    ap.add_argument("--fp8-modes", nargs="+", choices=["default", *decode.FP8_MODES], default=["default"],
                    help="fp8 rows: the kernel's FP8 read modes besides the default (ragged_decode_triton fp8_mode), "
                         "a row each and in the sweep; GPU only")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--l2-flush", choices=L2_FLUSHES, default="read",
                    help="empty L2 before each timed run by reading a 256 MiB buffer (clean lines) or by zeroing it")
    ap.add_argument("--copy-gib", type=float, default=COPY_GIB, help="copy bandwidth buffer (GiB)")
    ap.add_argument("--chunk", type=int, default=None, help="kernel: slots per work item (default: automatic)")
    ap.add_argument("--block-n", type=int, default=None, help="kernel: slots per inner tile (default 64)")
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--sweep", action="store_true",
                    help="also time the kernel over a (block_n, warps, stages, chunk) grid per layout, and "
                         "FlexAttention dense decode without a BlockMask")
    ap.add_argument("--sweep-grid", default=None, metavar="BLOCK_NS/WARPS/STAGES/CHUNKS",
                    help="the sweep's grid instead of the default, e.g. 64,128,256/4,8/2,3,4/auto (chunks: auto "
                         "or multiples of the fixed chunk)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run through the twin: checks the script")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    names = {"chunk": args.chunk, "block_n": args.block_n, "num_warps": args.num_warps, "num_stages": args.num_stages}
    args.tuning = {k: v for k, v in names.items() if v is not None}
    args.dtype = torch.bfloat16
    if args.smoke:
        args.batches, args.lengths, args.heads, args.kv_heads, args.head_dim = [1, 2], [512], 8, 2, 32
        args.repeats, args.copy_gib = 3, 0.05
    elif not torch.cuda.is_available():
        sys.exit("bench/decode_kernel.py needs a CUDA GPU (use --smoke for a CPU check of the script)")
    args.sweep_grid = sweep_grid(args.sweep, args.sweep_grid, args.smoke)

    checks, notes, rows, sweeps = [], [], [], []
    if args.device == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        for key in ("recompile_limit", "cache_size_limit"):  # one compile per (B, N) shape
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, 256)
        flex = torch.compile(flex_attention, dynamic=False)
        for kv in args.kv_dtypes:
            checks.append(check_against_twin("cuda", torch.bfloat16, kv))
            checks.append(check_against_twin("cuda", torch.float32, kv))
            checks.append(check_dense_plan("cuda", torch.bfloat16, flex, kv))
            checks.append(check_graph_replay("cuda", torch.bfloat16, kv))
    else:
        checks += [check_against_twin("cpu", torch.float32, kv) for kv in args.kv_dtypes]
    for line in checks:
        print("check:", line)

    copy_bw = copy_bandwidth(args.device, args.copy_gib, args.repeats)
    print(f"copy bandwidth: {copy_bw / 1e12:.2f} TB/s")
    bench(args, rows, notes, sweeps)
    text = table(rows, copy_bw)
    notes += kv_notes(rows)
    print(text)
    for n in notes:
        print("note:", n)
    if sweeps:
        swept = (f"Tile sweep of the ragged decode kernel: per layout the default configuration and the {SWEEP_TOP} "
                 "fastest of the grid:\n\n" + sweep_table(sweeps, copy_bw))
        print("\n" + swept)
        text += "\n\n" + swept

    if args.record:
        caches = "bf16" if args.kv_dtypes == ["bf16"] else f"bf16 queries, {' and '.join(args.kv_dtypes)} caches"
        record(
            f"Ragged decode kernel vs FlexAttention dense decode and SDPA ({args.heads} q / {args.kv_heads} KV heads, "
            f"D={args.head_dim}, {caches})",
            "\n".join([*[f"- check: {c}" for c in checks], "", text, *[f"\n- note: {n}" for n in notes]]),
            device=args.device,
            details=("Smoke run: tiny shapes on the CPU, the op's twin. " if args.smoke else "")
            + f"Median of {args.repeats}, L2 flushed by a {args.l2_flush}, CUDA-graph replay unless marked eager. Copy bandwidth "
            f"{copy_bw / 1e12:.2f} TB/s ({args.copy_gib:g} GiB). Bars: kernel >= 80% of copy bandwidth at B={BAR_AT[0]}, "
            f"N={BAR_AT[1]}; >= 3x faster than FlexAttention dense decode at KV density 0.25, >= 1.7x at 0.5."
            + (" fp8 rows: the kernel over an FP8 cache quantized from the bf16 rows' K/V; bytes read = kept slots x "
               f"({args.head_dim} + 4 scale bytes) x 2 per row." if "fp8" in args.kv_dtypes else ""),
        )


if __name__ == "__main__":
    main()
