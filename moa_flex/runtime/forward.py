"""The compiled model's forward: a plain call (no cache, or a prefill) or a decode step.

``moa_flex.compile`` replaces ``model.forward`` by :func:`forward` (bound to the model's
:class:`~moa_flex.runtime.state.CompiledState`). Calls without a
:class:`~moa_flex.runtime.cache.MoaCache` run the prefill graph; calls with one run the prefill
graph once (planned for the cache's length), then one decode graph per step, replayed from a
captured CUDA graph once the steps are steady (:mod:`moa_flex.runtime.step_graph`).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from typing import Any

import torch
import torch.fx.experimental._config as fx_config

from moa_flex.architecture import STATE_LAYER_TYPES, index_ring_width, layer_types, sequence_mask, text_config

from .cache import MoaCache
from .multimodal import check_image_prefix, check_token_types
from .state import CompiledState
from .step_graph import StepGraph, graph_device, step_signature


def dynamo_policy() -> Any:
    """Around every compiled call: room for moa-flex's graphs (all HF forwards share one code
    object, so several compiled models share dynamo's per-code recompile limit), an error
    instead of dynamo's silent eager fallback (which would run dense attention), and no duck
    sizing of the cache's shapes."""
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    stack = contextlib.ExitStack()
    # specialize_float: a float (an attention scale) left symbolic makes AOTAutograd restart the whole
    # analysis once (TensorifyScalarRestartAnalysis), tracing every graph twice
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True,
                                                   specialize_float=True))
    # No "duck sizing": equal cache widths across layers (a dense plan) must not become guards
    # that a plan with other widths then fails, recompiling the model.
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    stack.enter_context(_untraceable_named())
    return stack


