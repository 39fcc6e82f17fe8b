"""The MoA profiler: how much the loss depends on each attention distance, per head.

For one head and query row ``i`` (A = softmax row, O = output, dO = dL/dO; DESIGN.md):

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
accumulation; the CPU path) and the Triton kernel of ``moa_flex.kernels.influence`` (CUDA).
None but the reference ever holds an N x N tensor.

In the model, an attention implementation registered with transformers' AttentionInterface
(:data:`PROFILE_ATTENTION`) runs exact causal SDPA forward; its backward computes the input
gradients and adds the layer's histogram from q, k, v, O, dO. Weights are frozen, gradients
flow to the input embeddings only, decoder layers are checkpointed, and only the answer
positions' logits are computed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .calibration import Sample
from .plan import ModelShape

FORMAT = "moa-flex.profile/1"
PROFILE_ATTENTION = "moa_flex_profile"
ONE_MINUS_A_MIN = 1e-6  # floor of 1 - A_ij in the denominator of E_ij
HEADER_KEY = "moa-flex.profile"


# --------------------------------------------------------------------------------------------
# The influence histogram of one attention call: reference, chunked torch, dispatcher


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor) -> tuple[int, int, int]:
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


def _check_binning(sink: int, span_multiple: int) -> None:
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be an integer >= 0 (tokens), got {sink!r}")
    if isinstance(span_multiple, bool) or not isinstance(span_multiple, int) or span_multiple < 1:
        raise ValueError(f"span_multiple must be an integer >= 1 (tokens), got {span_multiple!r}")


def num_bins(N: int, span_multiple: int) -> int:
    """Distance bins of a length-N histogram: ceil(N / span_multiple)."""
    return -(-N // span_multiple)


def influence_matrix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor, scale: float) -> torch.Tensor:
    """Signed E [H, N, N] in float64 straight from the formula (zero above the diagonal and in
    row 0). Test oracle: materializes N x N per head."""
    H, KVH, N = _check_shapes(q, k, v, o, do)
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
    _check_binning(sink, span_multiple)
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
    H, KVH, N = _check_shapes(q, k, v, o, do)
    _check_binning(sink, span_multiple)
    nbins = num_bins(N, span_multiple) if nbins is None else nbins
    D, G = q.shape[2], H // KVH
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
        from .kernels.influence import influence_triton

        return influence_triton(q, k, v, o, do, **kw)
    if impl == "reference":
        return influence_reference(q, k, v, o, do, **kw)
    raise ValueError(f"impl must be 'auto', 'triton', 'chunked' or 'reference', got {impl!r}")


def dropped_loss(hist: torch.Tensor, spans: torch.Tensor | Sequence[int] | int, *, N: int, sink: int, span_multiple: int) -> torch.Tensor:
    """Loss of dropping what rules of the given spans drop at length N: suffix sums of ``hist``
    ([..., ceil(N / span_multiple)]) from bin (S - sink) / span_multiple. Returns [..., R] for R
    spans (tokens). Spans >= N drop nothing; spans <= sink drop every j >= sink pair. Exact,
    hence ``S - sink`` must be a multiple of span_multiple for sink < S < N (ValueError otherwise)."""
    _check_binning(sink, span_multiple)
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


# --------------------------------------------------------------------------------------------
# Profile: histograms per length, saved as safetensors + JSON header


@dataclass
class Profile:
    """Influence histograms of one model: per length N (tokens), ``hist[N]`` float64
    [L, H, ceil(N / span_multiple)] and ``sink_share[N]`` float64 [L, H] (query heads, loss
    units, averaged over ``num_samples[N]`` samples)."""

    model: ModelShape
    sink: int
    span_multiple: int
    hist: dict[int, torch.Tensor] = field(default_factory=dict)
    sink_share: dict[int, torch.Tensor] = field(default_factory=dict)
    num_samples: dict[int, int] = field(default_factory=dict)
    data_hash: str = ""
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_binning(self.sink, self.span_multiple)
        L, H = self.model.num_layers, self.model.num_heads
        if set(self.hist) != set(self.sink_share) or set(self.hist) != set(self.num_samples):
            raise ValueError("profile: hist, sink_share and num_samples must have the same lengths")
        for N, h in self.hist.items():
            expect = (L, H, num_bins(N, self.span_multiple))
            if tuple(h.shape) != expect:
                raise ValueError(f"profile.hist[{N}] has shape {tuple(h.shape)}, expected {expect}")
            if tuple(self.sink_share[N].shape) != (L, H):
                raise ValueError(f"profile.sink_share[{N}] has shape {tuple(self.sink_share[N].shape)}, expected {(L, H)}")

    @property
    def lengths(self) -> list[int]:
        """Profiled lengths (tokens), ascending."""
        return sorted(self.hist)

    def dropped_loss(self, N: int, spans: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """[L, H, R]: loss of each query head under each of R candidate spans (tokens) at length N."""
        if N not in self.hist:
            raise ValueError(f"length N={N} was not profiled; profiled: {self.lengths}")
        return dropped_loss(self.hist[N], spans, N=N, sink=self.sink, span_multiple=self.span_multiple)

    def head_loss(self, N: int, head_spans: torch.Tensor) -> torch.Tensor:
        """[L, H]: loss of each query head under its own span (e.g. ``plan.head_spans(N)``)."""
        L, H = self.model.num_layers, self.model.num_heads
        if tuple(head_spans.shape) != (L, H):
            raise ValueError(f"head_spans must be [{L}, {H}], got {tuple(head_spans.shape)}")
        per = self.dropped_loss(N, head_spans.reshape(-1))  # [L, H, L*H]
        return per.reshape(L * H, L * H).diagonal().reshape(L, H)

    def check_model(self, model: Any) -> None:
        """ValueError naming the field if ``model`` (HF model, config or ModelShape) is not the
        profiled one: attention shape always; weights fingerprint when given a model."""
        fp = ""
        if isinstance(model, ModelShape):
            shape = model
        elif isinstance(model, torch.nn.Module):
            shape = ModelShape.from_config(model.config)
            fp = model_fingerprint(model)
        else:
            shape = ModelShape.from_config(model)
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            mine, theirs = getattr(self.model, name), getattr(shape, name)
            if mine != theirs:
                raise ValueError(f"profile is for another model: model.{name} is {theirs}, the profile has {mine} "
                                 f"(profiled model {self.model.name!r})")
        if fp and self.fingerprint and fp != self.fingerprint:
            raise ValueError(f"profile is for another model: weights fingerprint {fp} differs from the profile's "
                             f"{self.fingerprint} (profiled model {self.model.name!r})")

    def header(self) -> dict:
        """The JSON header stored with the tensors."""
        m = self.model
        return {
            "format": FORMAT,
            "model": {"num_layers": m.num_layers, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
                      "head_dim": m.head_dim, "name": m.name},
            "sink": self.sink, "span_multiple": self.span_multiple, "lengths": self.lengths,
            "num_samples": {str(n): self.num_samples[n] for n in self.lengths},
            "data_hash": self.data_hash, "fingerprint": self.fingerprint, "dtype": "float64",
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors (``hist/N``, ``sink/N``) with the JSON header; atomic (temp + rename)."""
        from safetensors.torch import save_file

        tensors = {}
        for N in self.lengths:
            tensors[f"hist/{N}"] = self.hist[N].detach().to("cpu", torch.float64).contiguous()
            tensors[f"sink/{N}"] = self.sink_share[N].detach().to("cpu", torch.float64).contiguous()
        tmp = f"{os.fspath(path)}.tmp"
        save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(self.header())})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read a profile written by :meth:`save` (no pickle); ValueError if it is not one."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if HEADER_KEY not in meta:
                raise ValueError(f"{path} is not a moa-flex profile (no {HEADER_KEY!r} header)")
            header = json.loads(meta[HEADER_KEY])
            if header.get("format") != FORMAT:
                raise ValueError(f"{path}: format must be {FORMAT!r}, got {header.get('format')!r}")
            lengths = [int(n) for n in header["lengths"]]
            keys = set(f.keys())
            for N in lengths:
                for key in (f"hist/{N}", f"sink/{N}"):
                    if key not in keys:
                        raise ValueError(f"{path}: tensor {key!r} missing for length {N}")
            hist = {N: f.get_tensor(f"hist/{N}") for N in lengths}
            sink_share = {N: f.get_tensor(f"sink/{N}") for N in lengths}
        return cls(
            ModelShape(**header["model"]), int(header["sink"]), int(header["span_multiple"]), hist, sink_share,
            {int(n): int(c) for n, c in header["num_samples"].items()}, header.get("data_hash", ""),
            header.get("fingerprint", ""), header.get("meta", {}),
        )


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of the model's attention shape and a few weight values (first 64 of the first
    and last parameters), to tell apart models of the same shape."""
    s = ModelShape.from_config(model.config)
    h = hashlib.sha256(repr((s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim)).encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]):
        h.update(p.detach().reshape(-1)[:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def data_hash(samples: Mapping[int, Sequence[Sample]]) -> str:
    """Hash of the calibration data: lengths and every sample's tokens, in order."""
    h = hashlib.sha256()
    for N in sorted(samples):
        h.update(f"N={N};".encode())
        for s in samples[N]:
            for part in (s.head, s.context, s.question, s.answer):
                h.update(part.to(torch.int64).numpy().tobytes())
                h.update(b"|")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Inside the model: an attention implementation whose backward adds the layer's histogram


