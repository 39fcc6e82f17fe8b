"""Precompiled graphs: a second process runs the compiled model without tracing it again.

A warm start with the persistent compile cache (:mod:`moa_flex.runtime.compile_cache`)
skips inductor, but Dynamo still traces the whole forward on every process's first call
(13 s of a 32-layer 8B model's warm start, bench/RESULTS.md). With the cache on, moa-flex
therefore compiles each graph (the prefill graph, the decode-step graph, one per guard set)
through Dynamo's AOT precompile (``aot_compile``): the traced bytecode, the guards and the
compiled graph (:class:`moa_flex.passes.saved.SavedGraph`) are written to one file in the
cache's folder, and a later process reads them back at ``compile`` and calls them directly.

Guards. A graph read back checks the guards on the call's own arguments (tensor dtypes,
devices, shapes and strides up to its symbolic sizes, the values of plain arguments, the
attributes of the cache object) and the global state Dynamo checks (grad mode, default
device, ...). Guards on the model object itself are dropped: its weights, configuration and
code are those the cache folder is keyed by (:func:`~moa_flex.runtime.compile_cache.artifact_key`:
config, plan layout, dtype, device, compile options, library versions). What the key does not
cover is checked by moa-flex on every call instead: the model's configuration as it was at
``compile``, ``model.training``, the forward hooks of its modules and the dtype, device, shape
and strides of its parameters and buffers. A call no graph's guards accept is traced and compiled as
usual, and written too.

When a graph cannot be written (a model whose code Dynamo's serializer refuses), the process
says so once on stderr and keeps the graph it compiled; when AOT precompile cannot capture a
model that plain ``torch.compile`` can, the model runs through ``torch.compile`` (Dynamo traces
it in every process, as before). Neither changes what the model computes.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import os
import pickle
import re
import weakref
import types
from pathlib import Path
from typing import Any, Callable

import torch

from .attention import MoaRuntime
from .compile_cache import write_atomically
from .ops import renamed_runtimes

SWITCH = "MOA_FLEX_PRECOMPILE"  # "0": graphs are traced in every process even with the compile cache on
FORMAT = 1
SUFFIX = ".graph"
UNSERIALIZABLE = ("ID_MATCH", "CLOSURE_MATCH", "FUNCTION_MATCH", "CLASS_MATCH", "MODULE_MATCH", "DICT_VERSION",
                  "NN_MODULE", "WEAKREF_ALIVE")


def precompile_enabled() -> bool:
    """On with the compile cache, unless the environment sets ``MOA_FLEX_PRECOMPILE=0``."""
    return os.environ.get(SWITCH, "1") != "0"


@dataclasses.dataclass(frozen=True)
class Arguments:
    """The traced function's parameters as Dynamo names them in guards: ``model`` the source of
    the model object (``self``, or ``args[0]`` when transformers wraps the forward in a
    ``(*args, **kwargs)`` decorator), ``params`` every parameter name."""

    model: str
    params: tuple[str, ...]

    @classmethod
    def of(cls, forward: Callable) -> "Arguments":
        fn = getattr(forward, "__func__", forward)
        params = list(inspect.signature(fn, follow_wrapped=False).parameters.values())
        if not params:
            raise ValueError(f"{fn} takes no arguments: no model to bind")
        first = params[0]
        model = f"{first.name}[0]" if first.kind is inspect.Parameter.VAR_POSITIONAL else first.name
        return cls(model, tuple(p.name for p in params))

    def names_model(self, text: str) -> bool:
        """Whether a guard's or source's name reaches the model object."""
        if self.model.endswith("[0]"):
            star = self.model[:-3]
            return self.model in text or f"L['{star}'][0]" in text
        return re.search(rf"\b{re.escape(self.model)}\b", text) is not None

    def keep(self, entry: Any) -> bool:
        """Which of Dynamo's guards a written graph keeps: those on the call's own arguments
        and the global state; none that reach the model, a closure or a module-level object."""
        if entry.is_global or entry.guard_type in UNSERIALIZABLE:
            return False
        if set(entry.derived_guard_types or ()) & set(UNSERIALIZABLE):
            return False
        if entry.name == "":
            return True  # global state, shape environment
        if self.names_model(entry.name):
            return False
        return any(re.search(rf"\b{re.escape(p)}\b", entry.name) for p in self.params if p != self.model)

    def filter(self, entries: list) -> list[bool]:
        return [self.keep(e) for e in entries]


@contextlib.contextmanager
def _no_model_key_order(arguments: Arguments) -> Any:
    """Dynamo also records dictionaries whose key order it relies on (the model's module
    dictionaries among them) and rebuilds those guards when a graph is read back, from objects
    a written graph does not hold: drop the ones under the model while writing."""
    from torch._dynamo.output_graph import OutputGraphGuardsState

    dump = OutputGraphGuardsState.dump_guards_state

    def dump_without_model(self: Any) -> Any:
        state = dump(self)
        keep = {s for s in state.guard_on_key_order if not arguments.names_model(s.name)}
        return dataclasses.replace(state, guard_on_key_order=keep)

    OutputGraphGuardsState.dump_guards_state = dump_without_model
    try:
        yield
    finally:
        OutputGraphGuardsState.dump_guards_state = dump


@contextlib.contextmanager
def _builtins_found() -> Any:
    """torch 2.11 checks that every global name the traced bytecode loads is in the globals it
    is given, and builtins (``type``) are not there; Python finds them itself when the function
    runs. Within: the check counts them as found."""
    from torch._dynamo.convert_frame import GraphRuntimeEnv

    check = GraphRuntimeEnv._check_external_refs

    def check_with_builtins(self: Any, f_globals: dict) -> None:
        return check(self, {**vars(builtins), **f_globals})

    GraphRuntimeEnv._check_external_refs = check_with_builtins
    try:
        yield
    finally:
        GraphRuntimeEnv._check_external_refs = check


def _function_chain(method: Callable) -> dict[str, Callable]:
    """The model's forward and every function it wraps (transformers' decorators): objects a
    written graph's closure names but cannot hold, handed back by name when it is read."""
    out, f, i = {}, getattr(method, "__func__", method), 0
    while f is not None and i < 16:
        out[f"forward{i}"] = f
        f, i = getattr(f, "__wrapped__", None), i + 1
    return out


