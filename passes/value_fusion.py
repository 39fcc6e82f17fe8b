"""FX graph pass: a layer's attention calls that differ only in their values become one call.

Differential attention (DiffLlama) calls SDPA twice per layer with the same queries, keys,
mask and scale, on two value tensors carved from the one it cached, and concatenates the
outputs. Both calls compute the same softmax, so

    cat([softmax(QK^T) V1, softmax(QK^T) V2], -1) == softmax(QK^T) cat([V1, V2], -1)

exactly: one call over the values side by side, its output sliced back into the two. After
this pass each layer has one attention call again, which the other passes rewrite as usual;
the MoA cache then holds the side-by-side values (the layout the call reads, passes/nodes.py
``cached_layout``), twice the model's value width. Calls are fused only when their queries,
mask, scale and flags are the same nodes or constants and their keys are the same
computation; anything else is left alone (and refused later, one call per layer).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from .nodes import SINK_TARGETS, arg, attention_nodes, call_layers, eliminate_dead_code, keeps_effects, recorded_value

_SAME_DEPTH = 8  # how far back two key computations are compared node by node


def fuse_value_splits(graph: torch.fx.Graph) -> int:
    """Fuse every layer's SDPA calls that share queries, keys, mask and scale (module
    docstring); returns how many calls were removed. The graph is changed in place."""
    by_layer: dict[int, list[torch.fx.Node]] = {}
    nodes = attention_nodes(graph)
    try:
        layers = [layer for layer, _ in call_layers(nodes, in_call_order=False)]  # by module: its calls may repeat
    except ValueError:
        return 0  # reported by the pass proper
    for node, layer in zip(nodes, layers):
        by_layer.setdefault(layer, []).append(node)
    removed = 0
    roots: list[torch.fx.Node] = []
    for calls in by_layer.values():
        if len(calls) > 1 and _fusable(calls) and _hoist(graph, calls):
            _fuse(graph, calls, roots)
            removed += len(calls) - 1
    if removed:
        eliminate_dead_code(graph, roots)
        graph.lint()
    return removed


def _fusable(calls: list[torch.fx.Node]) -> bool:
    """Whether the calls compute the same scores: one target, the same query, mask and
    constant arguments, equal key computations, and values that differ in the last dim only."""
    first = calls[0]
    if first.target in SINK_TARGETS:
        return False
    names = (("attn_mask", 3), ("dropout_p", 4), ("is_causal", 5), ("scale", 6), ("enable_gqa", 7))
    for call in calls[1:]:
        if call.target is not first.target or call.args[0] is not first.args[0]:
            return False
        if any(arg(call, i, n, None) is not arg(first, i, n, None) and arg(call, i, n, None) != arg(first, i, n, None)
               for n, i in names):
            return False
        if not _same(call.args[1], first.args[1], _SAME_DEPTH):
            return False
    shapes = [recorded_value(call.args[2]) for call in calls]
    if any(s is None or s.dim() != 4 for s in shapes):
        return False
    return all(tuple(s.shape[:3]) == tuple(shapes[0].shape[:3]) for s in shapes)


def _same(a: Any, b: Any, depth: int) -> bool:
    """Whether ``a`` and ``b`` (nodes or constants) compute the same value: the same node, or
    pure nodes of one target whose arguments are the same, ``depth`` levels back."""
    if a is b:
        return True
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or depth == 0:
            return False
        if a.op != b.op or a.target != b.target or a.op not in ("call_function", "call_method") or keeps_effects(a):
            return False
        if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
            return False
        return (all(_same(x, y, depth - 1) for x, y in zip(a.args, b.args))
                and all(_same(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y, depth) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _hoist(graph: torch.fx.Graph, calls: list[torch.fx.Node]) -> bool:
    """Move what the later calls' arguments need, and the graph computes after the first call,
    to just before it, so the fused call can stand there; False (nothing moved) if any of it
    depends on an earlier call's output or has an effect."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    start = order[calls[0]]
    needed: set[torch.fx.Node] = set()
    work = [a for call in calls[1:] for a in call.all_input_nodes]
    while work:
        node = work.pop()
        if order[node] < start or node in needed:
            continue
        if node in calls or keeps_effects(node):
            return False
        needed.add(node)
        work.extend(node.all_input_nodes)
    for node in sorted(needed, key=order.__getitem__):
        calls[0].prepend(node)
    return True


def _fuse(graph: torch.fx.Graph, calls: list[torch.fx.Node], roots: list[torch.fx.Node]) -> None:
    """One SDPA over the calls' values side by side, at the first call; each call's users
    read their slice of its output."""
    first = calls[0]
    values = [call.args[2] for call in calls]
    widths = [int(recorded_value(v).shape[-1]) for v in values]
    with graph.inserting_before(first):
        side_by_side = graph.call_function(torch.cat, (values,), {"dim": -1})
        fused = graph.call_function(first.target, (first.args[0], first.args[1], side_by_side, *first.args[3:]),
                                    dict(first.kwargs))
    _fake(side_by_side, torch.cat([recorded_value(v) for v in values], dim=-1))
    outputs = [recorded_value(call) for call in calls]
    fused.meta = {k: v for k, v in first.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack")}
    side_by_side.meta.update({k: v for k, v in fused.meta.items() if k in ("stack_trace", "nn_module_stack")})
    if all(isinstance(o, torch.Tensor) for o in outputs):
        _fake(fused, torch.cat(outputs, dim=-1))
    start = 0
    for call, width in zip(calls, widths):
        with graph.inserting_after(fused):
            part = graph.call_function(operator.getitem, (fused, (Ellipsis, slice(start, start + width))))
        part.meta = dict(call.meta)
        start += width
        call.replace_all_uses_with(part)
        roots.extend(call.all_input_nodes)
        graph.erase_node(call)


def _fake(node: torch.fx.Node, value: torch.Tensor) -> None:
    """Record ``value`` as the node's example value, under the key Dynamo's nodes use (AOTAutograd's
    cache reads it on the nodes that tensor methods are called on)."""
    node.meta["example_value"] = value
