"""Skinny linear layers of a decode step (``M`` = 1..128 tokens): weight-bandwidth bound.

At small ``M`` a projection ``y = x @ W^T`` (``x`` [M, K], ``W`` [N, K] in nn.Linear layout,
row-major) reads each weight byte once and does about ``2 M`` flops with it, so its time is
the weight bytes over the memory bandwidth. cuBLAS reaches ~76% of copy bandwidth on the
Llama-3-8B projections (~40% on k/v, 1024 x 4096) and needs one launch per projection plus
split-K reductions. The kernels here:

* ``_linear_kernel``: ``y_i = x @ W_i^T`` for up to three weights sharing ``x`` (q/k/v) in one
  launch. The output columns of all weights are cut into tiles of ``BLOCK_N`` columns (a
  tile never spans two weights); a program owns one (tile, K split, block of ``BLOCK_M``
  rows of x), picks its weight and output pointers by the tile's range, and streams its
  ``[BLOCK_N, K/split]`` slab of the weight in ``[BLOCK_N, BLOCK_K]`` tiles (contiguous
  along K, pipelined ``num_stages`` deep), accumulating ``W x^T`` in fp32 with ``tl.dot``
  (x padded to ``BLOCK_M >= 16`` rows; the weight is the MMA's M side). With ``GATED`` the
  program loads matching tiles of ``W_gate`` and ``W_up`` and its epilogue writes
  ``silu(x W_gate^T) * (x W_up^T)``. ``BLOCK_M`` goes up to 128, so a decode step's weights
  are read once; larger ``M`` uses several row blocks (the weight is read once per block).
* ``_splitk_reduce_kernel``: when a shape has fewer column tiles than the GPU has SMs, K is
  split so that every SM streams; each program then writes fp32 partials ``[split, planes,
  M, columns]`` and this second launch sums them (and applies the gate). Deterministic: no
  atomics, no state kept between calls.

Tiles come from :func:`linear_config`, a deterministic rule on (M, widths, K, dtype, SM
count): no autotuning, nothing read back from the device, nothing allocated outside torch's
caching allocator, so a call can be captured in a CUDA graph once it has run once for its
shapes (Triton compiles and loads the kernel on the first call). Weight tiles load as 16-byte
``cp.async`` vectors when K is a multiple of 16 and the weights are 16-byte aligned (Triton's
specialization of such arguments); other K run correctly with narrower loads.

Three layers of API:

* twins :func:`grouped_linear_reference` and :func:`gated_mlp_reference` (fp32 torch);
* :func:`grouped_linear_triton` / :func:`gated_mlp_triton` (2-D ``x``, optional preallocated
  outputs and tiles); :func:`grouped_linear` / :func:`gated_mlp` (``x`` [..., K]: Triton on
  CUDA and in Triton's interpreter, else the twin);
* the custom ops ``moa_flex::grouped_linear`` and ``moa_flex::gated_mlp`` (registered in
  :mod:`moa_flex.runtime.ops`; CUDA -> Triton, CPU -> twin) with fake implementations, for
  torch.compile and CUDA graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .triton_support import FLOAT_DTYPES, interpreting, pow2, sm_count, tl, triton

MAX_WEIGHTS = 3  # weights fused into one launch
MAX_BLOCK_M = 128  # rows of x per program: a decode step up to 128 tokens reads W once
MAX_BLOCK_K = 256
W_TILE_BYTES = 16 * 1024  # bytes of one weight tile (one pipeline stage of one weight)
SMEM_BUDGET = 112 * 1024  # bytes of pipeline buffers per program: two programs fit on an SM
MIN_SPLIT_STEPS = 4  # a K split covers at least this many BLOCK_K steps
REDUCE_BLOCK_M = 16  # rows per program of the split-K reduction (its tile stays in registers)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------- checks
def check_linear_inputs(x: torch.Tensor, weights: Sequence[torch.Tensor], what: str = "grouped_linear") -> None:
    """Validate x [..., K] and 1..3 weights [N_i, K] of x's dtype and device (ValueError)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{what}: x must be [..., K] with at least one dim, got a 0-d tensor")
    if x.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise ValueError(f"{what}: x must be one of {names}, got {x.dtype}")
    if not 1 <= len(weights) <= MAX_WEIGHTS:
        raise ValueError(f"{what}: needs 1 to {MAX_WEIGHTS} weights, got {len(weights)}")
    K = x.shape[-1]
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{what}: weight {i} must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 2:
            raise ValueError(f"{what}: weight {i} must be 2-D [N, K] (nn.Linear layout), got shape {tuple(w.shape)}")
        if w.shape[1] != K:
            raise ValueError(f"{what}: weight {i} is [N, K] = {tuple(w.shape)} but x has K = {K} (x.shape[-1])")
        if w.dtype != x.dtype:
            raise ValueError(f"{what}: weight {i} dtype {w.dtype} differs from x dtype {x.dtype}")
        if w.device != x.device:
            raise ValueError(f"{what}: weight {i} is on {w.device} but x is on {x.device}")