@contextlib.contextmanager
def _untraceable_named() -> Any:
    """Dynamo's "cannot trace" as moa-flex's refusal: the rewrite needs the whole forward as
    one graph (fullgraph), so a model Dynamo cannot trace is one moa-flex cannot compile. A
    refusal of the passes reaches the caller as itself, not wrapped in Dynamo's
    BackendCompilerFailed."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as e:  # the passes' own refusal, unwrapped
        inner = getattr(e, "inner_exception", None)
        if isinstance(inner, (ValueError, NotImplementedError, TypeError)):
            raise inner from e
        raise
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:  # UserError: data-dependent control flow
        raised = re.search(r"raised exception (.+)", str(e))  # the model's own error, met while tracing
        why = raised.group(1) if raised else " ".join(str(e).split())
        raise NotImplementedError(
            "moa-flex compiles the model's forward as one graph, and torch.compile (Dynamo) cannot trace this "
            f"model's forward: {why[:400]}"
        ) from e


RECOMPILE_LIMIT = 64


def forward(state: CompiledState, *args: Any, **kwargs: Any) -> Any:
    """The compiled model's forward: plain (no cache / prefill) or a decode step over a
    MoaCache. Inference only: it runs without autograd (the attention op has no backward),
    whether or not the caller holds ``torch.no_grad()``."""
    with torch.no_grad():
        return _forward(state, args, kwargs)


def _forward(state: CompiledState, args: tuple, kwargs: dict) -> Any:
    if state.cache_arg != "past_key_values" and "past_key_values" in kwargs:  # the pre-5.24 name, still accepted
        if kwargs.get(state.cache_arg) is not None:
            raise ValueError(f"pass the cache once: got both past_key_values and {state.cache_arg}")
        kwargs[state.cache_arg] = kwargs.pop("past_key_values")
    cache = kwargs.get(state.cache_arg)
    if not state.takes_cache and any(isinstance(kwargs.get(n), MoaCache) for n in ("past_key_values", "cache")):
        raise ValueError("this model's forward takes no KV cache (it would ignore a MoaCache and attend the new "
                         "tokens alone): run the whole sequence, or use model.generate()")
    # Gemma 3/4 image tokens, GIT's image prefix, that attend each other both ways: refused on every path
    model = lambda: state.model_ref() if state.model_ref is not None else None  # noqa: E731
    check_token_types(model, kwargs)
    check_image_prefix(model, kwargs)
    if isinstance(cache, MoaCache):
        return _forward_with_cache(state, cache, args, kwargs)
    state.log.calling()
    with dynamo_policy():
        return state.compiled_forward(*args, **kwargs)


def _input_length(args: tuple, kwargs: dict) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        raise ValueError("forward needs input_ids or inputs_embeds")
    return int(ids.shape[1])


def _forward_with_cache(state: CompiledState, cache: MoaCache, args: tuple, kwargs: dict) -> Any:
    check_cache(state, cache)
    kwargs = _as_kwargs(state, args, kwargs)
    n = _input_length((), kwargs)
    if n < 1:
        raise ValueError("input_ids (or inputs_embeds) holds no tokens")
    model = state.model_ref() if state.model_ref is not None else None
    indexed = model is not None and index_ring_width(model.config) is not None
    if cache.seen_tokens + n > cache.planned_length:
        raise ValueError(
            f"past the planned length: {cache.seen_tokens} tokens seen + {n} new > planned length "
            f"{cache.planned_length}; plan the request for more tokens (max_new_tokens, or compile's max_length)"
        )
    if n == 1:
        out = _decode_step(state, cache, kwargs, n)
        cache.mark_filled(n)
    elif indexed:  # the indexer's selection over the cache (passes/indexed.py); a first chunk plans moa-flex attention
        with planned_for(state, cache.planned_length):
            out = _prefill(state, cache, kwargs, n, indexed=True)
    else:
        out = _prefill(state, cache, kwargs, n)  # marks each chunk as it goes
    return out


@contextlib.contextmanager
def planned_for(state: CompiledState, planned: int) -> Any:
    """The runtimes plan attention calls for ``planned`` tokens (a cache's request) meanwhile."""
    runtimes = [r for r in (state.runtime, state.verify_runtime) if r is not None]
    before = [r.planned_length for r in runtimes]
    for r in runtimes:
        r.planned_length = planned
    try:
        yield
    finally:
        for r, length in zip(runtimes, before):
            r.planned_length = length


def check_cache(state: CompiledState, cache: MoaCache) -> None:
    """ValueError unless ``cache`` was built for the model's plan."""
    if cache.plan is not state.plan and cache.plan != state.plan:
        raise ValueError("the MoaCache was built for another plan than the model's (model.moa_flex.set_plan?)")


def _chunk_mask(cache: MoaCache, kwargs: dict, n: int, device: torch.device) -> torch.Tensor | None:
    """The 2-D padding mask of the ``n`` new tokens, checked against the cache's left padding:
    HF's convention (a mask over past + new tokens) and the new tokens' own mask are both
    taken. ValueError if it is not the padding the cache was built with."""
    mask = kwargs.pop("attention_mask", None)
    seen = cache.seen_tokens
    expect = (torch.arange(seen, seen + n).view(1, n) >= cache.pads.view(-1, 1)).long()  # [B, n]
    if mask is None:
        if not bool(expect.all()):
            raise ValueError(f"the cache's rows are left-padded ({cache.pads.tolist()} tokens): pass the attention_mask")
        return None
    if cache.codebook_rows > 1 and mask.dim() == 2 and mask.shape[0] != cache.batch_size:  # MusicGen: a row per
        mask = sequence_mask(mask, cache.codebook_rows)  # codebook, the cache one per sequence
    if mask.dim() != 2 or mask.shape[0] != cache.batch_size or mask.shape[1] not in (n, seen + n):
        raise ValueError(f"attention_mask must be [batch, new tokens] or [batch, past + new tokens] = "
                         f"[{cache.batch_size}, {n} or {seen + n}], got {tuple(mask.shape)}")
    mask = mask[:, -n:]
    if not torch.equal(mask.detach().long().cpu(), expect):
        raise ValueError("attention_mask is not the left padding the cache was built with (moa-flex takes left padding "
                         f"only, {cache.pads.tolist()} tokens per row, the same in every turn)")
    return mask.to(device)


def _prefill(state: CompiledState, cache: MoaCache, kwargs: dict, n: int, indexed: bool = False) -> Any:
    """Tokens onto the cache, ``state.prefill_chunk`` at a time (a prompt, a later turn): each
    chunk runs the prefill graph (chunk attention over the cache, then the chunk's write); a
    last chunk of one token runs a decode step. Logits: as ``logits_to_keep`` asks, over all
    ``n`` tokens. ``indexed`` (DeepSeek Sparse Attention): see :func:`_over_indexed_cache`."""
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.get(name):
            raise NotImplementedError(f"moa-flex: {name} over a MoaCache is not supported")
    ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    mask = _chunk_mask(cache, kwargs, n, ids.device)
    if kwargs.get("position_ids") is None and kwargs.get("cache_position") is None:
        # HF's default (the cache's token count) as a tensor: a Python int would be baked in
        kwargs["position_ids"] = torch.arange(cache.seen_tokens, cache.seen_tokens + n, device=ids.device).unsqueeze(0)
    size = state.prefill_chunk or n
    bounds = [(a, min(a + size, n)) for a in range(0, n, size)]
    keep = kwargs.get("logits_to_keep", 0)
    last = bounds[-1][1] - bounds[-1][0]
    whole = not (isinstance(keep, int) and 0 < keep <= last)  # logits beyond the last chunk: keep every chunk's
    logits, out = [], None
    for a, b in bounds:
        step = {k: _slice_tokens(v, a, b, n) for k, v in kwargs.items()}
        if whole:
            step["logits_to_keep"] = 0
        if mask is not None:
            step["attention_mask"] = _fresh(mask[:, a:b])
        if indexed and cache.filled and b - a > 1:
            _over_indexed_cache(cache, step, b - a, ids.device, state.model_ref().config)
        if b - a == 1:
            out = _decode_step(state, cache, step, 1)
        else:
            state.log.calling()
            with dynamo_policy():
                out = state.compiled_forward(**step)
        # the next chunk sees the tokens before it counted (a model reading the cache's token
        # count in its forward, Llama 4's attention temperature, needs it chunk by chunk)
        cache.mark_filled(b - a)
        if whole:
            logits.append(out.logits)
    if whole:
        out.logits = torch.cat(logits, dim=1) if len(logits) > 1 else logits[0]
        if isinstance(keep, int) and keep > 0:
            out.logits = out.logits[:, -keep:]
        elif isinstance(keep, torch.Tensor):
            out.logits = out.logits[:, keep]
    return out


def _over_indexed_cache(cache: MoaCache, step: dict, c: int, device: torch.device, config: Any = None) -> None:
    """A chunk of ``c`` tokens of a DeepSeek Sparse Attention model over a cache that holds tokens:
    the cache hands each indexed layer its slots before the chunk's keys (``MoaCacheLayer.
    selects_over_cache``), so the model's mask must broadcast over keys it cannot index by position.
    It gets an all-True [B, 1, c, 1] mask (transformers takes a 4-D mask as it is), and the
    cache the chunk's left pads per row; the rule, the causality and the padding are the prefill
    pass's (passes/indexed.py, ``moa_flex::chunk_select_keep``).

    A model with linear-attention layers beside them (Qwen4-Exp) reads their padding from a 2-D
    mask, which a 4-D one does not give it (transformers then masks nothing, and a pad inside the
    chunk would reach the recurrent state): it gets a mask per layer type instead, the chunk's
    2-D padding mask for those layers (ones where no mask was given)."""
    pads = (cache.pads - cache.seen_tokens).clamp(0, c).to(device)
    for layer in cache.moa_layers:
        if layer.chunk_pads is not None:
            layer.chunk_pads.copy_(pads)
    every = torch.ones(cache.batch_size, 1, c, 1, dtype=torch.bool, device=device)
    types = set(layer_types(config, int(text_config(config).num_hidden_layers)) or ()) if config is not None else set()
    if not types & set(STATE_LAYER_TYPES):
        step["attention_mask"] = every
        return
    padding = step.get("attention_mask")
    if padding is None:
        padding = torch.ones(cache.batch_size, c, dtype=torch.long, device=device)
    step["attention_mask"] = {t: padding if t in STATE_LAYER_TYPES else every for t in types}


def _slice_tokens(value: Any, a: int, b: int, n: int) -> Any:
    """A per-token argument cut to tokens [a, b) of the ``n`` new ones (others as they are)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == n:
        return _fresh(value[:, a:b])
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == n:  # cache_position
        return _fresh(value[a:b])
    return value


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """``t`` with standard strides (copied only when it has others): a slice keeps its
    parent's strides (even on size-1 dims, which .contiguous() leaves alone), and Dynamo
    guards on strides, so a slice would recompile the graph an unsliced input compiled."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    if tuple(t.stride()) == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _as_kwargs(state: CompiledState, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (HF's generate passes names only; positional ones are
    named from the original forward's signature)."""
    if not args:
        return dict(kwargs)
    names = list(inspect.signature(state.original_forward).parameters)
    if len(args) > len(names):
        raise TypeError(f"forward takes at most {len(names)} positional arguments, got {len(args)}")
    return {**dict(zip(names, args)), **kwargs}


def _decode_step(state: CompiledState, cache: MoaCache, kwargs: dict, n: int) -> Any:
    """One decode step: compiled graph for the first steps of a request, then (CUDA graphs
    on, one device) replays of a captured :class:`~moa_flex.step_graph.StepGraph`."""
    kwargs.pop("attention_mask", None)  # the cache holds each row's padding (new tokens are real)
    if kwargs.get("position_ids") is None and kwargs.get("cache_position") is None:
        # HF's default (the cache's token count) as a tensor: a Python int would be baked in
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        kwargs["position_ids"] = torch.arange(cache.seen_tokens, cache.seen_tokens + n, device=ids.device).unsqueeze(0)
    signature = step_signature(kwargs)
    graph = cache.step_graph
    if graph is not None and graph.signature == signature:
        return graph(kwargs)
    for name, value in kwargs.items():
        # Dynamo guards a view argument through its base (generate's input_ids[:, None] is one); the
        # CUDA-graph capture passes copies, which are no views, and that re-traced the whole step
        if isinstance(value, torch.Tensor) and value._is_view():
            kwargs[name] = value.clone()
    same = cache.decode_signature == signature
    cache.decode_steps = cache.decode_steps + 1 if same else 1
    cache.decode_signature = signature
    cache.step_graph = None
    if state.cudagraphs and cache.decode_steps == 3:  # once per run of same-signature steps, not every step
        device = graph_device(kwargs, cache.tensors() + cache.state_tensors())
        if device is not None:
            with dynamo_policy(), state.log.phase("capturing the decode step's CUDA graph"):
                cache.step_graph, out = StepGraph.capture(state.compiled_decode, kwargs, device)
            return out
        _warn_once(state, "decode steps run without CUDA graphs: the model's layers or inputs are on several "
                          "devices (or not on a GPU); a CUDA graph is captured on one device only")
    # steady steps (same cache, same signature) skip re-evaluating Dynamo's guards: every guarded
    # property is as in the previous step (about 0.1 ms per layer of guard work, bench/RESULTS.md)
    stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if cache.decode_steps >= 3 \
        else contextlib.nullcontext()
    state.log.calling()
    with stance, dynamo_policy():
        return state.compiled_decode(**kwargs)


def captured_step(model: torch.nn.Module, state: CompiledState, cache: MoaCache, kwargs: dict) -> Any:
    """The :class:`~moa_flex.step_graph.StepGraph` that ``model(**kwargs)`` would replay for this
    decode step, or None (no graph captured yet, other arguments, or forward hooks on the
    model, which run outside the graph). A caller holding it may replay it directly
    (``replay_static``) for as long as it passes tensors of the same shapes, and must then call
    ``cache.mark_filled(1)`` after each step, as the forward does."""
    graph = cache.step_graph
    if graph is None or not cache.filled or cache.plan is not state.plan:
        return None
    hooks = (model._forward_hooks, model._forward_pre_hooks, torch.nn.modules.module._global_forward_hooks,
             torch.nn.modules.module._global_forward_pre_hooks)
    if any(hooks):
        return None
    return graph if graph.signature == step_signature(kwargs) else None


def _warn_once(state: CompiledState, message: str) -> None:
    if message not in state.warned:
        state.warned.add(message)
        warnings.warn(f"moa-flex: {message}", stacklevel=4)
