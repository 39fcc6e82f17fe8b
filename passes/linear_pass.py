"""FX graph pass: fuse a decode step's skinny projections into moa-flex's linear kernels.

In a decode step x has few rows (M = batch x new tokens), so each projection is bound by
reading its weight, and one launch per projection costs more than the work. This pass finds
the bias-free linear calls of a traced graph (``F.linear`` / ``torch._C._nn.linear`` /
``aten.linear``) and groups them by their input node:

* gated MLP: ``mul(silu(linear(x, W_gate)), linear(x, W_up))`` (either order of the
  product), where the two linears and the silu feed nothing else, becomes
  ``torch.ops.moa_flex.gated_mlp(x, W_gate, W_up)``;
* any other 2 or 3 linears on one x (q/k/v) become ``torch.ops.moa_flex.grouped_linear(x,
  [W...])`` with one ``operator.getitem`` per output.

The weights are passed as the graph's own weight nodes (placeholders or get_attr): nothing
is concatenated or copied. A group is rewritten whole or not at all; one that does not
qualify (a bias, a weight that is not a stored contiguous 2-D tensor, mixed dtypes, too
many rows, ...) is left unchanged and listed in the report with the reason.

Rows: M is the product of x's leading dims, read from the shapes Dynamo recorded in
``node.meta``. A static M is compared with ``max_rows``. Under ``dynamic=True`` the decode
step's batch is a symbol (one graph serves every batch size); then:

* if the shape environment proves ``M <= max_rows`` (or ``M > max_rows``) the answer is used
  as is;
* else, inside a Dynamo compile (a backend call), the decision follows the symbol's hint
  (the batch of the call being compiled) and installs the guard ``M <= max_rows`` (or
  ``M > max_rows``) into Dynamo's guards, so the graph only serves batches on the same side
  of ``max_rows``: a batch on the other side recompiles once and gets its own graph;
* else (no hint, or no Dynamo compile that would enforce a guard) the group is skipped.

``max_rows`` is a speed rule, not a correctness one: the ops are exact for any M, but on an
H200 the kernels lose to cuBLAS at M = 85 (bench/RESULTS.md).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import moa_flex.runtime.ops  # noqa: F401  (registers torch.ops.moa_flex.grouped_linear / gated_mlp)
from moa_flex.kernels.linear import MAX_WEIGHTS
from moa_flex.kernels.triton_support import FLOAT_DTYPES

from .nodes import node_layer

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)
SILU_TARGETS = (torch.nn.functional.silu, torch._C._nn.silu, torch.ops.aten.silu.default, torch.ops.aten.silu_.default)
MUL_TARGETS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)
GATED, GROUPED = "gated_mlp", "grouped_linear"
_KEEP_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


@dataclass
class LinearGroup:
    """Linears sharing one input: fused into one op, or skipped with the reason."""

    kind: str  # "gated_mlp" or "grouped_linear"
    layer: int | None  # decoder layer from the module stack (None outside a layer)
    modules: list[str]  # module path (or node name) of each linear, in graph order
    rows: str  # M as traced: "1", "s52", ...
    node: str = ""  # the fused node (empty when skipped)
    reason: str = ""  # why it was skipped (empty when fused)


@dataclass
class LinearFusionReport:
    """What :func:`fuse_linears` did to one graph."""

    fused: list[LinearGroup] = field(default_factory=list)
    skipped: list[LinearGroup] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)  # shape guards installed for symbolic rows
    graph_module: torch.fx.GraphModule | None = None

    @property
    def gated(self) -> int:
        """Number of gated-MLP groups fused."""
        return sum(g.kind == GATED for g in self.fused)

    @property
    def grouped(self) -> int:
        """Number of grouped-linear (q/k/v) groups fused."""
        return sum(g.kind == GROUPED for g in self.fused)

    def by_layer(self) -> dict[int | None, list[LinearGroup]]:
        """Fused groups per decoder layer."""
        out: dict[int | None, list[LinearGroup]] = {}
        for g in self.fused:
            out.setdefault(g.layer, []).append(g)
        return out

    def summary(self) -> str:
        """One line: counts of fused and skipped groups (and the first skip reason)."""
        text = f"linear fusion: {self.gated} gated_mlp, {self.grouped} grouped_linear, {len(self.skipped)} skipped"
        if self.skipped:
            text += f" (first: {self.skipped[0].reason})"
        return text


# ---------------------------------------------------------------------------------- matching
def _arg(node: torch.fx.Node, index: int, name: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def is_linear(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls a linear function (bias or not)."""
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def linear_parts(node: torch.fx.Node) -> tuple[Any, Any, Any]:
    """(input, weight, bias) of a linear call node (bias None when absent)."""
    return _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")