class _Session:
    """Per-sample histogram buffers [L, H, nbins] and [L, H] the attention backward adds to."""

    def __init__(self, L: int, H: int, nbins: int, sink: int, span_multiple: int, impl: str, device: torch.device) -> None:
        self.sink, self.span_multiple, self.nbins, self.impl = sink, span_multiple, nbins, impl
        self.hist = torch.zeros(L, H, nbins, dtype=torch.float64, device=device)
        self.sink_share = torch.zeros(L, H, dtype=torch.float64, device=device)
        self.calls = torch.zeros(L, dtype=torch.long)

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor, scale: float) -> None:
        hist, sink = influence_histogram(q, k, v, o, do, scale=scale, sink=self.sink, span_multiple=self.span_multiple,
                                         nbins=self.nbins, impl=self.impl)
        self.hist[layer] += hist.to(torch.float64)
        self.sink_share[layer] += sink.to(torch.float64)
        self.calls[layer] += 1


_SESSION: _Session | None = None


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention [B, H, N, D]; KV heads repeated (not enable_gqa) so that every
    SDPA backend, flash included, takes it."""
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, _repeat_kv(k, group), _repeat_kv(v, group), is_causal=True, scale=scale)


class _InfluenceAttention(torch.autograd.Function):
    """Causal attention whose backward also adds the layer's influence histogram."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer: int) -> torch.Tensor:
        o = _causal_sdpa(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o)
        ctx.scale, ctx.layer = scale, layer
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple:
        q, k, v, o = ctx.saved_tensors
        do = do.contiguous()
        if _SESSION is None:
            raise RuntimeError("moa-flex profile attention ran backward outside profile_model")
        _SESSION.add(ctx.layer, q[0], k[0], v[0], o[0], do[0], ctx.scale)
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = _causal_sdpa(qq, kk, vv, ctx.scale)
            dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
        return dq, dk, dv, None, None


