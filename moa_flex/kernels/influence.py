"""Triton kernels of the influence histogram (the profiler's GPU path).

Twin of ``moa_flex.profile.influence.influence_chunked`` (same formula, same edge cases: row 0 gets
E = 0, 1 - A floored at ``ONE_MINUS_A_MIN``), tested against it on the GPU, or on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``).
Two launches per attention call, like a FlashAttention backward that recomputes the scores:

1. ``_lse_kernel``, one program per (query block, head): the causal row log-sum-exp of
   ``scale * q.k`` (log2 units), streaming key blocks with the online max/sum.
2. ``_influence_kernel``, one program per (block diagonal, head). Program ``delta`` walks the
   tiles (query block qb, key block qb - delta), qb = delta .. last, so every tile it visits
   has the same distance layout: element (r, c) is at distance delta * BLOCK + r - c. It
   therefore sums |E| tile after tile into one BLOCK x BLOCK register accumulator, and only at
   the end splits that accumulator into the few (at most NB_TILE) distance bins it covers,
   writing per-program partial sums [H, n_blocks, NB_TILE]; pairs with j < sink are summed
   apart (only in tiles that reach the sink). The host adds the partials into the histogram
   with one index_add. No atomics: the result is deterministic.

No N x N tensor exists anywhere; per head the kernels read q, k, v, dO (and O once, on the
host, for D_i = dO_i . O_i).
"""

from __future__ import annotations

import math
import os

import torch

