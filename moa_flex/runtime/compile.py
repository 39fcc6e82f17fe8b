"""``moa_flex.compile(model, plan)``: put a plan into an HF decoder through torch.compile.

The model's forward is compiled with a backend that rewrites each attention call of the
traced graph into moa-flex attention (see ``moa_flex.passes.attention_pass``), then hands
the graph to inductor. Weights are untouched; ``moa_flex.uncompile(model)`` restores the
original forward.

Recompilation policy: the model's forward is traced once, with dynamic shapes. Inside the
op, FlexAttention runs on lengths padded to a bucket (:func:`moa_flex.runtime.attention.length_bucket`:
multiples of 128 on a grid of 4 per octave, <= 19% padding) and compiles once per bucket,
plus once for the first call's tensors; no length within a seen bucket compiles again
(tested with dynamo's counters). Compiling many models in one process may need
``torch._dynamo.config.recompile_limit`` raised: all HF forwards share one wrapper.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from typing import Any, Callable

import torch

from moa_flex.architecture import (
    check_supported, decoder_layers, has_learned_sinks, key_bias_problem, kv_sources, latent_attention, layer_placement, model_windows, softcaps, step_graph_problem,
    text_config,
)
from moa_flex.compat import cache_argument, takes_cache
from moa_flex.kernels.quant import is_quantized, kv_dtype as parse_kv_dtype
from moa_flex.passes.attention_pass import make_backend
from moa_flex.passes.decode_pass import make_decode_backend
from moa_flex.passes.latent import LatentDims
from moa_flex.plan import Plan

from .attention import MoaRuntime
from .forward import forward as _forward
from .generate import generate as _generate
from .compile_cache import CompileCache, artifact_key, cache_enabled
from .parallel import tensor_parallel_shard
from .placement import hooked_modules, replace_hooks, restore_hooks
from .precompiled import PrecompiledGraphs, precompile_enabled
from .startup_log import StartupLog
from .traceable import (
    mark_buffers, route_block_indexers, route_dbrx_experts, unmark_buffers, unroute_block_indexers, unroute_dbrx_experts,
)
from .state import CompiledState

TRACED_ATTENTION = "moa_flex_traced"
DEFAULT_PREFILL_CHUNK = 16384  # tokens; bench/longctx.py --chunks measured it (bench/RESULTS.md)


def _traced_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """What a model whose attention SDPA cannot run traces instead of HF's sdpa. Soft-capping
    (Gemma 2): HF's SDPA call without the cap; the pass rewrites every such call into moa-flex
    attention with the cap taken from the config, so the uncapped SDPA never runs. Learned
    sinks (GPT-OSS, ``s_aux``): ``moa_flex::sdpa_sinks``, SDPA's arguments plus the sinks,
    which the pass hands to moa-flex attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("softcap", None)
    sinks = kwargs.pop("s_aux", None)
    if sinks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = None if attention_mask is None else attention_mask[:, :, :, :key.shape[-2]]
    causal = mask is None and query.shape[2] > 1
    out = torch.ops.moa_flex.sdpa_sinks(query, key, value, mask, float(kwargs.get("dropout", 0.0)), causal,
                                        kwargs.get("scaling"), key.shape[1] != query.shape[1], sinks)
    return out.transpose(1, 2).contiguous(), None


def _register_traced_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRACED_ATTENTION, _traced_attention)
    AttentionMaskInterface.register(TRACED_ATTENTION, sdpa_mask)