def _profile_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function of :data:`PROFILE_ATTENTION`: query [1, H, N, D],
    key/value [1, KVH, N, D] -> output [1, N, H, D]. Only plain causal attention of one
    unpadded sample; anything else raises."""
    if kwargs.get("softcap"):
        raise ValueError("moa-flex profiling does not support attention logit soft-capping (Gemma 2)")
    if attention_mask is not None:
        raise ValueError("moa-flex profiling supports plain causal attention of one unpadded sample; the model "
                         "built an attention mask (its own sliding window, padding, or a cache?)")
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"moa-flex profiling runs one sample without cache; got query {tuple(query.shape)}, key {tuple(key.shape)}")
    if dropout:
        raise ValueError(f"attention dropout must be 0 while profiling, got {dropout}")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = _InfluenceAttention.apply(query, key, value, scale, int(module.layer_idx))
    return out.transpose(1, 2).contiguous(), None


def register_profile_attention() -> None:
    """Register :data:`PROFILE_ATTENTION` with transformers (attention and mask interfaces)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROFILE_ATTENTION, _profile_attention)
    AttentionMaskInterface.register(PROFILE_ATTENTION, sdpa_mask)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise TypeError(f"{type(model).__name__} has no transformers decoder layers (GradientCheckpointingLayer) to checkpoint")
    return layers


def _checkpointed(fn: Callable) -> Callable:
    import torch.utils.checkpoint

    def run(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


class _ProfilingMode:
    """Context: profile attention on, weights frozen, decoder layers checkpointed; all undone on exit."""

    def __init__(self, model: torch.nn.Module, checkpointing: bool) -> None:
        self.model, self.checkpointing = model, checkpointing

    def __enter__(self) -> "_ProfilingMode":
        m = self.model
        self.impl = m.config._attn_implementation
        self.grads = [p.requires_grad for p in m.parameters()]
        register_profile_attention()
        m.set_attn_implementation(PROFILE_ATTENTION)
        for p in m.parameters():
            p.requires_grad_(False)
        self.layers = _decoder_layers(m) if self.checkpointing else []
        for layer in self.layers:
            layer.forward = _checkpointed(layer.forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        for p, g in zip(self.model.parameters(), self.grads):
            p.requires_grad_(g)
        if self.model.config._attn_implementation != self.impl:
            self.model.set_attn_implementation(self.impl)


def answer_loss(model: torch.nn.Module, sample: Sample) -> torch.Tensor:
    """Mean cross-entropy (nats per token) of the sample's answer tokens given everything before
    them, computed from input embeddings that require grad; logits only for the answer."""
    if sample.answer.numel() == 0:
        raise ValueError("sample has no answer tokens: run moa_flex.calibration.answer_samples first")
    device = next(model.parameters()).device
    ids = sample.input_ids.to(device).unsqueeze(0)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    A = sample.answer.numel()
    logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=A + 1).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), sample.answer.to(device))


