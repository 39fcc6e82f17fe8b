"""Compiled graphs that torch's AOT precompile can write to disk and read back.

moa-flex's backends return a :class:`SavedGraph`: the compiled graph (inductor's code, the
regional split of it, the first-call check around it) plus what the passes reported. Called,
it runs the graph. Under ``torch.compile`` nothing more happens; under Dynamo's AOT precompile
(``aot_compile``, used by :mod:`moa_flex.runtime.precompiled`) it is written to a file with the
traced bytecode and guards, and a later process reads it back without tracing the model again.

What is written: inductor's code as AOTAutograd's bundled cache entry (the generated wrapper
and its compiled kernels; :class:`InductorCode`), the FX graphs that run uncompiled (the
regional split's top graph, the CPU's traced parts around the layers, the first-call check's
graph) through torch's ``GraphPickler``, with their node metadata dropped (only tracing and
compiling read it), and the passes' reports without their graph modules. Inductor's code can be
written only when it was compiled inside ``aot_compile`` (its bundled-cache setting); otherwise
pickling raises :class:`Unsavable`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable, SerializableCallable


class Unsavable(RuntimeError):
    """A compiled graph that cannot be written (code compiled outside AOT precompile)."""


class InductorCode:
    """Inductor's compiled code for one graph (``compile_fx``'s result): called as it, and
    pickled as AOTAutograd's bundled entry when it has one."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __reduce__(self) -> tuple:
        if getattr(self.fn, "serialize", None) is None:
            raise Unsavable("inductor's code was compiled outside AOT precompile (no bundled cache entry to write)")
        wrapped = BundledAOTAutogradSerializableCallable(self.fn)
        return _load_inductor_code, (BundledAOTAutogradSerializableCallable.serialize_compile_artifacts(wrapped),)


def _load_inductor_code(data: bytes) -> InductorCode:
    return InductorCode(BundledAOTAutogradSerializableCallable.deserialize_compile_artifacts(data).compiled_fn)


class SavedGraph(SerializableCallable):
    """A moa-flex backend's result: ``fn`` (the compiled graph, called with the graph's
    flat inputs) and the passes' ``reports`` (kept with it, so that a process that reads the
    graph back knows what was rewritten). ``attach(say, confirmed)`` reconnects what a
    written graph cannot carry: the start-up log's line writer and the model's shared
    "own-code attention confirmed" flag of the first-call check."""

    def __init__(self, fn: Callable, reports: list | None = None) -> None:
        self.fn = fn
        self.reports = list(reports or [])

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def attach(self, say: Callable[[str], None] | None, confirmed: list[bool] | None) -> None:
        reattach = getattr(self.fn, "reattach", None)  # the first-call check wraps the whole graph
        if reattach is not None:
            reattach(say, confirmed)

    @classmethod
    def serialize_compile_artifacts(cls, fn: "SavedGraph") -> bytes:
        from torch.fx._graph_pickler import GraphPickler, Options

        state = {"fn": _cleaned(fn.fn, {}), "reports": [_without_graph(r) for r in fn.reports]}
        options = Options(ops_filter=None)
        try:
            with _slices_as_pytree():
                return GraphPickler.dumps(state, options)
        except Exception as e:
            where = GraphPickler.debug_dumps(state, options, verbose=False) if hasattr(GraphPickler, "debug_dumps") else None
            raise Unsavable(f"{type(e).__name__}: {e} (at {where})") from e

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> "SavedGraph":
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        with _slices_as_pytree():
            state = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv()))
        for obj in _walk(state["fn"]):
            if isinstance(obj, torch.fx.GraphModule):
                obj.recompile()
        return cls(state["fn"], state["reports"])


@contextlib.contextmanager
def _slices_as_pytree() -> Iterator[None]:
    """Within: ``slice`` is a pytree node, so that the graph pickler maps the FX nodes inside a
    slice argument (``x[:, n:]`` with a symbolic ``n``); torch 2.13's pickler does this itself,
    2.11's raises "Unexpected raw Node"."""
    import torch.utils._pytree as pytree

    if slice in pytree.SUPPORTED_NODES:
        yield
        return
    pytree._private_register_pytree_node(slice, lambda x: ([x.start, x.stop, x.step], None), lambda x, c: slice(*x))
    try:
        yield
    finally:
        pytree._deregister_pytree_node(slice)


def _cleaned(obj: Any, memo: dict[int, Any]) -> Any:
    """What is written of a compiled-graph part: graph modules as fresh ones holding only their
    graph (no node metadata) and the submodules and attributes it uses; moa-flex's wrappers
    (``map_parts``) with their parts cleaned; anything else (inductor's code) as it is. Shared
    parts stay shared."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.fx.GraphModule):
        out = _clean_graph_module(obj, memo)
    elif hasattr(obj, "map_parts"):
        out = obj.map_parts(lambda part: _cleaned(part, memo))
    else:
        out = obj
    memo[id(obj)] = out
    return out


def _clean_graph_module(gm: torch.fx.GraphModule, memo: dict[int, Any]) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    root: dict[str, Any] = {}
    for node in graph.nodes:
        node.meta = {}
        if node.op in ("get_attr", "call_module"):
            value = gm
            for name in str(node.target).split("."):
                value = getattr(value, name)
            root[node.target] = _cleaned(value, memo)
    return torch.fx.GraphModule(root, graph)


def _without_graph(report: Any) -> Any:
    """A copy of a pass report (a dataclass) without the graph modules it or its nested reports
    hold (the graph a process compiled stays in that process)."""
    if not dataclasses.is_dataclass(report) or isinstance(report, type):
        return report
    changes = {}
    for f in dataclasses.fields(report):
        value = getattr(report, f.name)
        if isinstance(value, torch.fx.GraphModule):
            changes[f.name] = None
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _without_graph(value)
    return dataclasses.replace(report, **changes)


def _walk(obj: Any) -> list:
    """``obj`` and what it holds of moa-flex's compiled-graph parts (graph modules, their
    submodules, the first-call check's graphs), each once."""
    seen: dict[int, Any] = {}
    todo = [obj]
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen:
            continue
        seen[id(o)] = o
        if isinstance(o, torch.nn.Module):
            todo.extend(o.children())
        todo.extend(getattr(o, "parts", lambda: [])())
    return list(seen.values())