def backend(plan: Plan, *, inner: str = "inductor", mode: str | None = None, config: Any = None,
            partial_graphs: bool | None = None) -> Callable:
    """A backend for ``torch.compile(model, backend=moa_flex.backend(plan))``.

    The runtime it creates lives as long as the backend. ``config`` (the model's config)
    supplies soft-capping and the model's own sliding windows; without it, every layer keeps
    the model's mask as traced. ``partial_graphs``: accept graph pieces without attention;
    by default on for models running flex_attention (HF's block-mask creation graph-breaks).
    """
    runtime = MoaRuntime(plan)
    if partial_graphs is None:
        partial_graphs = getattr(config, "_attn_implementation", None) == "flex_attention"
    fn = make_backend(
        plan, runtime.id, inner=inner, mode=mode,
        softcaps=softcaps(config, plan.num_layers) if config else None,
        windows=model_windows(config, plan.model) if config else None,
        partial_graphs=partial_graphs, latent=_latent_dims(config, plan),
        kv_sources=kv_sources(config, plan.model) if config else None,
    )
    fn.runtime = runtime  # type: ignore[attr-defined]
    return fn


def _takes_sdpa(model: torch.nn.Module) -> bool:
    """Whether transformers lets the model run SDPA. One that does not (GIT, BigBird-Pegasus's
    decoder) stays on its eager attention, whose matmul-softmax-matmul the passes rewrite like
    attention computed in a model's own code (passes/eager_attention.py; a form they do not
    recognize is refused at the first call)."""
    return bool(getattr(model, "_supports_sdpa", True))


def _latent_dims(config: Any, plan: Plan) -> tuple[LatentDims, ...] | None:
    """Per planned layer, the latent-attention sizes the passes absorb with (passes/latent.py),
    or None."""
    if config is None or latent_attention(config) is None:
        return None
    return tuple(LatentDims.from_config(text_config(config), plan.model.heads_of(l), layer)
                 for l, layer in enumerate(decoder_layers(config, plan.model)))


