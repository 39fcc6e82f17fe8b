"""``moa_flex.compile(model, plan)``: put a plan into an HF decoder through torch.compile.

The model's forward is compiled with a backend that rewrites each attention call of the
traced graph into moa-flex attention (see ``moa_flex.passes.attention_pass``), then hands
the graph to inductor. Weights are untouched; ``moa_flex.uncompile(model)`` restores the
original forward.

Recompilation policy: the model's forward is traced once, with dynamic shapes. Inside the
op, FlexAttention runs on lengths padded to a bucket (``moa_flex.attention.length_bucket``:
multiples of 128 on a grid of 4 per octave, <= 19% padding) and compiles once per bucket,
plus once for the first call's tensors; no length within a seen bucket compiles again
(tested with dynamo's counters). Compiling many models in one process may need
``torch._dynamo.config.recompile_limit`` raised: all HF forwards share one wrapper.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx.experimental._config as fx_config

from .attention import MoaRuntime
from .cache import MoaCache, cache_argument
from .generate import generate as _generate
from .plan import Plan


@dataclass
class CompiledState:
    """What moa_flex.compile attached to a model (``model.moa_flex``)."""

    plan: Plan
    runtime: MoaRuntime
    original_forward: Callable
    original_generate: Callable | None
    original_attn_implementation: str | None
    max_length: int | None = None
    reports: list = field(default_factory=list)
    decode_reports: list = field(default_factory=list)
    compiled_forward: Callable | None = None
    compiled_decode: Callable | None = None
    cache: MoaCache | None = None  # the last request's cache, reused when the next has the same layout
    cudagraphs: bool = False  # decode steps replay a CUDA graph (mode "reduce-overhead"/"max-autotune")
    cache_arg: str = "past_key_values"  # the forward's name for its Cache ("cache" from transformers 5.24 on)
    warned: set = field(default_factory=set)

    def release_cache(self) -> None:
        """Free the KV cache kept from the last generate() call."""
        self.cache = None

    def set_plan(self, plan: Plan) -> None:
        """Run another plan for the same model without recompiling (plans are data: the graph
        holds only the runtime's id). The plan must fit the model; sink may differ."""
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a moa_flex.Plan, got {type(plan).__name__}")
        plan.check_model(self.plan.model)
        self.plan = plan
        self.runtime.set_plan(plan)
        self.cache = None

    def report(self, N: int) -> str:
        """Per layer: the node the pass rewrote and its spans at planned length N (tokens)."""
        if not self.reports:
            return "(nothing traced yet: run a forward first)"
        return self.reports[-1].table(self.plan, N)


TRACED_ATTENTION = "moa_flex_traced"


def _traced_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """What a soft-capping model (Gemma 2) traces instead of HF's sdpa, which refuses softcap:
    HF's SDPA call without the cap. The pass rewrites every such call into moa-flex attention
    with the cap taken from the config, so the uncapped SDPA never runs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("softcap", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_traced_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRACED_ATTENTION, _traced_attention)
    AttentionMaskInterface.register(TRACED_ATTENTION, sdpa_mask)


def _softcaps(config: Any, num_layers: int) -> list[float]:
    cap = getattr(config, "attn_logit_softcapping", None)
    return [float(cap) if cap else 0.0] * num_layers


def model_windows(config: Any, num_layers: int) -> list[int | None]:
    """Per layer, the model's own sliding window (tokens) or None, from its config
    (``sliding_window`` and, where present, ``layer_types``)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return [None] * num_layers
    if types is None:
        return [int(window)] * num_layers
    return [int(window) if t == "sliding_attention" else None for t in types[:num_layers]]


def backend(plan: Plan, *, inner: str = "inductor", mode: str | None = None, config: Any = None,
            partial_graphs: bool | None = None) -> Callable:
    """A backend for ``torch.compile(model, backend=moa_flex.backend(plan))``.

    The runtime it creates lives as long as the backend. ``config`` (the model's config)
    supplies soft-capping and the model's own sliding windows; without it, every layer keeps
    the model's mask as traced. ``partial_graphs``: accept graph pieces without attention;
    by default on for models running flex_attention (HF's block-mask creation graph-breaks).
    """
    runtime = MoaRuntime(plan)
    from moa_flex.passes.attention_pass import make_backend

    if partial_graphs is None:
        partial_graphs = getattr(config, "_attn_implementation", None) == "flex_attention"
    fn = make_backend(
        plan, runtime.id, inner=inner, mode=mode,
        softcaps=_softcaps(config, plan.num_layers) if config else None,
        windows=model_windows(config, plan.num_layers) if config else [1] * plan.num_layers,
        partial_graphs=partial_graphs,
    )
    fn.runtime = runtime  # type: ignore[attr-defined]
    return fn


def compile(  # noqa: A001  (the verb of the API)
    model: torch.nn.Module,
    plan: Plan,
    *,
    max_length: int | None = None,
    backend: str = "inductor",
    mode: str | None = None,
    fuse_linear: bool | None = None,
) -> torch.nn.Module:
    """Compile an HF causal LM so that every attention layer runs the plan. Returns the model.

    The model is switched to sdpa attention for tracing (models with logit soft-capping, like
    Gemma 2, to a registered SDPA variant: the cap is applied by moa-flex attention).

    ``max_length`` (tokens) fixes the planned length N for every call (inputs longer than it
    raise); by default N is each call's input length. ``backend`` is 'inductor' or 'eager'
    (debugging: the rewritten graph runs without inductor); ``mode`` is an inductor mode.
    ``fuse_linear``: decode steps run each layer's q/k/v projections as one
    ``moa_flex::grouped_linear`` and gate/up + SiLU as one ``moa_flex::gated_mlp`` (skinny-GEMM
    Triton kernels, at most 16 rows; ``moa_flex.passes.linear_pass``); None (default) turns
    this on for models on CUDA, True forces it (on CPU the ops run their fp32 twins).
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a moa_flex.Plan, got {type(plan).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; moa_flex.compile expects a transformers model")
    if getattr(model, "moa_flex", None) is not None:
        raise ValueError("model is already compiled by moa_flex; call moa_flex.uncompile(model) first")
    plan.check_model(config)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 tokens, got {max_length}")
    if backend not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    hooked = [name for name, m in model.named_modules() if getattr(m, "_hf_hook", None) is not None]
    if hooked:
        raise ValueError(
            f"the model carries accelerate hooks (device_map / offloading; first on {hooked[0] or 'the model'!r}), which "
            "torch.compile cannot trace into one graph (they call torch.compiler.disable); load the model on one "
            "device, or spread its layers with plain forward pre-hooks that move activations"
        )
    if model.training:
        raise ValueError("moa_flex.compile runs inference only; call model.eval() first")

    impl = getattr(config, "_attn_implementation", None)
    wanted = "sdpa"
    if getattr(config, "attn_logit_softcapping", None):
        _register_traced_attention()
        wanted = TRACED_ATTENTION
    if impl != wanted:
        model.set_attn_implementation(wanted)
    runtime = MoaRuntime(plan)
    runtime.planned_length = max_length
    from moa_flex.passes.attention_pass import make_backend
    from moa_flex.passes.decode_pass import make_decode_backend

    state = CompiledState(plan, runtime, model.forward, getattr(model, "generate", None), impl, max_length=max_length,
                          cudagraphs=mode in ("reduce-overhead", "max-autotune"), cache_arg=cache_argument(model.forward))
    softcaps, windows = _softcaps(config, plan.num_layers), model_windows(config, plan.num_layers)
    prefill = make_backend(
        plan, runtime.id, inner=backend, mode=_without_cudagraphs(mode), on_report=state.reports.append,
        softcaps=softcaps, windows=windows,
    )
    decode = make_decode_backend(  # CUDA graphs of decode steps are moa-flex's own (step_graph.py)
        plan, inner=backend, mode=_without_cudagraphs(mode), on_report=state.decode_reports.append, softcaps=softcaps, windows=windows,
        fuse_linear=fuse_linear,
    )
    state.compiled_forward = torch.compile(state.original_forward, backend=prefill, dynamic=True, fullgraph=True)
    state.compiled_decode = torch.compile(state.original_forward, backend=decode, dynamic=True, fullgraph=True)
    model.forward = functools.wraps(state.original_forward)(functools.partial(_forward, state))
    if state.original_generate is not None:
        model.generate = functools.wraps(state.original_generate)(functools.partial(_generate, model, state))
    model.moa_flex = state
    return model


def _without_cudagraphs(mode: str | None) -> str | None:
    """Inductor's mode without its CUDA graphs: prefill shapes change with every prompt, and
    decode steps are captured whole by moa-flex (``moa_flex.step_graph``)."""
    return {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode or "", mode)


def _dynamo_policy() -> Any:
    """Around every compiled call: room for moa-flex's graphs (all HF forwards share one code
    object, so several compiled models share dynamo's per-code recompile limit), an error
    instead of dynamo's silent eager fallback (which would run dense attention), and no duck
    sizing of the cache's shapes."""
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True))
    # No "duck sizing": equal cache widths across layers (a dense plan) must not become guards
    # that a plan with other widths then fails, recompiling the model.
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    return stack