LOG2E = 1.4426950408889634
ONE_MINUS_A_MIN = 1e-6  # floor of 1 - A_ij in the denominator of E_ij
_KERNELS: dict = {}


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor) -> tuple[int, int, int]:
    """q, o, do [H, N, D]; k, v [KVH, N, D] (one sample, no batch). Returns (H, KVH, N)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [heads, N, D] (one sample), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    H, N, _ = q.shape
    KVH = k.shape[0]
    if KVH < 1 or H % KVH:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({KVH})")
    if k.shape[1] != N or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k, v must be [{KVH}, {N}, D] like q's length, got {tuple(k.shape)}, {tuple(v.shape)}")
    if o.shape != (H, N, v.shape[2]) or do.shape != o.shape:
        raise ValueError(f"o and do must be [{H}, {N}, {v.shape[2]}], got {tuple(o.shape)}, {tuple(do.shape)}")
    return H, KVH, N


def check_binning(sink: int, span_multiple: int) -> None:
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be an integer >= 0 (tokens), got {sink!r}")
    if isinstance(span_multiple, bool) or not isinstance(span_multiple, int) or span_multiple < 1:
        raise ValueError(f"span_multiple must be an integer >= 1 (tokens), got {span_multiple!r}")


def num_bins(N: int, span_multiple: int) -> int:
    """Distance bins of a length-N histogram: ceil(N / span_multiple)."""
    return -(-N // span_multiple)


def _kernels() -> tuple:
    """The jitted kernels, built on first use (importing this module does not import triton).
    For the interpreter, TRITON_INTERPRET=1 must be set before triton is first imported (the
    tests' conftest does it); the cache is keyed by the setting anyway."""
    key = os.environ.get("TRITON_INTERPRET") == "1"
    if key in _KERNELS:
        return _KERNELS[key]
    import triton
    import triton.language as tl

    @triton.jit
    def _lse_kernel(
        Q, K, LSE, N, qk_scale,
        s_qh, s_qn, s_kh, s_kn, GROUP,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        qb = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        r = tl.arange(0, BLOCK)
        dd = tl.arange(0, D_PAD)
        i = qb * BLOCK + r
        q = tl.load(Q + h * s_qh + i[:, None] * s_qn + dd[None, :], mask=(i[:, None] < N) & (dd[None, :] < HEAD_DIM), other=0.0)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK], tl.float32)
        hi = tl.minimum((qb + 1) * BLOCK, N)
        for j0 in range(0, hi, BLOCK):
            j = j0 + r
            k = tl.load(K + kvh * s_kh + j[:, None] * s_kn + dd[None, :], mask=(j[:, None] < N) & (dd[None, :] < HEAD_DIM), other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(j[None, :] <= i[:, None], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite: key 0 is in the first tile of every row
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
        tl.store(LSE + h * N + i, m + tl.log2(l), mask=i < N)

    @triton.jit
    def _influence_kernel(
        Q, K, V, DO, LSE, DELTA, PART, SINKP, N, qk_scale, eps,
        s_qh, s_qn, s_kh, s_kn, s_vh, s_vn, s_oh, s_on, GROUP, N_BLOCKS, SINK,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, SM: tl.constexpr,
        NB_TILE: tl.constexpr, IEEE: tl.constexpr,
    ):
        delta = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        r = tl.arange(0, BLOCK)
        dd = tl.arange(0, D_PAD)
        dmask = dd[None, :] < HEAD_DIM
        acc = tl.zeros([BLOCK, BLOCK], tl.float32)
        sink_acc = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        for qb in range(delta, N_BLOCKS):
            i = qb * BLOCK + r
            j = (qb - delta) * BLOCK + r
            imask = i[:, None] < N
            q = tl.load(Q + h * s_qh + i[:, None] * s_qn + dd[None, :], mask=imask & dmask, other=0.0)
            do = tl.load(DO + h * s_oh + i[:, None] * s_on + dd[None, :], mask=imask & dmask, other=0.0)
            k = tl.load(K + kvh * s_kh + j[:, None] * s_kn + dd[None, :], mask=(j[:, None] < N) & dmask, other=0.0)
            v = tl.load(V + kvh * s_vh + j[:, None] * s_vn + dd[None, :], mask=(j[:, None] < N) & dmask, other=0.0)
            lse = tl.load(LSE + h * N + i, mask=i < N, other=0.0)
            dlt = tl.load(DELTA + h * N + i, mask=i < N, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
                g = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
                g = tl.dot(do, tl.trans(v))
            valid = (j[None, :] <= i[:, None]) & (i[:, None] < N) & (i[:, None] > 0)
            a = tl.exp2(tl.where(valid, s * qk_scale - lse[:, None], float("-inf")))
            e = tl.abs(a * (g - dlt[:, None]) / tl.maximum(1.0 - a, eps))
            e = tl.where(valid, e, 0.0)
            if (qb - delta) * BLOCK < SINK:
                in_sink = j[None, :] < SINK
                sink_acc += tl.sum(tl.sum(tl.where(in_sink, e, 0.0), 1), 0)
                e = tl.where(in_sink, 0.0, e)
            acc += e
        dist = tl.maximum(delta * BLOCK + r[:, None] - r[None, :], 0)
        first = tl.maximum(delta * BLOCK - (BLOCK - 1), 0) // SM
        rel = dist // SM - first
        for t in tl.static_range(NB_TILE):
            part = tl.sum(tl.sum(tl.where(rel == t, acc, 0.0), 1), 0)
            tl.store(PART + (h * N_BLOCKS + delta) * NB_TILE + t, part)
        tl.store(SINKP + h * N_BLOCKS + delta, sink_acc)

    _KERNELS[key] = (_lse_kernel, _influence_kernel)
    return _KERNELS[key]


def _d_pad(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def row_lse_triton(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = 64) -> torch.Tensor:
    """Causal row log-sum-exp of ``scale * q.k`` [H, N], natural log, fp32 (q [H, N, D], k [KVH, N, D])."""
    return _lse2(q, k, scale, block) / LOG2E


def _lse2(q: torch.Tensor, k: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    lse_kernel, _ = _kernels()
    H, N, D = q.shape
    q, k = q.contiguous(), k.contiguous()
    lse = torch.empty(H, N, dtype=torch.float32, device=q.device)
    lse_kernel[(math.ceil(N / block), H)](
        q, k, lse, N, scale * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1), H // k.shape[0],
        HEAD_DIM=D, D_PAD=_d_pad(D), BLOCK=block, IEEE=q.dtype == torch.float32,
    )
    return lse


def influence_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
    *, scale: float, sink: int, span_multiple: int, nbins: int | None = None, block: int = 64, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Influence histogram with the Triton kernels: (hist [H, nbins], sink share [H]), fp32.

    q, o, do [H, N, D]; k, v [KVH, N, D]; fp16, bf16 or fp32 (fp32 dots in IEEE precision, not
    TF32). ``block`` (tokens, >= 16, power of 2) is the square tile; ``num_warps`` defaults to
    8 for head dims above 64, else 4. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    H, KVH, N = check_shapes(q, k, v, o, do)
    check_binning(sink, span_multiple)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"influence_triton takes fp16, bf16 or fp32 tensors, got {q.dtype}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of 2 >= 16 tokens, got {block}")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("influence_triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    nbins = num_bins(N, span_multiple) if nbins is None else nbins
    if num_warps is None:
        num_warps = 8 if q.shape[2] > 64 else 4
    _, kernel = _kernels()
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    lse2 = _lse2(q, k, scale, block)
    delta = (do.float() * o.float()).sum(-1).contiguous()  # D_i = dO_i . O_i, [H, N]
    n_blocks = math.ceil(N / block)
    nb_tile = (2 * block - 2) // span_multiple + 2
    part = torch.zeros(H, n_blocks, nb_tile, dtype=torch.float32, device=q.device)
    sinkp = torch.zeros(H, n_blocks, dtype=torch.float32, device=q.device)
    kernel[(n_blocks, H)](
        q, k, v, do, lse2, delta, part, sinkp, N, scale * LOG2E, ONE_MINUS_A_MIN,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        H // KVH, n_blocks, sink,
        HEAD_DIM=q.shape[2], D_PAD=_d_pad(q.shape[2]), BLOCK=block, SM=span_multiple, NB_TILE=nb_tile,
        IEEE=q.dtype == torch.float32, num_warps=num_warps,
    )
    d0 = torch.arange(n_blocks, device=q.device) * block
    first = (d0 - (block - 1)).clamp(min=0) // span_multiple
    idx = (first[:, None] + torch.arange(nb_tile, device=q.device)).clamp(max=nbins).flatten()
    hist = torch.zeros(H, nbins + 1, dtype=torch.float32, device=q.device)
    hist.index_add_(1, idx, part.reshape(H, -1))
    return hist[:, :nbins], sinkp.sum(1)
