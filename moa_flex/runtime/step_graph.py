"""Decode steps replayed from one CUDA graph, with no Dynamo and no per-kernel launches.

With ``moa_flex.compile(model, plan, mode="reduce-overhead")`` a decode step is a compiled
graph over a :class:`moa_flex.MoaCache` whose tensors never move. Running it through
torch.compile's own CUDA-graph trees still costs, per step, Dynamo's frame and guard work
over every cache tensor of every layer and the trees' input bookkeeping: about 0.2 ms per
layer on an H200, as much as the GPU work of a layer at small batch (bench/RESULTS.md). A
:class:`StepGraph` captures the whole compiled step once per request and replays it:

* the step's tensor arguments are copied into static buffers the graph reads;
* the cache tensors are the graph's own state: ``cache_append`` writes the new token and
  advances each row's length inside the graph, so replaying it is the next step;
* outputs live in the graph's memory pool and are cloned on return (the next replay
  overwrites them); an output that is one of the arguments (the cache, as
  ``past_key_values``) is not kept by the graph but handed back from the call, so a cache
  and its step graph form no reference cycle and free their memory as soon as released.

A step graph is only valid while what the compiled code baked in stays the same: the cache
object and its tensors, the arguments' names, shapes, dtypes and devices, and the values of
non-tensor arguments (:func:`step_signature`). Positions must come in as tensors: the
forward wrapper passes ``position_ids`` when the caller does not (HF's default, from the
cache's token count, would be a constant of the graph). Capture needs every tensor on one
CUDA device; a model spread over several GPUs decodes without a step graph.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map


def _signature_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    return (type(value).__name__, id(value))


def step_signature(kwargs: dict[str, Any]) -> tuple:
    """What a compiled decode step depends on besides tensor contents: argument names, tensor
    shapes/dtypes/devices, plain values, and the identity of any other object (the cache)."""
    return tuple((name, _signature_of(kwargs[name])) for name in sorted(kwargs))


def graph_device(kwargs: dict[str, Any], cache_tensors: list[torch.Tensor]) -> torch.device | None:
    """The one CUDA device all tensors of a step live on, or None (CPU, or several devices)."""
    devices = {t.device for t in cache_tensors} | {v.device for v in kwargs.values() if isinstance(v, torch.Tensor)}
    if len(devices) != 1:
        return None
    (device,) = devices
    return device if device.type == "cuda" else None


class _Argument:
    """Where the captured output held one of the call's own arguments (by name)."""

    def __init__(self, name: str) -> None:
        self.name = name


def _detach_arguments(output: Any, kwargs: dict[str, Any]) -> Any:
    by_id = {id(v): k for k, v in kwargs.items() if not isinstance(v, (torch.Tensor, bool, int, float, str, type(None)))}
    return tree_map(lambda x: _Argument(by_id[id(x)]) if id(x) in by_id else x, output)


class StepGraph:
    """One decode step of one request, captured as a CUDA graph (see the module docstring)."""

    def __init__(self, signature: tuple, statics: dict[str, torch.Tensor], graph: torch.cuda.CUDAGraph,
                 output: Any) -> None:
        self.signature = signature
        self.statics = statics
        self.graph = graph
        self.output = output

    @classmethod
    def capture(cls, fn: Callable[..., Any], kwargs: dict[str, Any], device: torch.device) -> tuple["StepGraph", Any]:
        """Run this step for real (also warming up the capture stream), then capture it.
        Returns the graph and this step's output."""
        signature = step_signature(kwargs)
        statics = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        call = {**kwargs, **statics}
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            out = fn(**call)  # the real step; any remaining compile or lazy init happens here
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            static_out = fn(**call)
        return cls(signature, statics, graph, _detach_arguments(static_out, kwargs)), out

    def replay_static(self, inputs: dict[str, torch.Tensor]) -> Any:
        """Replay with new values for some of the captured tensor arguments (by name; the
        others keep their last values) and return the graph's own output, not cloned: its
        tensors are overwritten by the next replay, and an argument handed back (the cache)
        appears as a placeholder. For a caller that consumes the output at once (moa-flex's
        decoding loop copies the logits to fp32 anyway)."""
        for name, value in inputs.items():
            self.statics[name].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output

    def __call__(self, kwargs: dict[str, Any]) -> Any:
        """Replay with this step's arguments (same signature as captured); outputs cloned."""
        output = self.replay_static({name: kwargs[name] for name in self.statics})

        def fresh(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.clone()
            return kwargs[x.name] if isinstance(x, _Argument) else x

        return tree_map(fresh, output)