def compile(  # noqa: A001  (the verb of the API)
    model: torch.nn.Module,
    plan: Plan | None = None,
    *,
    max_length: int | None = None,
    backend: str = "inductor",
    mode: str | None = None,
    fuse_linear: bool | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    progress: bool = True,
    compile_cache: bool | None = None,
    verify: bool = True,
    regional: bool = True,
    kv_dtype: torch.dtype | str | None = None,
) -> torch.nn.Module:
    """Compile an HF causal LM so that every attention layer runs the plan. Returns the model.

    ``plan`` None: the plan that travels with the model, ``moa_plan.json`` in the folder the
    model was loaded from (``model.name_or_path``; :meth:`Plan.save_pretrained`), or a
    ValueError saying none is there.

    The model is switched to sdpa attention for tracing (models with logit soft-capping, like
    Gemma 2, to a registered SDPA variant: the cap is applied by moa-flex attention).

    ``max_length`` (tokens) fixes the planned length N for every call (inputs longer than it
    raise); by default N is each call's input length. ``backend`` is 'inductor' or 'eager'
    (debugging and tests: the rewritten graph and FlexAttention run without inductor, in
    seconds instead of a compile; FlexAttention's uncompiled form holds a call's [B, H, Q, K]
    scores, so calls over more than 16384 keys are refused); ``mode`` is an inductor mode.
    ``fuse_linear``: decode steps run each layer's q/k/v projections as one
    ``moa_flex::grouped_linear`` and gate/up + SiLU as one ``moa_flex::gated_mlp`` (skinny-GEMM
    Triton kernels, at most 16 rows; ``moa_flex.passes.linear_pass``); None (default) turns
    this on for models on CUDA, True forces it (on CPU the ops run their fp32 twins).
    ``prefill_chunk``: tokens per chunk when a prompt (or a later turn) is prefilled onto a
    MoaCache (``generate``, or a forward with ``past_key_values``): each chunk attends what the
    cache keeps plus itself, exactly as one-shot prefill would (docs/DESIGN.md, "Long
    contexts"), and activations are bounded by the chunk; None runs the prompt as one chunk.
    A forward without a cache runs its attention ``prefill_chunk`` queries per FlexAttention
    call, so block masks hold ``[B, H, prefill_chunk / 128, N / 128]`` indices, linear in N.
    ``progress``: one line on stderr per start-up phase (tracing, compiling, FlexAttention per
    key bucket, CUDA-graph capture) with its seconds (:mod:`moa_flex.runtime.startup_log`;
    also silenced by ``MOA_FLEX_QUIET=1``). ``model.moa_flex.warmup(batch_size, max_length)``
    runs them ahead of the first request.
    ``compile_cache``: keep the compiled code in moa-flex's cache folder and start from it in
    the next process (:mod:`moa_flex.runtime.compile_cache`); None (default): on, unless the
    environment sets ``MOA_FLEX_COMPILE_CACHE=0``. Not used with ``backend="eager"``. With it on,
    graphs are also precompiled: written whole (traced bytecode, guards, compiled code) and read
    back by a later ``compile``, which then does not trace them (:mod:`moa_flex.runtime.precompiled`;
    ``MOA_FLEX_PRECOMPILE=0`` turns that part off).
    ``verify``: the first call of each prefill graph runs once eagerly with every layer's
    rewritten attention, under a dense plan, compared with the model's own attention call on
    that call's inputs; a difference raises :class:`moa_flex.runtime.verify.VerifyError` naming
    the layer (:mod:`moa_flex.runtime.verify`: what is compared, the cost, the limits).
    ``regional``: inductor compiles one decoder layer and runs its code for every layer with
    an equal graph (:mod:`moa_flex.passes.regional`), so compile time does not grow with depth;
    decode steps are compiled so only when they replay CUDA graphs (one GPU, ``mode`` with CUDA
    graphs): uncaptured, each layer's call costs host time. False compiles every graph whole.
    ``kv_dtype``: the storage dtype of the MoA KV cache generate() builds (None: the model's
    dtype; ``torch.float8_e4m3fn`` or ``"fp8"``: one byte per value with a float32 scale per
    token and KV head, read back dequantized by decode and by prefill over the cache alike;
    :mod:`moa_flex.kernels.quant`, docs/DESIGN.md "FP8 cache").
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; moa_flex.compile expects a transformers model")
    if plan is None:
        plan = _plan_of(model)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a moa_flex.Plan, got {type(plan).__name__}")
    if getattr(model, "moa_flex", None) is not None:
        raise ValueError("model is already compiled by moa_flex; call moa_flex.uncompile(model) first")
    plan.check_model(config)
    shard = tensor_parallel_shard(model)  # tp_plan: this rank runs its slice of the heads
    if shard is not None:
        plan = plan.shard(*shard)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 tokens, got {max_length}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 2):
        raise ValueError(f"prefill_chunk must be an integer >= 2 (tokens) or None, got {prefill_chunk!r}")
    if backend not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    for name, flag in (("verify", verify), ("regional", regional)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if model.training:
        raise ValueError("moa_flex.compile runs inference only; call model.eval() first")
    kv_dtype = parse_kv_dtype(kv_dtype)

    # may refuse the model: before anything is changed
    check_supported(model, plan.model)
    problem = key_bias_problem(config, max_length, kv_dtype is not None and is_quantized(kv_dtype))
    if problem:
        raise ValueError(problem)
    caps, windows = softcaps(config, plan.num_layers), model_windows(config, plan.model)
    impl = getattr(config, "_attn_implementation", None)
    wanted = "sdpa"
    sinks = has_learned_sinks(model)
    if sinks and backend == "inductor" and next(model.parameters()).device.type == "cpu":
        raise NotImplementedError(
            f"{type(model).__name__} has learned attention sinks, which moa-flex applies from FlexAttention's "
            "log-sum-exp; inductor's CPU FlexAttention does not return it (torch 2.13): on the CPU compile with "
            "backend='eager', or run the model on a GPU")
    if getattr(config, "attn_logit_softcapping", None) or sinks:
        _register_traced_attention()
        wanted = TRACED_ATTENTION
    routed = route_dbrx_experts(model)  # DBRX's experts as one op (traceable.py); a refusal changes nothing
    # accelerate's device_map: refused if it offloads (checked before anything changes), else its
    # hooks become traceable device moves (placement.py)
    indexers: list = []
    try:
        indexers = route_block_indexers(model)  # Qwen4-Exp's block selection as one op (traceable.py)
        swapped = replace_hooks(model) if hooked_modules(model) else []
    except Exception:
        unroute_dbrx_experts(routed)
        unroute_block_indexers(indexers)
        raise
    marks = unmark_buffers(model)
    if impl != wanted and not (wanted == "sdpa" and impl == "eager" and not _takes_sdpa(model)):
        model.set_attn_implementation(wanted)
    log = StartupLog(progress)
    cudagraphs = mode in ("reduce-overhead", "max-autotune")
    stale = step_graph_problem(config)
    if cudagraphs and stale:  # a captured decode step would replay what it was captured with
        warnings.warn(f"moa-flex: decode steps run without CUDA graphs: {stale}", stacklevel=2)
        cudagraphs = False
    runtime = MoaRuntime(plan, compiled=backend == "inductor", query_chunk=prefill_chunk)
    runtime.planned_length = max_length
    runtime.log = log
    state = CompiledState(plan, runtime, model.forward, getattr(model, "generate", None), impl, max_length=max_length,
                          prefill_chunk=prefill_chunk, kv_dtype=kv_dtype, windows=windows,
                          cudagraphs=cudagraphs, cache_arg=cache_argument(model.forward),
                          takes_cache=takes_cache(model.forward),
                          log=log, model_ref=weakref.ref(model), accelerate_hooks=swapped, shard=shard)
    state.buffer_marks, state.routed_experts, state.routed_indexers = marks, routed, indexers
    if verify:  # the first-call check's dense plan (moa_flex.runtime.verify)
        state.verify_runtime = MoaRuntime(Plan.dense(plan.model), compiled=False)
        state.verify_runtime.planned_length = max_length
    latent = _latent_dims(config, plan)
    sources = kv_sources(config, plan.model)
    prefill = make_backend(
        plan, runtime.id, inner=backend, mode=_without_cudagraphs(mode), on_report=state.reports.append,
        softcaps=caps, windows=windows, verify_id=state.verify_runtime.id if verify else None, say=log.say,
        regional=regional, on_regions=functools.partial(_regions_said, state), latent=latent, kv_sources=sources,
    )
    decode = make_decode_backend(  # CUDA graphs of decode steps are moa-flex's own (step_graph.py)
        plan, inner=backend, mode=_without_cudagraphs(mode), on_report=state.decode_reports.append, softcaps=caps, windows=windows,
        fuse_linear=fuse_linear, regional=regional and _steps_captured(model, plan, state.cudagraphs),
        on_regions=functools.partial(_regions_said, state), latent=latent, kv_sources=sources,
    )
    if backend == "inductor" and cache_enabled(compile_cache):
        devices, dtype = layer_placement(model, plan.model)
        options = {"mode": mode, "fuse_linear": fuse_linear, "prefill_chunk": prefill_chunk, "max_length": max_length,
                   "shard": shard, "regional": regional, "kv_dtype": str(kv_dtype)}
        state.compile_cache = CompileCache(artifact_key(config, plan, dtype, devices[0], options),
                                           cpu=devices[0].type == "cpu")
        if state.compile_cache.load():
            log.say(f"compile cache: loaded {state.compile_cache.loaded_bytes / 2**20:.1f} MiB of compiled code from "
                    f"{state.compile_cache.folder}")
    layers = f"{plan.num_layers} layers"
    prefill = _logged(prefill, log, f"prefill graph ({layers})", backend)
    decode = _logged(decode, log, f"decode-step graph ({layers})", backend)
    state.compiled_forward = torch.compile(state.original_forward, backend=prefill, dynamic=True, fullgraph=True)
    state.compiled_decode = torch.compile(state.original_forward, backend=decode, dynamic=True, fullgraph=True)
    if state.compile_cache is not None and precompile_enabled():
        _precompiled(model, state, prefill, decode)
    model.forward = functools.wraps(state.original_forward)(functools.partial(_forward, state))
    if state.original_generate is not None:
        model.generate = functools.wraps(state.original_generate)(functools.partial(_generate, model, state))
    model.moa_flex = state
    return model


def _precompiled(model: torch.nn.Module, state: CompiledState, prefill: Callable, decode: Callable) -> None:
    """Prefill and decode graphs through AOT precompile, read from and written to the compile
    cache's folder (:mod:`moa_flex.runtime.precompiled`): a warm process does not trace them."""
    folder = state.compile_cache.folder / "graphs"
    runtimes = [state.runtime] + ([state.verify_runtime] if state.verify_runtime is not None else [])
    confirmed = [False]  # the own-code attention check's flag, shared by graphs read back
    families = []
    for name, backend, fallback, reports in (("prefill", prefill, state.compiled_forward, state.reports),
                                              ("decode", decode, state.compiled_decode, state.decode_reports)):
        graphs = PrecompiledGraphs(name, state.original_forward, backend, fallback, folder, runtimes, state.log.say,
                                   confirmed, model, reports.extend)
        graphs.load()
        families.append(graphs)
    state.compiled_forward, state.compiled_decode = families
    loaded = sum(f.loaded for f in families)
    if loaded:
        state.log.say(f"precompile: read {loaded} compiled graphs from {folder} (no tracing for their calls)")


