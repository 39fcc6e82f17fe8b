"""Attention influence by distance: the math of the MoA profiler (docs/DESIGN.md, "Profiling").

For one head and query row ``i`` (A = softmax row, O = output, dO = dL/dO):

    G_ij = dO_i . v_j        D_i = dO_i . O_i
    E_ij = -A_ij (G_ij - D_i) / (1 - A_ij)      (first-order loss change if (i, j) is masked
                                                 and row i renormalized)

``|E_ij|`` of every causal pair with ``j >= sink`` is accumulated into distance bins of width
``span_multiple``: bin ``(i - j) // span_multiple``; pairs with ``j < sink`` go to the sink's
share. Per profiled length N this gives a histogram ``[L, H, ceil(N / span_multiple)]`` (query
heads; GQA models: the optimizer sums a KV group) and a sink share ``[L, H]``, both float64,
in loss units (nats of the mean answer cross-entropy of one sample), averaged over samples.

A rule of span S drops exactly the pairs with ``j >= sink`` and ``i - j >= S - sink``, so its
loss is the suffix sum of the histogram from bin ``(S - sink) / span_multiple``
(:func:`dropped_loss`); this is exact when ``S - sink`` is a multiple of ``span_multiple``
(true of every plan span when sink is a multiple of span_multiple), and refused otherwise.

Edge cases of the formula, applied identically by every implementation:

* Row 0 has a single key: masking it leaves nothing to renormalize, so ``E_0j = 0``.
* ``A_ij -> 1``: ``(G_ij - D_i) / (1 - A_ij)`` has a finite limit (the A-weighted mean of
  ``G_ij - G_ik`` over the other keys) but both factors lose all precision; the denominator is
  floored at :data:`ONE_MINUS_A_MIN`, so such pairs get a finite (damped) value, never inf/NaN.

Three implementations of the histogram: :func:`influence_reference` (float64, the whole
N x N matrix, the tests' oracle), :func:`influence_chunked` (query x key tiles in torch, fp32
accumulation; the CPU path) and the Triton kernel of :mod:`moa_flex.kernels.influence` (CUDA).
None but the reference ever holds an N x N tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moa_flex.kernels.influence import ONE_MINUS_A_MIN, check_binning, check_shapes, num_bins

__all__ = ["ONE_MINUS_A_MIN", "dropped_loss", "influence_chunked", "influence_histogram", "influence_matrix",
           "influence_reference", "num_bins", "row_lse_chunked"]


def influence_matrix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor, scale: float) -> torch.Tensor:
    """Signed E [H, N, N] in float64 straight from the formula (zero above the diagonal and in
    row 0). Test oracle: materializes N x N per head."""
    H, KVH, N = check_shapes(q, k, v, o, do)
    kk = k.double().repeat_interleave(H // KVH, 0)
    vv = v.double().repeat_interleave(H // KVH, 0)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    g = do.double() @ vv.transpose(-1, -2)
    d = (do.double() * o.double()).sum(-1, keepdim=True)
    e = -a * (g - d) / (1 - a).clamp_min(ONE_MINUS_A_MIN)
    valid = causal.clone()
    valid[0] = False
    return torch.where(valid, e, torch.zeros((), dtype=e.dtype, device=e.device))


def influence_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
    *, scale: float, sink: int, span_multiple: int, nbins: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive O(N^2) histogram: (hist [H, nbins], sink share [H]), float64. Bin b sums |E_ij| over
    causal pairs with j >= sink and (i - j) // span_multiple == b. Test oracle."""
    check_binning(sink, span_multiple)
    e = influence_matrix(q, k, v, o, do, scale).abs()
    N = q.shape[1]
    nbins = num_bins(N, span_multiple) if nbins is None else nbins
    i = torch.arange(N, device=q.device).view(-1, 1)
    j = torch.arange(N, device=q.device).view(1, -1)
    causal = j <= i
    hist = torch.zeros(q.shape[0], nbins, dtype=torch.float64, device=q.device)
    for b in range(min(nbins, num_bins(N, span_multiple))):
        in_bin = causal & (j >= sink) & ((i - j) // span_multiple == b)
        hist[:, b] = e[:, in_bin].sum(-1)
    sink_share = e[:, causal & (j < sink)].sum(-1)
    return hist, sink_share


def row_lse_chunked(q: torch.Tensor, k: torch.Tensor, scale: float, block_q: int = 128, block_k: int = 128) -> torch.Tensor:
    """Causal row log-sum-exp of ``scale * q.k`` [H, N] (natural log, fp32 or wider), in tiles."""
    H, N, D = q.shape
    KVH = k.shape[0]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).view(KVH, H // KVH, N, D)
    kf = k.to(dtype)
    lse = torch.full((KVH, H // KVH, N), float("-inf"), dtype=dtype, device=q.device)
    for i0 in range(0, N, block_q):
        i1 = min(i0 + block_q, N)
        i = torch.arange(i0, i1, device=q.device).view(-1, 1)
        acc = lse[:, :, i0:i1]
        for j0 in range(0, i1, block_k):
            j1 = min(j0 + block_k, i1)
            j = torch.arange(j0, j1, device=q.device).view(1, -1)
            s = (qg[:, :, i0:i1] @ kf[:, None, j0:j1].transpose(-1, -2)) * scale
            s = s.masked_fill(j > i, float("-inf"))
            acc = torch.logaddexp(acc, torch.logsumexp(s, dim=-1))
        lse[:, :, i0:i1] = acc
    return lse.reshape(H, N)


def influence_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
    *, scale: float, sink: int, span_multiple: int, nbins: int | None = None,
    lse: torch.Tensor | None = None, block_q: int = 128, block_k: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled histogram in torch: (hist [H, nbins], sink share [H]) in fp32 (float64 for float64
    inputs). Query tiles x key tiles (block_q x block_k tokens), two passes (row lse, then E);
    never an N x N tensor. ``lse``: the causal row log-sum-exp [H, N] if already known."""
    H, KVH, N = check_shapes(q, k, v, o, do)
    check_binning(sink, span_multiple)
    nbins = num_bins(N, span_multiple) if nbins is None else nbins
    G = H // KVH
    dtype = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    if lse is None:
        lse = row_lse_chunked(q, k, scale, block_q, block_k)
    qg, dog = (t.to(dtype).view(KVH, G, N, -1) for t in (q, do))
    kf, vf = k.to(dtype), v.to(dtype)
    lse_g = lse.to(dtype).view(KVH, G, N)
    delta = (do.to(dtype) * o.to(dtype)).sum(-1).view(KVH, G, N)
    hist = torch.zeros(H, nbins + 1, dtype=dtype, device=dev)  # last slot: masked pairs
    sink_share = torch.zeros(H, dtype=dtype, device=dev)
    for i0 in range(0, N, block_q):
        i1 = min(i0 + block_q, N)
        i = torch.arange(i0, i1, device=dev).view(-1, 1)
        for j0 in range(0, i1, block_k):
            j1 = min(j0 + block_k, i1)
            j = torch.arange(j0, j1, device=dev).view(1, -1)
            s = (qg[:, :, i0:i1] @ kf[:, None, j0:j1].transpose(-1, -2)) * scale
            a = torch.exp(s - lse_g[:, :, i0:i1, None])
            g = dog[:, :, i0:i1] @ vf[:, None, j0:j1].transpose(-1, -2)
            e = (a * (g - delta[:, :, i0:i1, None]) / (1 - a).clamp_min(ONE_MINUS_A_MIN)).abs()
            valid = (j <= i) & (i > 0)
            e = torch.where(valid, e, torch.zeros((), dtype=dtype, device=dev)).reshape(H, i1 - i0, j1 - j0)
            if j0 < sink:
                sink_share += e[:, :, : max(0, min(sink, j1) - j0)].sum((-1, -2))
            bins = torch.where(valid & (j >= sink), (i - j) // span_multiple, nbins).clamp(max=nbins)
            hist.index_add_(1, bins.flatten(), e.reshape(H, -1))
    return hist[:, :nbins], sink_share


def influence_histogram(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
    *, scale: float, sink: int, span_multiple: int, nbins: int | None = None, impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Influence histogram of one attention call: (hist [H, nbins], sink share [H]).

    q, o, do: [H, N, D] (query heads), k, v: [KVH, N, D]; causal attention, no padding;
    ``scale`` multiplies q.k. ``impl``: 'auto' (Triton on CUDA for fp16/bf16/fp32, chunked torch
    otherwise), 'triton', 'chunked' or 'reference' (O(N^2), tests only).
    """
    if nbins is not None and nbins < num_bins(q.shape[1], span_multiple):
        raise ValueError(f"nbins must be >= ceil(N / span_multiple) = {num_bins(q.shape[1], span_multiple)}, got {nbins}")
    if impl == "auto":
        impl = "triton" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) else "chunked"
    kw = dict(scale=scale, sink=sink, span_multiple=span_multiple, nbins=nbins)
    if impl == "chunked":
        return influence_chunked(q, k, v, o, do, **kw)
    if impl == "triton":
        from moa_flex.kernels.influence import influence_triton

        return influence_triton(q, k, v, o, do, **kw)
    if impl == "reference":
        return influence_reference(q, k, v, o, do, **kw)
    raise ValueError(f"impl must be 'auto', 'triton', 'chunked' or 'reference', got {impl!r}")


def dropped_loss(hist: torch.Tensor, spans: torch.Tensor | Sequence[int] | int, *, N: int, sink: int, span_multiple: int) -> torch.Tensor:
    """Loss of dropping what rules of the given spans drop at length N: suffix sums of ``hist``
    ([..., ceil(N / span_multiple)]) from bin (S - sink) / span_multiple. Returns [..., R] for R
    spans (tokens). Spans >= N drop nothing; spans <= sink drop every j >= sink pair. Exact,
    hence ``S - sink`` must be a multiple of span_multiple for sink < S < N (ValueError otherwise)."""
    check_binning(sink, span_multiple)
    nb = num_bins(N, span_multiple)
    if hist.shape[-1] != nb:
        raise ValueError(f"hist has {hist.shape[-1]} bins, expected ceil(N / span_multiple) = {nb} for N={N}")
    spans = torch.as_tensor(spans, dtype=torch.long).reshape(-1).cpu()
    window = spans - sink
    inexact = (spans < N) & (window > 0) & (window % span_multiple != 0)
    if bool(inexact.any()):
        bad = spans[inexact].tolist()
        raise ValueError(f"spans {bad} minus sink={sink} are not multiples of span_multiple={span_multiple}: "
                         "the histogram cannot split a bin")
    start = torch.where(spans >= N, torch.full_like(spans, nb), window.clamp(min=0) // span_multiple).clamp(max=nb)
    suffix = torch.cat([hist.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(hist[..., :1])], dim=-1)
    return suffix[..., start.to(hist.device)]