def _is_silu(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in SILU_TARGETS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _silu_modules())
    return False


def _silu_modules() -> tuple[type, ...]:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # transformers without that class: torch's module only
        return (torch.nn.SiLU,)
    return (torch.nn.SiLU, SiLUActivation)


def _is_mul(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "mul" and not node.kwargs
    return node.op == "call_function" and node.target in MUL_TARGETS and not node.kwargs


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _gated_pair(linears: list[torch.fx.Node], gm: torch.fx.GraphModule) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node, torch.fx.Node] | None:
    """(gate linear, up linear, silu, mul) when two linears form ``silu(gate) * up``, each
    node feeding only the next; else None."""
    if len(linears) != 2:
        return None
    for gate, up in (linears, linears[::-1]):
        silu = _only_user(gate)
        if silu is None or not _is_silu(silu, gm) or silu.args[:1] != (gate,):
            continue
        mul = _only_user(silu)
        if mul is None or not _is_mul(mul) or len(mul.args) != 2 or set(mul.args) != {silu, up}:
            continue
        if _only_user(up) is mul and _same_weight_shape(gate, up, gm):
            return gate, up, silu, mul
    return None


def _same_weight_shape(a: torch.fx.Node, b: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether two linears' weights are recorded with one shape (a product that broadcasts,
    e.g. an up weight of one row, is not the gated kernel's)."""
    wa, wb = _value(linear_parts(a)[1], gm), _value(linear_parts(b)[1], gm)
    return wa is not None and wb is not None and wa.dim() == wb.dim() == 2 and all(
        _known_equal(p, q) for p, q in zip(wa.shape, wb.shape))


# ---------------------------------------------------------------------------------- checks
def _value(node: Any, gm: torch.fx.GraphModule) -> Any:
    """The (fake) tensor a node stands for: recorded meta, or a get_attr's real attribute."""
    if not isinstance(node, torch.fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    if val is None and node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        val = obj
    return val if isinstance(val, torch.Tensor) else None


def _weight_problem(w: Any, x: torch.Tensor, gm: torch.fx.GraphModule) -> str:
    """Why a weight node cannot go to the kernel ('' when it can)."""
    if not isinstance(w, torch.fx.Node) or w.op not in ("placeholder", "get_attr"):
        return f"weight {w} is not a stored tensor (placeholder or get_attr)"
    t = _value(w, gm)
    if t is None:
        return f"no tensor recorded for weight {w.name}"
    if t.dim() != 2:
        return f"weight {w.name} is {t.dim()}-D, not [N, K]"
    if not _known_equal(t.shape[1], x.shape[-1]):
        return f"weight {w.name} has K = {t.shape[1]} but x has K = {x.shape[-1]}"
    if t.dtype != x.dtype:
        return f"weight {w.name} is {t.dtype}, x is {x.dtype}"
    if t.device != x.device:
        return f"weight {w.name} is on {t.device}, x on {x.device}"
    if not t.is_contiguous():
        return f"weight {w.name} is not contiguous"
    return ""


def _known_equal(a: Any, b: Any) -> bool:
    return statically_known_true(a == b)


def _rows_decision(M: Any, max_rows: int, guards: list[str]) -> tuple[bool, str]:
    """(rewrite?, reason if not) for M rows: static, proven, or guarded on the hint (see module doc)."""
    if statically_known_true(M <= max_rows):
        return True, ""
    if statically_known_true(M > max_rows):
        return False, f"M = {M} rows > max_rows = {max_rows}"
    if not (isinstance(M, torch.SymInt) and M.node.has_hint() and _guards_enforced(M)):
        return False, f"M = {M} rows is symbolic and cannot be guarded here (not provably <= {max_rows})"
    small = bool(M <= max_rows)  # evaluates on the hint and records the guard in the shape env
    guard = f"{M} {'<=' if small else '>'} {max_rows}"
    if guard not in guards:
        guards.append(guard)
    return (True, "") if small else (False, f"M = {M} rows > max_rows = {max_rows} (hint; guarded)")


def _guards_enforced(M: torch.SymInt) -> bool:
    """Whether a guard on M ends up in Dynamo's guards: we are inside the Dynamo compile that
    owns M's shape environment."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    fake_mode = getattr(ctx, "fake_mode", None) if ctx is not None else None
    return fake_mode is not None and fake_mode.shape_env is M.node.shape_env


def _group_problem(x: Any, linears: list[torch.fx.Node], gm: torch.fx.GraphModule, max_rows: int,
                   guards: list[str]) -> tuple[str, str]:
    """(reason the group cannot be fused or '', M as text)."""
    xv = _value(x, gm)
    if xv is None:
        return f"no shape recorded for input {getattr(x, 'name', x)}", "?"
    M = math.prod(xv.shape[:-1])
    if xv.dtype not in FLOAT_DTYPES:
        return f"x is {xv.dtype}, the kernels take {', '.join(map(str, FLOAT_DTYPES))}", str(M)
    for node in linears:
        _x, w, bias = linear_parts(node)
        if bias is not None:
            return f"{node.name} has a bias", str(M)
        problem = _weight_problem(w, xv, gm)
        if problem:
            return problem, str(M)
    ok, reason = _rows_decision(M, max_rows, guards)
    return ("" if ok else reason), str(M)


# ---------------------------------------------------------------------------------- rewrite
def _where(node: torch.fx.Node) -> tuple[int | None, str]:
    """(decoder layer or None, module path or node name) of a node."""
    try:
        layer, path = node_layer(node)
    except ValueError:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        layer, path = None, str(stack[-1][0]) if stack else node.name
    return layer, re.sub(r"^L\['\w+'\]\.", "", path)  # Dynamo's root: L['self'], L['model'], ...


def _copy_meta(new: torch.fx.Node, old: torch.fx.Node) -> None:
    new.meta = {k: v for k, v in old.meta.items() if k in _KEEP_META}


def _rewrite_gated(gm: torch.fx.GraphModule, x: torch.fx.Node, gate: torch.fx.Node, up: torch.fx.Node,
                   silu: torch.fx.Node, mul: torch.fx.Node) -> torch.fx.Node:
    graph = gm.graph
    with graph.inserting_before(mul):
        new = graph.call_function(torch.ops.moa_flex.gated_mlp.default, (x, linear_parts(gate)[1], linear_parts(up)[1]))
    _copy_meta(new, mul)
    mul.replace_all_uses_with(new)
    for node in (mul, silu, up, gate):
        graph.erase_node(node)
    return new


def _rewrite_grouped(gm: torch.fx.GraphModule, x: torch.fx.Node, linears: list[torch.fx.Node]) -> torch.fx.Node:
    graph = gm.graph
    first = linears[0]
    weights = [linear_parts(n)[1] for n in linears]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for w in weights:  # a get_attr defined after the first linear (symbolic_trace) moves up
        if order[w] > order[first]:
            first.prepend(w)
    with graph.inserting_before(first):
        new = graph.call_function(torch.ops.moa_flex.grouped_linear.default, (x, weights))
        outs = [graph.call_function(operator.getitem, (new, i)) for i in range(len(linears))]
    _copy_meta(new, first)
    for out, node in zip(outs, linears):
        _copy_meta(out, node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return new


def _linears_by_input(graph: torch.fx.Graph) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if is_linear(node) and isinstance(linear_parts(node)[0], torch.fx.Node):
            groups.setdefault(linear_parts(node)[0], []).append(node)
    return groups


def fuse_linears(gm: torch.fx.GraphModule, max_rows: int = 16) -> LinearFusionReport:
    """Rewrite gated-MLP pairs into ``moa_flex::gated_mlp`` and 2-3 linears sharing an input
    into ``moa_flex::grouped_linear`` when x has at most ``max_rows`` rows (see the module
    docstring for symbolic rows). Groups are checked whole before any rewrite; a graph with
    nothing to fuse is returned unchanged with an empty report."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
    report = LinearFusionReport(graph_module=gm)
    plans = []
    for x, linears in _linears_by_input(gm.graph).items():
        if len(linears) < 2:
            continue
        gated = _gated_pair(linears, gm)
        kind = GATED if gated else GROUPED
        layer, _ = _where(linears[0])
        group = LinearGroup(kind, layer, [_where(n)[1] for n in linears], "?")
        if len(linears) > MAX_WEIGHTS:
            group.reason = f"{len(linears)} linears share input {x.name}; the kernel takes at most {MAX_WEIGHTS}"
        else:
            group.reason, group.rows = _group_problem(x, linears, gm, max_rows, report.guards)
        if group.reason:
            report.skipped.append(group)
        else:
            plans.append((group, x, linears, gated))
    for group, x, linears, gated in plans:
        new = _rewrite_gated(gm, x, *gated) if gated else _rewrite_grouped(gm, x, linears)
        group.node = new.name
        report.fused.append(group)
    if plans:
        gm.graph.lint()
        gm.recompile()
    return report