RECOMPILE_LIMIT = 64


def _forward(state: CompiledState, *args: Any, **kwargs: Any) -> Any:
    """The compiled model's forward: plain (no cache / prefill) or a decode step over a MoaCache."""
    if state.cache_arg != "past_key_values" and "past_key_values" in kwargs:  # the pre-5.24 name, still accepted
        if kwargs.get(state.cache_arg) is not None:
            raise ValueError(f"pass the cache once: got both past_key_values and {state.cache_arg}")
        kwargs[state.cache_arg] = kwargs.pop("past_key_values")
    cache = kwargs.get(state.cache_arg)
    if isinstance(cache, MoaCache):
        return _forward_with_cache(state, cache, args, kwargs)
    with _dynamo_policy():
        return state.compiled_forward(*args, **kwargs)


def _input_length(args: tuple, kwargs: dict) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        raise ValueError("forward needs input_ids or inputs_embeds")
    return int(ids.shape[1])


def _forward_with_cache(state: CompiledState, cache: MoaCache, args: tuple, kwargs: dict) -> Any:
    if cache.plan is not state.plan and cache.plan != state.plan:
        raise ValueError("the MoaCache was built for another plan than the model's (model.moa_flex.set_plan?)")
    n = _input_length(args, kwargs)
    if cache.seen_tokens + n > cache.planned_length:
        raise ValueError(
            f"generating past the planned length: {cache.seen_tokens} tokens seen + {n} new > planned length "
            f"{cache.planned_length}; plan the request for more tokens (max_new_tokens, or compile's max_length)"
        )
    if cache.filled:
        if n != 1:
            raise NotImplementedError(
                "moa-flex: a prefill of several tokens onto a filled MoA cache (multi-turn) is not supported; "
                "generate again from the whole conversation"
            )
        out = _decode_step(state, cache, _as_kwargs(state, args, kwargs), n)
    else:
        before = state.runtime.planned_length
        state.runtime.planned_length = cache.planned_length
        try:
            with _dynamo_policy():
                out = state.compiled_forward(*args, **kwargs)
        finally:
            state.runtime.planned_length = before
    cache.mark_filled(n)
    return out