def _tensors_of(model: torch.nn.Module) -> tuple:
    """Dtype, device, shape and strides of every parameter and buffer: what Dynamo's dropped
    guards on the model's tensors checked (their values are the graph's inputs, read per call)."""
    return tuple((t.dtype, t.device, tuple(t.shape), t.stride())
                 for t in (*model.parameters(), *model.buffers()))


def _hooks_of(model: torch.nn.Module) -> tuple:
    """How many forward hooks each module and the global registry hold: hooks Dynamo would trace
    into a graph (and recompile for), which a graph read back does not see."""
    from torch.nn.modules import module as nn_module

    return (tuple(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            len(nn_module._global_forward_hooks) + len(nn_module._global_forward_pre_hooks))


class PrecompiledGraphs:
    """One compiled graph family of a model (``name``: "prefill" or "decode"): a callable with
    the model's forward's signature. Graphs read from ``folder`` are tried first, by their guards; a call none accepts is compiled by AOT precompile with
    ``backend`` and written to ``folder``. ``fallback`` is the plain ``torch.compile`` of the
    same forward and backend, for models AOT precompile cannot capture."""

    def __init__(self, name: str, forward: Callable, backend: Callable, fallback: Callable, folder: Path,
                 runtimes: list[MoaRuntime], say: Callable[[str], None], confirmed: list[bool],
                 model: torch.nn.Module, on_reports: Callable[[list], None]) -> None:
        self.model_ref = weakref.ref(model)
        self.arguments = Arguments.of(forward)
        self.name, self.forward, self.backend, self.fallback = name, forward, backend, fallback
        self.folder, self.runtimes, self.say, self.confirmed = folder, runtimes, say, confirmed
        self.on_reports = on_reports
        self.entries: list[tuple[Any, dict]] = []  # (AOTCompiledFunction, its runtime ids renamed), newest last
        self.last: tuple[Any, dict] | None = None
        self.off: str | None = None  # why this family runs through torch.compile instead
        self.config, self.snapshot, self.hooks = model.config, dict(vars(model.config)), _hooks_of(model)
        self.tensors = _tensors_of(model)
        self.loaded = 0

    # ---- calls
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.off is not None:
            return self.fallback(*args, **kwargs)
        model = self.model_ref()
        if model is None:
            raise RuntimeError("the compiled model is gone")
        if self.last is not None and torch._dynamo.eval_frame._is_skip_guard_eval_unsafe_stance():
            return self._run(self.last, model, args, kwargs)  # a steady decode step: as Dynamo's skipped guards
        self._check_model(model)
        if self.off is not None:  # hooks were added
            return self.fallback(*args, **kwargs)
        for entry in reversed(self.entries):
            if entry[0].guard_check(model, *args, **kwargs):
                self.last = entry
                return self._run(entry, model, args, kwargs)
        fn = self._compile(model, args, kwargs)
        if fn is None:
            return self.fallback(*args, **kwargs)
        self.last = (fn, {})
        self.entries.append(self.last)
        return self._run(self.last, model, args, kwargs)

    @staticmethod
    def _run(entry: tuple[Any, dict], model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        fn, renamed = entry
        if not renamed:
            return fn.fn(model, *args, **kwargs)
        with renamed_runtimes(renamed):
            return fn.fn(model, *args, **kwargs)

    def _check_model(self, model: torch.nn.Module) -> None:
        if model.training:
            raise ValueError("moa_flex runs inference only: call model.eval() (the model was put in training mode)")
        if model.config is not self.config or vars(model.config) != self.snapshot:
            raise ValueError(
                "the model's config changed after moa_flex.compile (compiled graphs follow the config they were compiled "
                "with): moa_flex.uncompile(model), then compile it again")
        if _hooks_of(model) != self.hooks:
            self._turn_off("the model's forward hooks changed after compile (a graph read back would not run them)")
        elif _tensors_of(model) != self.tensors:
            self._turn_off("the model's weights changed dtype, device or layout after compile")

    # ---- compiling and writing
    def _compile(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """AOT-precompile the call (None: AOT precompile cannot; ``self.off`` says why) and write it."""
        raised: list[BaseException] = []

        def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
            try:
                return self.backend(gm, example_inputs)
            except BaseException as e:
                raised.append(e)
                raise

        with torch._dynamo.config.patch(enable_aot_compile=True):  # torch 2.11: off by default, and read here
            compiled = torch.compile(self.forward, backend=backend, dynamic=True, fullgraph=True,
                                     options={"guard_filter_fn": self.arguments.filter})
        try:
            with _no_model_key_order(self.arguments), _builtins_found():
                fn = compiled.aot_compile((args, kwargs))  # the forward is bound: the model is not an argument here
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError):
            raise  # the model's own refusal to be traced: torch.compile would meet it too
        except BaseException as e:
            if raised:
                raise  # the passes' refusal (or a compile error): as torch.compile would raise it
            self._turn_off(f"AOT precompile cannot capture this model ({type(e).__name__}: {str(e)[:200]})")
            return None
        self._write(fn)  # (compiled here, its first-call check already holds the log and the model's flag)
        return fn

    def _turn_off(self, why: str) -> None:
        self.off = why
        self.say(f"precompile: {why}: the {self.name} graphs run through torch.compile from here on (traced in "
                 "every process)")

    def _write(self, fn: Any) -> None:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        try:
            data = AOTCompiledFunction.serialize(fn, _function_chain(self.forward)).serialized_data
        except Exception as e:  # noqa: BLE001 - the graph runs here; only the next process's warm start is lost
            self.say(f"precompile: the {self.name} graph could not be written ({type(e).__name__}: {str(e)[:200]}); "
                     "the next process traces it again")
            return
        g = fn.fn.__globals__
        modules = {ref: g[ref].__name__ for ref in fn._artifacts.runtime_env.external_refs
                   if isinstance(g.get(ref), types.ModuleType)}
        record = {"format": FORMAT, "name": self.name, "runtimes": [r.id for r in self.runtimes],
                  "modules": modules, "data": data}
        blob = pickle.dumps(record)
        path = self.folder / f"{self.name}-{hashlib.sha256(data).hexdigest()[:20]}{SUFFIX}"
        if not path.exists():
            write_atomically(path, blob)

    # ---- reading
    def load(self) -> int:
        """Read this family's written graphs (a file that cannot be read, another torch's or a
        broken one, is skipped and deleted). Returns how many were read."""
        from torch._dynamo.aot_compile import AOTCompiledFunction

        for path in sorted(self.folder.glob(f"{self.name}-*{SUFFIX}")):
            try:
                record = pickle.loads(path.read_bytes())
                if record.get("format") != FORMAT or len(record["runtimes"]) != len(self.runtimes):
                    raise ValueError(f"written by another moa-flex (format {record.get('format')})")
                modules = {ref: importlib.import_module(name) for ref, name in record["modules"].items()}
                with _builtins_found():
                    fn = AOTCompiledFunction.deserialize(record["data"], modules, _function_chain(self.forward))
            except Exception as e:  # noqa: BLE001 - a stale file must not stop compile
                self.say(f"precompile: skipped {path.name} ({type(e).__name__}: {str(e)[:160]})")
                path.unlink(missing_ok=True)
                continue
            saved = fn._artifacts.compiled_fn
            saved.attach(self.say, self.confirmed)
            self.on_reports(saved.reports)
            # the graph's code names the runtimes by the ids they had where it was compiled
            renamed = {i: r for i, r in zip(record["runtimes"], self.runtimes) if i != r.id}
            self.entries.append((fn, renamed))
            self.loaded += 1
        return self.loaded