def check_gated_inputs(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> None:
    """Validate x [..., K], w_gate and w_up [N, K] of one shape, dtype and device (ValueError)."""
    check_linear_inputs(x, (w_gate, w_up), "gated_mlp")
    if w_gate.shape != w_up.shape:
        raise ValueError(f"gated_mlp: w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must have one shape")


# ---------------------------------------------------------------------------------- the twins
def grouped_linear_reference(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The twin: ``[x @ w.T for w in weights]`` in fp32, cast to x's dtype. x [..., K] -> [..., N_i]."""
    check_linear_inputs(x, weights)
    xf = x.float()
    return [(xf @ w.float().T).to(x.dtype) for w in weights]


def gated_mlp_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """The twin: ``silu(x @ w_gate.T) * (x @ w_up.T)`` in fp32, cast to x's dtype. x [..., K] -> [..., N]."""
    check_gated_inputs(x, w_gate, w_up)
    xf = x.float()
    return (F.silu(xf @ w_gate.float().T) * (xf @ w_up.float().T)).to(x.dtype)


# ---------------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class LinearConfig:
    """Tiles of one launch: ``block_m`` rows of x (tokens), ``block_n`` output columns,
    ``block_k`` of K per pipelined step (powers of two >= 16); ``split_k`` programs share a
    column tile's K range (fp32 partials and a reduction launch when > 1)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    def check(self) -> None:
        """ValueError unless the blocks are powers of two >= 16 and the counts are >= 1."""
        for name in ("block_m", "block_n", "block_k"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")
        for name in ("split_k", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


def linear_config(
    M: int,
    widths: Sequence[int],
    K: int,
    dtype: torch.dtype,
    sms: int,
    gated: bool = False,
    *,
    block_n: int | None = None,
    split_k: int | None = None,
) -> LinearConfig:
    """Deterministic tiles for x [M, K] against weights of ``widths`` output columns (a gated
    pair counts once) on a GPU of ``sms`` SMs.

    One row block holds all of M up to 128 (the weight is read once); 64 columns per tile, 128
    from 128 rows on (x is re-read from L2 once per tile: M / block_n bytes per weight byte);
    16 KiB weight tiles per stage, stages up to 4 within 112 KiB of shared memory. K is split
    only when the tiles leave SMs idle, then up to 2 programs per SM, each split at least 4
    steps long, the partials at most a quarter of the weight bytes. ``block_n`` and ``split_k``
    force those two choices (a tuning sweep); the rest follows from them.
    """
    esize = torch.finfo(dtype).bits // 8
    planes = 2 if gated else 1
    bm = min(MAX_BLOCK_M, pow2(M, 16))
    bn = block_n or (128 if bm >= 128 else 64)
    bk = max(16, min(MAX_BLOCK_K, W_TILE_BYTES // (bn * esize), pow2(K, 16)))
    programs = sum(_cdiv(n, bn) for n in widths) * _cdiv(M, bm)
    split = 1
    if split_k is not None:
        split = split_k
    elif 0 < programs < sms:
        split = min(_cdiv(2 * sms, programs), max(1, K // (MIN_SPLIT_STEPS * bk)), max(1, K * esize // (16 * M)))
    stages = max(2, min(4, SMEM_BUDGET // ((planes * bn + bm) * bk * esize)))
    warps = 8 if planes * bn * bm > 64 * 128 else 4
    return LinearConfig(bm, bn, bk, split, warps, stages)


def _k_chunk(K: int, split: int, block_k: int) -> int:
    """K elements per split: a multiple of block_k, so only the last split has a ragged tail."""
    return max(block_k, _cdiv(_cdiv(K, split), block_k) * block_k)


# ---------------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _pick(tile, T0, T01, p0, p1, p2, N0, N1, N2):
        """(pointer, columns, tile index inside it) of the weight or output owning column `tile`."""
        if tile < T0:
            p, n, t = p0, N0, tile
        elif tile < T01:
            p, n, t = p1, N1, tile - T0
        else:
            p, n, t = p2, N2, tile - T01
        return p, n, t

    @triton.jit
    def _mma(acc, w, xb, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """acc [BN, BM] += w [BN, BK] @ xb [BM, BK]^T, fp32 accumulation."""
        if DOT_F32:  # the interpreter multiplies in fp32
            w = w.to(tl.float32)
            xb = xb.to(tl.float32)
        if IEEE:
            acc = tl.dot(w, tl.trans(xb), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(xb), acc)
        return acc

    @triton.jit
    def _part_offsets(s, plane, rows_m, tile, M, C, PLANES: tl.constexpr, BLOCK_N: tl.constexpr):
        """Offsets [BN, BM] of a tile's partial sums in the fp32 buffer [split, PLANES, M, C]."""
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        return ((s * PLANES + plane) * M + rows_m[None, :].to(tl.int64)) * C + cols[:, None]

    @triton.jit
    def _finish(y_ptr, acc, acc_u, rows_m, cols, M, n, GATED: tl.constexpr):
        """Store y[m, col] = acc (or silu(acc) * acc_u) in y's dtype; y is [M, n] row-major."""
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_u
        mask = (rows_m[None, :] < M) & (cols[:, None] < n)
        tl.store(y_ptr + rows_m[None, :].to(tl.int64) * n + cols[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["N0", "N1", "N2", "T0", "T01"])
    def _linear_kernel(
        x_ptr, w0_ptr, w1_ptr, w2_ptr, y0_ptr, y1_ptr, y2_ptr, part_ptr,
        M, K, N0, N1, N2, T0, T01, C, k_chunk, m_blocks, n_split,
        GATED: tl.constexpr, PLANES: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One (column tile, K split, row block): stream the weight slab, accumulate W x^T."""
        pid = tl.program_id(0)
        mb = pid % m_blocks  # row blocks of one tile run side by side: the slab is shared in L2
        s = (pid // m_blocks) % n_split
        tile = pid // (m_blocks * n_split)
        if GATED:  # w0 = gate, w1 = up, y0 = out
            w_ptr, n, t = w0_ptr, N0, tile
            y_ptr = y0_ptr
        else:
            w_ptr, n, t = _pick(tile, T0, T01, w0_ptr, w1_ptr, w2_ptr, N0, N1, N2)
            y_ptr, _, _ = _pick(tile, T0, T01, y0_ptr, y1_ptr, y2_ptr, N0, N1, N2)
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
        rows_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        w_mask = (cols < n)[:, None]
        x_mask = (rows_m < M)[:, None]
        w_tile = w_ptr + cols[:, None].to(tl.int64) * K + offs_k[None, :]
        x_tile = x_ptr + rows_m[:, None].to(tl.int64) * K + offs_k[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc_u = acc
        if GATED:
            u_tile = w1_ptr + cols[:, None].to(tl.int64) * K + offs_k[None, :]
        k_lo = s * k_chunk
        for k0 in range(k_lo, tl.minimum(k_lo + k_chunk, K), BLOCK_K):
            k_ok = (k0 + offs_k < K)[None, :]
            xb = tl.load(x_tile + k0, mask=x_mask & k_ok, other=0.0)
            acc = _mma(acc, tl.load(w_tile + k0, mask=w_mask & k_ok, other=0.0), xb, DOT_F32, IEEE)
            if GATED:
                acc_u = _mma(acc_u, tl.load(u_tile + k0, mask=w_mask & k_ok, other=0.0), xb, DOT_F32, IEEE)
        if SPLIT:
            m_ok = (rows_m < M)[None, :]
            tl.store(part_ptr + _part_offsets(s, 0, rows_m, tile, M, C, PLANES, BLOCK_N), acc, mask=m_ok)
            if GATED:
                tl.store(part_ptr + _part_offsets(s, 1, rows_m, tile, M, C, PLANES, BLOCK_N), acc_u, mask=m_ok)
        else:
            _finish(y_ptr, acc, acc_u, rows_m, cols, M, n, GATED)

    @triton.jit(do_not_specialize=["N0", "N1", "N2", "T0", "T01"])
    def _splitk_reduce_kernel(
        part_ptr, y0_ptr, y1_ptr, y2_ptr,
        M, N0, N1, N2, T0, T01, C, m_blocks, n_split,
        GATED: tl.constexpr, PLANES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One (column tile, row block): sum the K splits' partials, then the epilogue."""
        pid = tl.program_id(0)
        mb = pid % m_blocks
        tile = pid // m_blocks
        if GATED:
            y_ptr, n, t = y0_ptr, N0, tile
        else:
            y_ptr, n, t = _pick(tile, T0, T01, y0_ptr, y1_ptr, y2_ptr, N0, N1, N2)
        rows_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = (rows_m < M)[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc_u = acc
        for s in range(0, n_split):
            acc += tl.load(part_ptr + _part_offsets(s, 0, rows_m, tile, M, C, PLANES, BLOCK_N), mask=m_ok, other=0.0)
            if GATED:
                acc_u += tl.load(part_ptr + _part_offsets(s, 1, rows_m, tile, M, C, PLANES, BLOCK_N), mask=m_ok, other=0.0)
        _finish(y_ptr, acc, acc_u, rows_m, t * BLOCK_N + tl.arange(0, BLOCK_N), M, n, GATED)


def _launch(x: torch.Tensor, weights: list[torch.Tensor], outs: list[torch.Tensor], gated: bool, cfg: LinearConfig) -> None:
    """Run the kernel(s) on 2-D contiguous x [M, K], contiguous weights and outputs.

    Grouped: weights/outs are the 1..3 projections. Gated: weights = [gate, up], outs = [out].
    Empty operands launch nothing (their storage may have no address).
    """
    M, K = x.shape
    if not gated:  # drop weights with no rows: their outputs [M, 0] are complete as they are
        kept = [i for i, w in enumerate(weights) if w.shape[0] > 0]
        weights, outs = [weights[i] for i in kept], [outs[i] for i in kept]
    if M == 0 or not outs or outs[0].numel() == 0:
        return
    if K == 0:  # an empty sum: y = 0 (and silu(0) * 0 = 0)
        for y in outs:
            y.zero_()
        return
    widths = [weights[0].shape[0]] if gated else [w.shape[0] for w in weights]
    tiles = [_cdiv(n, cfg.block_n) for n in widths] + [0] * (MAX_WEIGHTS - len(widths))
    n_tiles = sum(tiles)
    chunk = _k_chunk(K, cfg.split_k, cfg.block_k)
    split = max(1, _cdiv(K, chunk))
    m_blocks = _cdiv(M, cfg.block_m)
    C = n_tiles * cfg.block_n  # columns of the partial buffer (tile-padded)
    ws = weights + [weights[0]] * (MAX_WEIGHTS - len(weights))
    ys = outs + [outs[0]] * (MAX_WEIGHTS - len(outs))
    ns = (widths + [0] * MAX_WEIGHTS)[:MAX_WEIGHTS]
    planes = 2 if gated else 1
    part = torch.empty(split, planes, M, C, device=x.device, dtype=torch.float32) if split > 1 else ys[0]
    interp = interpreting()
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _linear_kernel[(n_tiles * split * m_blocks,)](
            x, *ws, *ys, part, M, K, *ns, tiles[0], tiles[0] + tiles[1], C, chunk, m_blocks, split,
            GATED=gated, PLANES=planes, SPLIT=split > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            DOT_F32=interp, IEEE=x.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split > 1:
            rbm = min(cfg.block_m, REDUCE_BLOCK_M)
            _splitk_reduce_kernel[(n_tiles * _cdiv(M, rbm),)](
                part, *ys, M, *ns, tiles[0], tiles[0] + tiles[1], C, _cdiv(M, rbm), split,
                GATED=gated, PLANES=planes, BLOCK_M=rbm, BLOCK_N=cfg.block_n, num_warps=4,
            )


def _check_triton_device(x: torch.Tensor, what: str) -> None:
    if triton is None:
        raise RuntimeError(f"{what} needs triton (pip install 'moa-flex[dev]')")
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"{what} on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 before triton is "
            "first imported (tests/conftest.py does so when CUDA is unavailable)"
        )
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{what} runs on CUDA (or CPU under the interpreter), got {x.device}")


def _outputs(x: torch.Tensor, widths: Sequence[int], out: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """Fresh outputs [M, N_i] in x's dtype, or check the given ones (contiguous, written entirely)."""
    M = x.shape[0]
    if out is None:
        return [torch.empty(M, n, device=x.device, dtype=x.dtype) for n in widths]
    if len(out) != len(widths):
        raise ValueError(f"out must hold {len(widths)} tensors, got {len(out)}")
    for i, (o, n) in enumerate(zip(out, widths)):
        if o.shape != (M, n) or o.dtype != x.dtype or o.device != x.device or not o.is_contiguous():
            raise ValueError(
                f"out[{i}] must be contiguous [M, N] = [{M}, {n}] {x.dtype} on {x.device}, "
                f"got {tuple(o.shape)} {o.dtype} on {o.device}"
            )
    return list(out)


def _tiles(x: torch.Tensor, widths: Sequence[int], gated: bool, config: LinearConfig | None) -> LinearConfig:
    cfg = config or linear_config(x.shape[0], widths, x.shape[1], x.dtype, sm_count(x.device), gated)
    cfg.check()
    return cfg


def grouped_linear_triton(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    *,
    out: Sequence[torch.Tensor] | None = None,
    config: LinearConfig | None = None,
) -> list[torch.Tensor]:
    """The kernel: x [M, K], 1..3 weights [N_i, K] -> [x @ W_i^T] ([M, N_i], x's dtype), one launch
    (two with split K). ``out`` (contiguous [M, N_i]) is written entirely; ``config`` overrides
    :func:`linear_config`. CUDA tensors run compiled, CPU tensors in Triton's interpreter.
    """
    check_linear_inputs(x, weights, "grouped_linear_triton")
    if x.dim() != 2:
        raise ValueError(f"grouped_linear_triton: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check_triton_device(x, "grouped_linear_triton")
    widths = [w.shape[0] for w in weights]
    outs = _outputs(x, widths, out)
    _launch(x.contiguous(), [w.contiguous() for w in weights], outs, False, _tiles(x, widths, False, config))
    return outs


def gated_mlp_triton(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: LinearConfig | None = None,
) -> torch.Tensor:
    """The kernel: x [M, K], w_gate and w_up [N, K] -> silu(x W_gate^T) * (x W_up^T) [M, N] in x's
    dtype, one launch (two with split K). ``out`` (contiguous [M, N]) is written entirely;
    ``config`` overrides :func:`linear_config`.
    """
    check_gated_inputs(x, w_gate, w_up)
    if x.dim() != 2:
        raise ValueError(f"gated_mlp_triton: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check_triton_device(x, "gated_mlp_triton")
    widths = [w_gate.shape[0]]
    outs = _outputs(x, widths, None if out is None else [out])
    _launch(x.contiguous(), [w_gate.contiguous(), w_up.contiguous()], outs, True, _tiles(x, widths, True, config))
    return outs[0]


# ---------------------------------------------------------------------------------- public
def _uses_kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[x @ w.T for w in weights]``, x [..., K] -> [..., N_i]: the kernel on CUDA (and CPU under
    Triton's interpreter), else the twin."""
    check_linear_inputs(x, weights)
    if not _uses_kernel(x):
        return grouped_linear_reference(x, weights)
    lead = x.shape[:-1]
    ys = grouped_linear_triton(x.reshape(-1, x.shape[-1]), weights)
    return [y.view(*lead, y.shape[-1]) for y in ys]


def gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``silu(x @ w_gate.T) * (x @ w_up.T)``, x [..., K] -> [..., N]: the kernel on CUDA (and CPU
    under Triton's interpreter), else the twin."""
    check_gated_inputs(x, w_gate, w_up)
    if not _uses_kernel(x):
        return gated_mlp_reference(x, w_gate, w_up)
    y = gated_mlp_triton(x.reshape(-1, x.shape[-1]), w_gate, w_up)
    return y.view(*x.shape[:-1], y.shape[-1])
