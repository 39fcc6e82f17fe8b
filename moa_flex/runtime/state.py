"""What ``moa_flex.compile`` attaches to a model: ``model.moa_flex``, a :class:`CompiledState`."""

from __future__ import annotations

import dataclasses

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from moa_flex.plan import Plan

from .attention import MoaRuntime
from .cache import MoaCache
from .compile_cache import CompileCache
from .startup_log import StartupLog


@dataclass
class CompiledState:
    """What moa_flex.compile attached to a model (``model.moa_flex``)."""

    plan: Plan
    runtime: MoaRuntime
    original_forward: Callable
    original_generate: Callable | None
    original_attn_implementation: str | None
    max_length: int | None = None
    prefill_chunk: int | None = None  # tokens per prefill chunk over a MoaCache (None: one chunk)
    kv_dtype: torch.dtype | None = None  # storage dtype of the caches generate() builds (None: the model's)
    windows: list | None = None  # per planned layer the model's own window (architecture.model_windows)
    reports: list = field(default_factory=list)
    decode_reports: list = field(default_factory=list)
    compiled_forward: Callable | None = None
    compiled_decode: Callable | None = None
    cache: MoaCache | None = None  # the last request's cache, reused when the next has the same layout
    cudagraphs: bool = False  # decode steps replay a CUDA graph (mode "reduce-overhead"/"max-autotune")
    cache_arg: str = "past_key_values"  # the forward's name for its Cache ("cache" from transformers 5.24 on)
    takes_cache: bool = True  # the forward takes a KV cache (OpenAI GPT's does not: its generate recomputes)
    warned: set = field(default_factory=set)
    log: StartupLog = field(default_factory=StartupLog)  # start-up phase lines on stderr
    model_ref: weakref.ref | None = None  # the compiled model (weak: the model holds this state)
    compile_cache: CompileCache | None = None  # moa-flex's persistent compile cache (None: off)
    verify_runtime: MoaRuntime | None = None  # the dense plan of the first-call check (None: verify=False)
    accelerate_hooks: list = field(default_factory=list)  # accelerate hooks swapped for device moves (placement.py)
    buffer_marks: list = field(default_factory=list)  # nn.Buffer markers taken off for Dynamo (traceable.py)
    routed_experts: list = field(default_factory=list)  # DBRX experts run through an op (traceable.py)
    routed_indexers: list = field(default_factory=list)  # Qwen4-Exp indexers run through an op (traceable.py)
    shard: tuple[int, int] | None = None  # (index, count) of this rank's heads under tensor parallelism (parallel.py)
    region_reports: list = field(default_factory=list)  # regional compilation, per compiled graph (passes/regional.py)

    def save_compiled(self) -> None:
        """Write the compile cache now if this process compiled something new (also done at exit)."""
        if self.compile_cache is not None:
            written = self.compile_cache.save()
            if written:
                self.log.say(f"compile cache: saved {written / 2**20:.1f} MiB of compiled code to "
                             f"{self.compile_cache.folder}")

    def release_cache(self) -> None:
        """Free the KV cache kept from the last generate() call."""
        self.cache = None

    def set_plan(self, plan: Plan) -> None:
        """Run another plan for the same model without recompiling (plans are data: the graph
        holds only the runtime's id). The plan must fit the model; sink may differ."""
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a moa_flex.Plan, got {type(plan).__name__}")
        if self.shard is None:
            plan.check_model(self.plan.model)
        else:  # a whole model's plan: this rank runs its heads' share
            index, count = self.shard
            plan.check_model(dataclasses.replace(self.plan.model, num_heads=self.plan.num_heads * count,
                                                 num_kv_heads=self.plan.num_kv_heads * count))
            plan = plan.shard(index, count)
        self.plan = plan
        self.runtime.set_plan(plan)
        self.cache = None

    def warmup(self, batch_size: int = 1, max_length: int | None = None) -> float:
        """Compile and capture everything a request of ``batch_size`` rows planned for
        ``max_length`` tokens needs, before the first request (servers); returns the seconds it
        took. See :func:`moa_flex.runtime.warmup.warmup`."""
        from .warmup import warmup

        model = self.model_ref() if self.model_ref is not None else None
        if model is None:
            raise RuntimeError("the compiled model is gone (warmup needs model.moa_flex of a live model)")
        return warmup(model, self, batch_size, max_length)

    def report(self, N: int) -> str:
        """Per layer: the node the pass rewrote and its spans at planned length N (tokens)."""
        if not self.reports:
            return "(nothing traced yet: run a forward first)"
        return self.reports[-1].table(self.plan, N)
