"""Profiling inside a transformers model: attention whose backward adds the influence histogram.

An attention implementation registered with transformers' AttentionInterface
(:data:`PROFILE_ATTENTION`) runs exact causal SDPA forward; its backward computes the input
gradients and adds the layer's histogram (:func:`moa_flex.profile.influence.influence_histogram`)
from q, k, v, O, dO. Weights are frozen, gradients flow to the input embeddings only, decoder
layers are checkpointed, and only the answer positions' logits are computed.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch

from moa_flex.architecture import index_ring_width, key_bias_limit, model_windows, slots_in_call_order
from moa_flex.data.samples import Sample
from moa_flex.plan import ModelShape

from .influence import check_binning, influence_histogram, num_bins
from .store import Profile, data_hash, model_fingerprint

PROFILE_ATTENTION = "moa_flex_profile"


class _Session:
    """Per-sample histogram buffers [L, H, nbins] and [L, H] the attention backward adds to."""

    def __init__(self, shape: ModelShape, nbins: int, sink: int, span_multiple: int, impl: str, device: torch.device) -> None:
        self.sink, self.span_multiple, self.nbins, self.impl = sink, span_multiple, nbins, impl
        self.shape = shape  # a hybrid's attention layers map to plan layers (shape.plan_layer)
        L, H = shape.num_layers, shape.num_heads
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


def check_finite(hist: torch.Tensor, sink_share: torch.Tensor, length: int) -> None:
    """ValueError naming the layers whose influence at ``length`` tokens is not finite (a model
    whose gradients overflow or are undefined, e.g. NaN from its own code): a plan built on it
    would rank rules on garbage."""
    bad = sorted({int(i) for t in (hist, sink_share) for i in (~torch.isfinite(t)).nonzero()[:, 0].tolist()})
    if bad:
        raise ValueError(f"the attention influence of layers {bad} at {length} tokens is not finite (NaN or inf): the "
                         "model's gradients on its own answers are not usable there, so no plan can be built from them")


def _profile_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function of :data:`PROFILE_ATTENTION`: query [1, H, N, D] (or the
    last M <= N positions' queries), key/value [1, KVH, N, D] -> output [1, N (M), H, D]. Only
    plain causal attention of one unpadded sample; anything else raises."""
    if kwargs.get("softcap"):
        raise ValueError("moa-flex profiling does not support attention logit soft-capping (Gemma 2)")
    if kwargs.get("indices") is not None:
        raise ValueError("moa-flex profiling measures plain causal attention; this call attends keys an indexer "
                         "selected (DeepSeek Sparse Attention)")
    if attention_mask is not None:
        raise ValueError("moa-flex profiling supports plain causal attention of one unpadded sample; the model "
                         "built an attention mask (its own sliding window, padding, or a cache?)")
    if query.shape[0] != 1 or query.shape[2] > key.shape[2]:
        raise ValueError(f"moa-flex profiling runs one sample without cache; got query {tuple(query.shape)}, key {tuple(key.shape)}")
    # fewer queries than keys: the last positions' only (Gemma 4's KV-sharing layers run the
    # positions whose logits are kept; no other row of theirs reaches the loss): padded in front
    # with zero queries, whose outputs are dropped, so their rows get no gradient and no influence
    skipped = key.shape[2] - query.shape[2]
    if skipped:
        query = torch.cat([query.new_zeros(1, query.shape[1], skipped, query.shape[3]), query], dim=2)
    if dropout:
        raise ValueError(f"attention dropout must be 0 while profiling, got {dropout}")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    layer = _SESSION.shape.plan_layer(int(module.layer_idx)) if _SESSION is not None else int(module.layer_idx)
    out = _InfluenceAttention.apply(query, key, value, scale, layer)
    return out[:, :, skipped:].transpose(1, 2).contiguous(), None


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
        raise ValueError("sample has no answer tokens: run moa_flex.data.calibration.answer_samples first")
    device = next(model.parameters()).device
    ids = sample.input_ids.to(device).unsqueeze(0)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    A = sample.answer.numel()
    logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=A + 1).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), sample.answer.to(device))


def _check_profilable(model: torch.nn.Module, max_len: int) -> None:
    config = model.config
    if getattr(model, "moa_flex", None) is not None:
        raise ValueError("profile the dense model: call moa_flex.uncompile(model) first")
    if model.training:
        raise ValueError("profile_model expects model.eval() (no dropout)")
    if slots_in_call_order(model):  # the influence is credited to module.layer_idx, one call per layer
        raise ValueError(f"{type(model).__name__} runs its attention modules several times per forward, each call on a "
                         "cache slot of its own (HRM's cycles, some under torch.no_grad; Dory's recurrent loops): "
                         "moa-flex profiling credits one call per attention module; compile such a model with a plan "
                         "made without profiling (Plan.uniform, or a rule per slot by hand)")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError("moa-flex profiling does not support attention logit soft-capping (config.attn_logit_softcapping)")
    if ModelShape.from_config(config).layer_heads is not None:
        raise ValueError(f"{type(model).__name__}'s attention layers differ in query heads (dots3's sliding layers), "
                         "which moa-flex profiling does not carry (its histograms are one [layers, heads] table): "
                         "compile such a model with a plan made without profiling (Plan.uniform, or rules by hand)")
    if index_ring_width(config) is not None:
        raise ValueError(f"{type(model).__name__} selects each query's keys with an indexer (DeepSeek Sparse Attention, "
                         "Qwen4-Exp's blocks), "
                         "which moa-flex profiling does not carry (it measures plain causal attention): compile such a "
                         "model with a plan made without profiling (Plan.uniform, or rules by hand)")
    if key_bias_limit(config) is not None:
        raise ValueError(f"{type(model).__name__} adds a per-key score bias (Doge's dynamic mask), which moa-flex "
                         "profiling does not carry (it measures plain causal attention): compile such a model with a "
                         "plan made without profiling (Plan.uniform, or rules by hand)")
    shape = ModelShape.from_config(config)
    for layer, w in enumerate(model_windows(config, shape)):
        if w is not None and abs(w) < max_len:
            what = "sliding window" if w > 0 else "local attention chunk"
            raise ValueError(f"layer {layer} has its own {what} of {abs(w)} tokens < profiled length {max_len}; "
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
        _SESSION = session = _Session(shape, num_bins(N, span_multiple), sink, span_multiple, impl, device)
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
    (``moa_flex.data.calibration.calibration_set``); ``lengths`` picks some of them (default all).
    One sample at a time: the mean cross-entropy of its answer tokens is back-propagated to the
    input embeddings (weights frozen), each decoder layer checkpointed (``checkpointing``), and
    every attention backward adds its histogram; the histograms are averaged over the samples.

    ``checkpoint_path``: the profile so far is saved there after each finished length, and a
    run finding it resumes after the lengths it holds (same model, data, sink, span_multiple;
    ValueError otherwise). ``impl``: see :func:`influence_histogram`.
    """
    from tqdm import tqdm

    check_binning(sink, span_multiple)
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
            check_finite(h, s, N)
            profile.hist[N], profile.sink_share[N], profile.num_samples[N] = h, s, len(used[N])
            if checkpoint_path is not None:
                profile.save(checkpoint_path)
    return profile
