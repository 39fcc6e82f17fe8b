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

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .attention import MoaRuntime
from .plan import Plan


@dataclass
class CompiledState:
    """What moa_flex.compile attached to a model (``model.moa_flex``)."""

    plan: Plan
    runtime: MoaRuntime
    original_forward: Callable
    original_generate: Callable | None
    original_attn_implementation: str | None
    reports: list = field(default_factory=list)

    def set_plan(self, plan: Plan) -> None:
        """Run another plan for the same model without recompiling (plans are data: the graph
        holds only the runtime's id). The plan must fit the model; sink may differ."""
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a moa_flex.Plan, got {type(plan).__name__}")
        plan.check_model(self.plan.model)
        self.plan = plan
        self.runtime.set_plan(plan)

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


def backend(plan: Plan, *, inner: str = "inductor", mode: str | None = None, config: Any = None) -> Callable:
    """A backend for ``torch.compile(model, backend=moa_flex.backend(plan))``.

    The runtime it creates lives as long as the backend. ``config`` (the model's config)
    supplies soft-capping and the model's own sliding windows; without it, every layer keeps
    the model's mask as traced.
    """
    runtime = MoaRuntime(plan)
    from moa_flex.passes.attention_pass import make_backend

    fn = make_backend(
        plan, runtime.id, inner=inner, mode=mode,
        softcaps=_softcaps(config, plan.num_layers) if config else None,
        windows=model_windows(config, plan.num_layers) if config else [1] * plan.num_layers,
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
) -> torch.nn.Module:
    """Compile an HF causal LM so that every attention layer runs the plan. Returns the model.

    The model is switched to sdpa attention for tracing (models with logit soft-capping, like
    Gemma 2, to a registered SDPA variant: the cap is applied by moa-flex attention).

    ``max_length`` (tokens) fixes the planned length N for every call (inputs longer than it
    raise); by default N is each call's input length. ``backend`` is 'inductor' or 'eager'
    (debugging: the rewritten graph runs without inductor); ``mode`` is an inductor mode.
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

    state = CompiledState(plan, runtime, model.forward, getattr(model, "generate", None), impl)
    fn = make_backend(
        plan, runtime.id, inner=backend, mode=mode, on_report=state.reports.append,
        softcaps=_softcaps(config, plan.num_layers), windows=model_windows(config, plan.num_layers),
    )
    compiled = torch.compile(model.forward, backend=fn, dynamic=True, fullgraph=True)
    model.forward = compiled
    if state.original_generate is not None:
        model.generate = _generate_not_ready  # type: ignore[method-assign]
    model.moa_flex = state
    return model


def _generate_not_ready(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError(
        "generate() with a moa-flex plan needs the ragged MoA KV cache, which is not available yet; "
        "moa_flex.uncompile(model) restores dense generate()."
    )


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
    del model.moa_flex
    return model