def _regions_said(state: CompiledState, report: Any) -> None:
    """Keep a graph's regional-compilation report; say when a graph was compiled whole instead."""
    state.region_reports.append(report)
    if report.whole:
        state.log.say(f"regional compilation: this graph compiles whole: {report.whole}")


def _steps_captured(model: torch.nn.Module, plan: Plan, cudagraphs: bool) -> bool:
    """Whether decode steps will replay a CUDA graph (one GPU, CUDA graphs on): only then is the
    decode graph compiled by region, since each region's call costs host time (a runtime
    wrapper per layer) that a captured step does not pay."""
    devices, _ = layer_placement(model, plan.model)
    return cudagraphs and len(set(devices)) == 1 and devices[0].type == "cuda"


def _logged(backend: Callable, log: StartupLog, what: str, inner: str) -> Callable:
    """``backend`` with start-up lines: Dynamo's tracing time when it hands the graph over,
    then the rewrite and compile's."""

    def logged_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        log.traced(what, len(gm.graph.nodes))
        with log.phase(f"{what}: compiled ({inner})", announce=False):
            compiled = backend(gm, example_inputs)
        log.compiles += 1
        return compiled

    return logged_backend


def _plan_of(model: torch.nn.Module) -> Plan:
    """The plan saved in the folder the model was loaded from (``moa_plan.json``)."""
    folder = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or ""
    if not folder:
        raise ValueError("no plan given and the model was not loaded from a folder (name_or_path is empty): pass a "
                         "plan, e.g. moa_flex.compile(model, moa_flex.plans.load(...)) or Plan.load(path)")
    if not os.path.isdir(folder):
        raise ValueError(f"no plan given and the model's name_or_path {folder!r} is not a local folder that could hold "
                         "moa_plan.json: pass a plan")
    return Plan.from_pretrained(folder)


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
    if state.accelerate_hooks:
        restore_hooks(state.accelerate_hooks)
    mark_buffers(state.buffer_marks)
    unroute_dbrx_experts(state.routed_experts)
    unroute_block_indexers(state.routed_indexers)
    if state.verify_runtime is not None:
        state.verify_runtime.close()
    state.release_cache()
    del model.moa_flex
    return model


def _without_cudagraphs(mode: str | None) -> str | None:
    """Inductor's mode without its CUDA graphs: prefill shapes change with every prompt, and
    decode steps are captured whole by moa-flex (:mod:`moa_flex.runtime.step_graph`)."""
    return {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode or "", mode)
