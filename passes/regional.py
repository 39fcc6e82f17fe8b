"""Regional compilation: compile one decoder layer and run its code for every layer alike.

A rewritten whole-model graph is cut at decoder-layer boundaries (``model.layers.7`` in a
node's module stack; nodes outside every layer go with the layer they sit between, or to the
parts before the first and after the last layer). Layers whose graphs are equal up to their
inputs, the weights, cache tensors and size symbols that reach them, share one inductor
compile, so compile time stops growing with depth (AOTAutograd and inductor see one layer;
only Dynamo still traces every layer).

What makes sharing exact:

- Equal graphs: the same nodes in the same order with the same constants, inputs with the same
  dtypes, devices, shapes and strides up to a renaming of size symbols (a cache's width is its
  own symbol per layer), compared as a canonical key. The one constant allowed to differ is
  the layer index of ``moa_flex::attention`` (and of an indexer's ``moa_flex::index_keep``): the
  shared code reads it from its runtime
  (``MoaRuntime.current_layer``), which the caller of each layer's part sets first.
- Equal assumptions: inductor may add guards on the size symbols of the layer it compiles
  (divisibility, ranges). Each guard is renamed to every other layer's symbols and checked on
  that layer's sizes; it joins the model's guards (Dynamo re-checks them on later calls), and a
  layer whose sizes fail one gets its own compile.

Not done: fusion across a layer boundary (a layer's last add with the next layer's first norm
is one kernel in a whole-model compile, two here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import sympy
import torch
import torch.fx
from torch.fx.passes.split_module import split_module

import moa_flex.runtime.ops  # noqa: F401  (registers torch.ops.moa_flex.attention)

from .nodes import _LAYER

ATTENTION = (torch.ops.moa_flex.attention, torch.ops.moa_flex.attention.default)
LAYER_ARG, RUNTIME_ARG = 5, 6  # moa_flex::attention(q, k, v, mask, scale, layer, runtime_id, ...)
# the ops that carry a plan layer, with the positions of it and of their runtime id: attention and
# an indexer's keep rule (moa_flex::index_keep(scores, info, layer, runtime_id), passes/indexed.py)
LAYERED = {**{t: (LAYER_ARG, RUNTIME_ARG) for t in ATTENTION},
           torch.ops.moa_flex.index_keep: (2, 3), torch.ops.moa_flex.index_keep.default: (2, 3)}
FROM_RUNTIME = -1  # the layer index a shared region's attention reads from its runtime
PRE, POST = -1, 1 << 30  # regions before the first and after the last decoder layer


@dataclass
class RegionReport:
    """What regional compilation did to one graph: the decoder layers it found, the inductor
    compiles it ran (one per distinct layer graph, plus the parts around the layers) and which
    layers reused which layer's code."""

    layers: list[int] = field(default_factory=list)
    compiles: int = 0
    shared: dict[int, int] = field(default_factory=dict)  # layer -> the layer whose compiled code it runs
    guards_moved: int = 0
    whole: str = ""  # why the graph was compiled whole instead (empty: it was not)