def _check_profilable(model: torch.nn.Module, max_len: int) -> None:
    from .compile import model_windows

    config = model.config
    if getattr(model, "moa_flex", None) is not None:
        raise ValueError("profile the dense model: call moa_flex.uncompile(model) first")
    if model.training:
        raise ValueError("profile_model expects model.eval() (no dropout)")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError("moa-flex profiling does not support attention logit soft-capping (config.attn_logit_softcapping)")
    L = ModelShape.from_config(config).num_layers
    for layer, w in enumerate(model_windows(config, L)):
        if w is not None and w < max_len:
            raise ValueError(f"layer {layer} has its own sliding window of {w} tokens < profiled length {max_len}; "
                             "profiling supports plain causal attention only")


def _profile_length(model: torch.nn.Module, samples: Sequence[Sample], N: int, sink: int, span_multiple: int,
                    impl: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean histogram [L, H, nbins] and sink share [L, H] over the samples of length N."""
    from tqdm import tqdm

    global _SESSION
    shape = ModelShape.from_config(model.config)
    device = next(model.parameters()).device
    total_h = torch.zeros(shape.num_layers, shape.num_heads, num_bins(N, span_multiple), dtype=torch.float64)
    total_s = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.float64)
    for sample in tqdm(samples, desc=f"N={N} samples", leave=False, disable=not progress):
        if sample.num_tokens > N:
            raise ValueError(f"a sample of {sample.num_tokens} tokens is in the bucket of length {N}")
        _SESSION = session = _Session(shape.num_layers, shape.num_heads, num_bins(N, span_multiple), sink, span_multiple, impl, device)
        try:
            answer_loss(model, sample).backward()
        finally:
            _SESSION = None
        if not bool((session.calls == 1).all()):
            raise RuntimeError(f"expected one attention backward per layer, got {session.calls.tolist()}")
        total_h += session.hist.cpu()
        total_s += session.sink_share.cpu()
    return total_h / len(samples), total_s / len(samples)


def profile_model(
    model: torch.nn.Module,
    samples: Mapping[int, Sequence[Sample]],
    lengths: Sequence[int] | None = None,
    *,
    sink: int = 64,
    span_multiple: int = 64,
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    impl: str = "auto",
    checkpointing: bool = True,
) -> Profile:
    """Profile a dense HF causal LM (eval mode) on calibration samples.

    ``samples`` maps each length N (tokens) to its answered samples, each of at most N tokens
    (``moa_flex.calibration.calibration_set``); ``lengths`` picks some of them (default all).
    One sample at a time: the mean cross-entropy of its answer tokens is back-propagated to the
    input embeddings (weights frozen), each decoder layer checkpointed (``checkpointing``), and
    every attention backward adds its histogram; the histograms are averaged over the samples.

    ``checkpoint_path``: the profile so far is saved there after each finished length, and a
    run finding it resumes after the lengths it holds (same model, data, sink, span_multiple;
    ValueError otherwise). ``impl``: see :func:`influence_histogram`.
    """
    from tqdm import tqdm

    _check_binning(sink, span_multiple)
    if not isinstance(samples, Mapping):
        raise TypeError(f"samples must map length N -> list of Sample (calibration_set), got {type(samples).__name__}")
    lengths = sorted(samples) if lengths is None else sorted(int(n) for n in lengths)
    for N in lengths:
        if N not in samples or not samples[N]:
            raise ValueError(f"no samples for length {N}; lengths with samples: {sorted(n for n in samples if samples[n])}")
    if not lengths:
        raise ValueError("lengths is empty")
    _check_profilable(model, max(lengths))
    used = {N: samples[N] for N in lengths}
    profile = Profile(ModelShape.from_config(model.config), sink, span_multiple, data_hash=data_hash(used),
                      fingerprint=model_fingerprint(model))
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        done = Profile.load(checkpoint_path)
        done.check_model(model)
        for name in ("sink", "span_multiple", "data_hash"):
            if getattr(done, name) != getattr(profile, name):
                raise ValueError(f"checkpoint {checkpoint_path} has {name}={getattr(done, name)!r}, this run "
                                 f"{getattr(profile, name)!r}; delete it to start over")
        for N in done.lengths:
            profile.hist[N], profile.sink_share[N], profile.num_samples[N] = done.hist[N], done.sink_share[N], done.num_samples[N]
    with _ProfilingMode(model, checkpointing):
        for N in tqdm(lengths, desc="profile lengths", disable=not progress):
            if N in profile.hist:
                continue
            h, s = _profile_length(model, used[N], N, sink, span_multiple, impl, progress)
            profile.hist[N], profile.sink_share[N], profile.num_samples[N] = h, s, len(used[N])
            if checkpoint_path is not None:
                profile.save(checkpoint_path)
    return profile