def _as_kwargs(state: CompiledState, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (HF's generate passes names only; positional ones are
    named from the original forward's signature)."""
    if not args:
        return dict(kwargs)
    import inspect

    names = list(inspect.signature(state.original_forward).parameters)
    if len(args) > len(names):
        raise TypeError(f"forward takes at most {len(names)} positional arguments, got {len(args)}")
    return {**dict(zip(names, args)), **kwargs}


def _decode_step(state: CompiledState, cache: MoaCache, kwargs: dict, n: int) -> Any:
    """One decode step: compiled graph for the first steps of a request, then (CUDA graphs
    on, one device) replays of a captured :class:`~moa_flex.step_graph.StepGraph`."""
    from .step_graph import StepGraph, graph_device, step_signature

    kwargs.pop("attention_mask", None)  # the cache holds each row's padding
    if kwargs.get("position_ids") is None and kwargs.get("cache_position") is None:
        # HF's default (the cache's token count) as a tensor: a Python int would be baked in
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        kwargs["position_ids"] = torch.arange(cache.seen_tokens, cache.seen_tokens + n, device=ids.device).unsqueeze(0)
    signature = step_signature(kwargs)
    graph = cache.step_graph
    if graph is not None and graph.signature == signature:
        return graph(kwargs)
    same = cache.decode_signature == signature
    cache.decode_steps = cache.decode_steps + 1 if same else 1
    cache.decode_signature = signature
    cache.step_graph = None
    if state.cudagraphs and cache.decode_steps == 3:  # once per run of same-signature steps, not every step
        device = graph_device(kwargs, cache.tensors())
        if device is not None:
            with _dynamo_policy():
                cache.step_graph, out = StepGraph.capture(state.compiled_decode, kwargs, device)
            return out
        _warn_once(state, "decode steps run without CUDA graphs: the model's layers or inputs are on several "
                          "devices (or not on a GPU); a CUDA graph is captured on one device only")
    # steady steps (same cache, same signature) skip re-evaluating Dynamo's guards: every guarded
    # property is as in the previous step (about 0.1 ms per layer of guard work, bench/RESULTS.md)
    stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if cache.decode_steps >= 3 \
        else contextlib.nullcontext()
    with stance, _dynamo_policy():
        return state.compiled_decode(**kwargs)


def captured_step(model: torch.nn.Module, state: CompiledState, cache: MoaCache, kwargs: dict) -> Any:
    """The :class:`~moa_flex.step_graph.StepGraph` that ``model(**kwargs)`` would replay for this
    decode step, or None (no graph captured yet, other arguments, or forward hooks on the
    model, which run outside the graph). A caller holding it may replay it directly
    (``replay_static``) for as long as it passes tensors of the same shapes, and must then call
    ``cache.mark_filled(1)`` after each step, as the forward does."""
    from .step_graph import step_signature

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
        import warnings

        warnings.warn(f"moa-flex: {message}", stacklevel=4)


def uncompile(model: torch.nn.Module) -> torch.nn.Module:
    """Undo moa_flex.compile: original forward/generate and attention implementation."""
    state: CompiledState | None = getattr(model, "moa_flex", None)
    if state is None:
        raise ValueError("model was not compiled by moa_flex.compile")
    for name in ("forward", "generate"):
        if name in model.__dict__:
            del model.__dict__[name]
    if state.original_attn_implementation and state.original_attn_implementation != model.config._attn_implementation:
        model.set_attn_implementation(state.original_attn_implementation)
    state.runtime.close()
    state.release_cache()
    del model.moa_flex
    return model