def node_region(node: torch.fx.Node) -> int | None:
    """The decoder layer a node belongs to (outermost layer path in its module stack), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _type in stack.values():
        m = _LAYER.search(str(path))
        if m:
            return int(m.group(1))
    return None


def regions(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """A region per computing node: its decoder layer; a node outside every layer goes with
    the layer last seen (PRE before the first layer, POST after the last layer's nodes)."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    layer_of = {n: node_region(n) for n in nodes}
    last = max((i for i, n in enumerate(nodes) if layer_of[n] is not None), default=-1)
    out, current = {}, PRE
    for i, n in enumerate(nodes):
        if layer_of[n] is not None:
            current = layer_of[n]
        out[n] = POST if i > last else current
    return out


def compile_regions(gm: torch.fx.GraphModule, example_inputs: list,
                    compile_one: Callable[[torch.fx.GraphModule, list], Callable],
                    report: RegionReport | None = None, compile_outer: bool = True) -> Callable | None:
    """``gm`` compiled region by region with ``compile_one(graph_module, fake_inputs)`` (inductor's
    compile_fx), equal layers sharing one compile; None when the graph has fewer than two
    decoder layers in order (the caller compiles it whole). Must run inside the Dynamo backend
    call that traced ``gm`` (its fake tensors and shape environment). ``compile_outer``: compile
    the parts before and after the layers too (else they run as traced, uncompiled)."""
    report = report if report is not None else RegionReport()
    region = regions(gm.graph)
    order = _ordered(region.values())
    layers = [r for r in order if r not in (PRE, POST)]
    if len(layers) < 2:
        return None  # nothing to share
    if len(set(layers)) != len(layers):
        report.whole = "a decoder layer's nodes are interleaved with another layer's"
        return None
    fake_mode, shape_env = _fake_mode()
    if fake_mode is None:
        report.whole = "no fake tensors to compile parts with (not inside a Dynamo backend call)"
        return None
    rank = {r: i for i, r in enumerate(order)}
    try:  # the cut itself: a graph it cannot take compiles whole (same code as regional=False)
        split = split_module(gm, gm, lambda n: rank[region[n]], keep_original_order=True)
        part_args = _part_inputs(gm, split, _fake_inputs(example_inputs, fake_mode), fake_mode)
    except Exception as e:  # noqa: BLE001  (split_module or fake propagation refusing this graph)
        report.whole = f"the graph could not be cut by layer ({type(e).__name__}: {str(e)[:200]})"
        return None
    compiled: dict[tuple, tuple[int, Callable, dict, list]] = {}  # key -> (layer, code, symbols, new guards)
    for node in split.graph.nodes:
        if node.op != "call_module":
            continue
        part = getattr(split, node.target)
        r = order[int(str(node.target).rsplit("_", 1)[1])]
        args = part_args[node]
        single = _tuple_output(part)
        attention_layers = _attention_layers(part)
        key, symbols, inputs_order = canonical_key(part, args, shape_env)
        code, perm = None, None
        if key in compiled and r not in (PRE, POST) and len(attention_layers) <= 1:
            owner, shared, owner_symbols, guards, owner_order = compiled[key]
            if _guards_hold(guards, owner_symbols, symbols, shape_env):
                code, report.shared[r] = shared, owner
                report.guards_moved += len(guards)
                perm = [0] * len(inputs_order)  # the owner's input at canonical position c is this part's
                for c, j in enumerate(owner_order):
                    perm[j] = inputs_order[c]
        if code is None and r in (PRE, POST) and not compile_outer:
            code = part  # run as traced: no compile for the few ops around the layers
        if code is None:
            if len(attention_layers) == 1:
                _free_layer(part)
            before = len(shape_env.guards) if shape_env is not None else 0
            code = compile_one(part, args)
            report.compiles += 1
            guards = [g.expr for g in shape_env.guards[before:]] if shape_env is not None else []
            compiled.setdefault(key, (r, code, symbols, guards, inputs_order))
        # the plan's layer index its attention runs as (a hybrid's attention layers are numbered apart)
        layer = next(iter(attention_layers)) if len(attention_layers) == 1 else None
        setattr(split, node.target, _Region(code, layer, _runtime_ids(part), single, perm))
    report.layers = layers
    split.recompile()
    return split


class _Region(torch.nn.Module):
    """One part of the split graph: its compiled code (maybe another layer's), the layer its
    attention runs as, and the unwrapping of a single output."""

    def __init__(self, code: Callable, layer: int | None, runtimes: list[int], single: bool,
                 perm: list[int] | None) -> None:
        super().__init__()
        self.code, self.layer, self.runtimes, self.single, self.perm = code, layer, runtimes, single, perm

    def forward(self, *args: Any) -> Any:
        if self.layer is not None:
            for rid in self.runtimes:
                moa_flex.runtime.ops.runtime_of(rid).current_layer = self.layer
        if self.perm is not None:  # this part's inputs in the order of the part whose code it runs
            args = tuple(args[j] for j in self.perm)
        out = self.code(*args)
        return out[0] if self.single else out

    def map_parts(self, f: Callable[[Any], Any]) -> "_Region":
        """A copy running ``f(code)`` (moa_flex.passes.saved writes clean copies)."""
        return _Region(f(self.code), self.layer, list(self.runtimes), self.single,
                       None if self.perm is None else list(self.perm))


def _ordered(values: Iterable[int]) -> list[int]:
    seen: dict[int, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def _fake_mode() -> tuple[Any, Any]:
    ctx = torch._guards.TracingContext.try_get()
    mode = getattr(ctx, "fake_mode", None)
    return mode, getattr(mode, "shape_env", None)


def _fake_inputs(example_inputs: list, fake_mode: Any) -> list:
    """The graph's inputs as the backend's fake tensors, with Dynamo's size symbols (what
    AOTAutograd itself makes of a Dynamo graph's real inputs)."""
    ctx = torch._guards.TracingContext.try_get()
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and not isinstance(x, torch._subclasses.FakeTensor):
            sc = ctx.tensor_to_context.get(x) if ctx is not None else None
            x = fake_mode.from_tensor(x, symbolic_context=sc, source=getattr(sc, "tensor_source", None))
        out.append(x)
    return out


def _part_inputs(gm: torch.fx.GraphModule, split: torch.fx.GraphModule, inputs: list, fake_mode: Any) -> dict:
    """Each part's example inputs (call_module node -> list): the graph's own inputs as given,
    other values from the example value Dynamo recorded on the node that made them (same
    size symbols; re-made in the backend's fake mode). A part input without a recorded value
    makes every part's inputs come from fake propagation through the split graph instead."""
    originals = {n.name: n for n in gm.graph.nodes}
    given = dict(zip((n.name for n in gm.graph.nodes if n.op == "placeholder"), inputs))
    out: dict[torch.fx.Node, list] = {}
    for node in split.graph.nodes:
        if node.op != "call_module":
            continue
        args = []
        for ph in (n for n in getattr(split, node.target).graph.nodes if n.op == "placeholder"):
            if ph.name in given:
                args.append(given[ph.name])
                continue
            o = originals.get(ph.name)
            value = None if o is None else o.meta.get("example_value", o.meta.get("val"))
            if value is None:
                return _propagated_inputs(split, inputs, fake_mode)
            args.append(_refake(value, fake_mode))
        out[node] = args
    return out


def _refake(value: Any, fake_mode: Any) -> Any:
    """A tensor of ``value``'s metadata (sizes, strides, dtype, device) in ``fake_mode``."""
    if not isinstance(value, torch.Tensor):
        return value
    with fake_mode:
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)


def _propagated_inputs(split: torch.fx.GraphModule, inputs: list, fake_mode: Any) -> dict:
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    with fake_mode:  # every part's example inputs, as the parts before it produce them
        FakeTensorProp(split, mode=fake_mode).propagate_dont_convert_inputs(*inputs)
    return {n: [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in n.args]
            for n in split.graph.nodes if n.op == "call_module"}


def _tuple_output(part: torch.fx.GraphModule) -> bool:
    """Make ``part`` return a tuple (what compile_fx expects); True if it returned one value."""
    out = next(n for n in reversed(part.graph.nodes) if n.op == "output")
    if isinstance(out.args[0], (tuple, list)):
        return False
    out.args = ((out.args[0],),)
    part.recompile()
    return True


def _runtime_ids(part: torch.fx.GraphModule) -> list[int]:
    return sorted({int(n.args[LAYERED[n.target][1]]) for n in part.graph.nodes
                   if n.op == "call_function" and n.target in LAYERED})


def _attention_layers(part: torch.fx.GraphModule) -> set[int]:
    """The plan layer indices ``part``'s attention calls run as (an empty set: no attention)."""
    return {int(n.args[LAYERED[n.target][0]]) for n in part.graph.nodes if n.op == "call_function"
            and n.target in LAYERED and int(n.args[LAYERED[n.target][0]]) != FROM_RUNTIME}


def _free_layer(part: torch.fx.GraphModule) -> None:
    """Attention in ``part`` reads its layer from the runtime (the code may serve several layers)."""
    changed = False
    for n in part.graph.nodes:
        if n.op == "call_function" and n.target in LAYERED:
            args = list(n.args)
            args[LAYERED[n.target][0]] = FROM_RUNTIME
            n.args = tuple(args)
            changed = True
    if changed:
        part.recompile()


# ------------------------------------------------------------------------------ equal graphs
def canonical_key(part: torch.fx.GraphModule, args: list,
                  shape_env: Any = None) -> tuple[tuple, dict[str, sympy.Symbol], list[int]]:
    """(key, symbols, order): equal keys mean equal graphs over inputs equal up to a renaming of
    size symbols. Inputs are compared in order of first use (split_module's input order varies
    between equal parts); ``order`` lists this part's input positions in that order, and
    ``symbols`` maps each canonical name (``c0``, ``c1``, ...) to this part's symbol. With a
    ``shape_env``, what it already knows of each symbol (its value range, a replacement) is part
    of the key too: a compile may rely on that without adding a guard."""
    nodes = list(part.graph.nodes)
    holders = [n for n in nodes if n.op == "placeholder"]
    first_use: dict[torch.fx.Node, tuple[int, int]] = {}  # (node, argument position) of its first read
    for i, n in enumerate(nodes):
        for k, x in enumerate(n.all_input_nodes):
            if x.op == "placeholder":
                first_use.setdefault(x, (i, k))
    used = sorted((j for j in range(len(holders)) if holders[j] in first_use), key=lambda j: first_use[holders[j]])
    names: dict[sympy.Symbol, sympy.Symbol] = {}
    inputs_used = [_input_key(args[j], names) for j in used]
    # inputs no node reads (Dynamo's size symbols): by value, named after the inputs read
    unused = sorted(((_input_key(args[j], dict(names)), j) for j in range(len(holders)) if holders[j] not in first_use),
                    key=lambda kj: (repr(kj[0]), kj[1]))
    order = used + [j for _, j in unused]
    inputs = tuple(inputs_used + [k for k, _ in unused])
    index = {holders[j]: ("input", c) for c, j in enumerate(order)}
    index.update({n: ("node", i) for i, n in enumerate(nodes) if n.op != "placeholder"})
    body = []
    for n in nodes:
        if n.op == "placeholder":
            continue
        a = list(n.args)
        if n.op == "call_function" and n.target in LAYERED:
            a[LAYERED[n.target][0]] = "layer"
        body.append((n.op, _target(n.target), _value_key(tuple(a), index, names),
                     _value_key(dict(n.kwargs), index, names)))
    return (inputs, tuple(body), _known(names, shape_env)), {str(c): s for s, c in names.items()}, order


def _known(names: dict, shape_env: Any) -> tuple:
    """Per canonical symbol: its value range and replacement (renamed) in ``shape_env``."""
    if shape_env is None:
        return ()
    ranges, replaced = getattr(shape_env, "var_to_range", {}), getattr(shape_env, "replacements", {})
    return tuple((str(c), str(ranges.get(sym)), _sym(replaced[sym], dict(names)) if sym in replaced else "")
                 for sym, c in list(names.items()))


def _target(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}:{id(target)}"


def _sym(expr: Any, names: dict) -> str:
    """A size (int, SymInt or expression) with its symbols renamed in order of appearance."""
    if isinstance(expr, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        expr = expr.node.expr
    if not isinstance(expr, sympy.Basic):
        return repr(expr)
    for s in sorted(expr.free_symbols, key=lambda s: s.name) if not isinstance(expr, sympy.Symbol) else [expr]:
        names.setdefault(s, sympy.Symbol(f"c{len(names)}", integer=True))
    return sympy.srepr(expr.xreplace(names))


def _input_key(a: Any, names: dict) -> tuple:
    if isinstance(a, torch.Tensor):
        return ("tensor", str(a.dtype), str(a.device), a.requires_grad, tuple(_sym(s, names) for s in a.shape),
                tuple(_sym(s, names) for s in a.stride()), _sym(a.storage_offset(), names))
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", type(a).__name__, _sym(a, names))
    return ("const", type(a).__name__, repr(a))


def _value_key(v: Any, index: dict, names: dict) -> Any:
    if isinstance(v, torch.fx.Node):
        return index[v]
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_value_key(x, index, names) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _value_key(x, index, names)) for k, x in sorted(v.items())))
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Basic)):
        return ("sym", _sym(v, names))
    if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return ("torch", str(v))
    if isinstance(v, (int, float, bool, str, type(None))):
        return ("const", type(v).__name__, repr(v))
    if isinstance(v, slice):
        return ("slice", _value_key((v.start, v.stop, v.step), index, names))
    return ("other", type(v).__qualname__, repr(v))  # repr of an unknown object: equal only if printed alike


# ------------------------------------------------------------------------------ equal assumptions
def _guards_hold(guards: list, owner: dict[str, sympy.Symbol], member: dict[str, sympy.Symbol], shape_env: Any) -> bool:
    """Whether every guard the owner's compile added holds for the member's sizes, once renamed;
    each renamed guard is recorded in the shape environment (Dynamo re-checks it later)."""
    if not guards:
        return True
    if shape_env is None:
        return False
    rename = {owner[c]: member[c] for c in owner if c in member}
    renamed = [g.xreplace(rename) for g in guards]
    hints = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val  # renamed in torch 2.12
    for g in renamed:  # checked on the member's sizes before anything is recorded
        value = g.xreplace(hints)
        if value not in (sympy.true, True):
            return False
    for g in renamed:
        shape_env.evaluate_expr(g)
    return True


