"""What the passes share about traced graphs: attention nodes, their decoder layer, effects.

Every attention call of a traced HF decoder is mapped to its layer through the node's
``nn_module_stack`` metadata (``model.layers.7.self_attn`` -> layer 7). Dead-code
elimination keeps the mutating custom ops (the cache writes) that FX would drop.
:class:`PassReport` records what a pass rewrote.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers torch.ops.moa_flex.sdpa_sinks)
from moa_flex.plan import Plan

# SDPA calls, and what a model with learned sinks traces instead (SDPA's arguments, then sinks)
SINK_TARGETS = (torch.ops.moa_flex.sdpa_sinks, torch.ops.moa_flex.sdpa_sinks.default)
SDPA_TARGETS = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                *SINK_TARGETS)


def sinks_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The learned sink logits an attention node carries (``moa_flex::sdpa_sinks``), or None."""
    return arg(node, 8, "sinks", None) if node.target in SINK_TARGETS else None
# the decoder-layer list: ``model.layers.7`` (Llama and most), ``transformer.h.7`` (GPT-2 style),
# ``blocks.7``; Dynamo's module paths may index it as ``layers[7]`` or ``layers['7']``
_LAYER = re.compile(r"(?:layers|\bh|blocks|\blayer)(?:\.|\[)'?(\d+)'?\]?")


@dataclass
class RewrittenNode:
    """One attention call the pass replaced."""

    layer: int
    node: str
    module: str


@dataclass
class PassReport:
    """What the pass did to one traced graph."""

    rewritten: list[RewrittenNode] = field(default_factory=list)
    graph_module: torch.fx.GraphModule | None = None

    def table(self, plan: Plan, N: int) -> str:
        """Per layer: the node rewritten, its module and the spans at planned length N (tokens)."""
        spans = plan.head_spans(N)
        lines = [f"{'layer':>5}  {'node':<28} {'module':<34} spans@{N}"]
        for r in sorted(self.rewritten, key=lambda r: r.layer):
            s = spans[r.layer].tolist()
            text = ",".join(map(str, s)) if len(set(s)) > 1 else f"{s[0]} (all heads)"
            lines.append(f"{r.layer:>5}  {r.node:<28} {r.module:<34} {text}")
        return "\n".join(lines)


def keeps_effects(node: torch.fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing uses its value: FX's
    own rule; in-place calls (``out.add_(x)``, ``torch.Tensor.add_``, ``aten.add_``: a name
    ending in one underscore), whose effect is on their argument, which FX's rule does not see
    for Dynamo's ``call_method`` nodes (it dropped a MoE layer's shared-expert sum); and calls
    of a mutating op recorded through its ``OpOverloadPacket`` (how Dynamo records custom ops
    such as ``moa_flex::cache_prefill``; torch 2.11's FX treats those as pure)."""
    if node.is_impure():
        return True
    target = node.target
    if node.op == "call_method":
        return _in_place_name(target) or "out" in node.kwargs
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if isinstance(target, torch._ops.OpOverloadPacket):
        return "default" in target.overloads() and target.default._schema.is_mutable
    name = getattr(target, "__name__", "")
    if getattr(target, "__objclass__", None) in (torch.Tensor, torch._C.TensorBase):  # torch.Tensor.add_
        return _in_place_name(name)
    if _in_place_name(name) and str(getattr(target, "__module__", "") or "").startswith("torch"):  # torch.relu_
        return True
    return "out" in node.kwargs or node.kwargs.get("inplace") is True  # F.relu(x, inplace=True)


def _in_place_name(name: object) -> bool:
    """A tensor method's in-place form: one trailing underscore (``add_``; not ``__and__``)."""
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def eliminate_dead_code(graph: torch.fx.Graph, roots: Iterable[Any]) -> None:
    """Erase what a rewrite made dead, and nothing else: starting from ``roots`` (the inputs
    of the nodes the pass erased), every node that nothing uses any more and that has no
    effect (:func:`keeps_effects`), then its own inputs, transitively. A node the pass did not
    disconnect stays, even if unused: the graph outside attention is the model's."""
    work = [n for n in roots if isinstance(n, torch.fx.Node)]
    gone: set[torch.fx.Node] = set()
    while work:
        node = work.pop()
        if node in gone or node.op not in ("call_function", "call_method", "get_attr") or node.users:
            continue
        if keeps_effects(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        gone.add(node)
        work.extend(inputs)


def erase_with_inputs(graph: torch.fx.Graph, node: torch.fx.Node, roots: list[torch.fx.Node]) -> None:
    """Erase ``node`` (its users already rewired) and note its inputs in ``roots`` for
    :func:`eliminate_dead_code`."""
    roots.extend(node.all_input_nodes)
    graph.erase_node(node)


# what may stand between the keys a layer writes to its cache and its attention call: HF's
# grouped expansion (repeat_kv: a None-index, expand, reshape) and dtype casts (JetMoE's
# tiling, .repeat, is told apart: cached_tiling)
_GROUPING = {"expand", "reshape", "view", "contiguous", "to", "float", "type_as", "unsqueeze"}
_CASTS = {"to", "float", "type_as", "contiguous"}  # in _GROUPING, but move no head


def cached_tiling(value: Any, cached: Any) -> int | None:
    """How ``value`` (an attention call's keys or values) derives from ``cached`` (what the layer
    wrote to its cache): 1 for ``cached`` itself or HF's grouped expansion of it (query head h
    reads group h // (H / G)); ``r`` for ``cached`` tiled ``r`` times along the heads and nothing
    else (JetMoE's ``.repeat(1, r, 1, 1)``: head h reads group h % G); None for anything else,
    which changes which query head reads which cached group in a way the cache does not model."""
    node, tiles, grouped = value, 1, False
    while isinstance(node, torch.fx.Node):
        if node is cached:
            return tiles if tiles == 1 or not grouped else None
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op in ("call_method", "call_function") and name in _GROUPING and node.args:
            grouped = grouped or name not in _CASTS
            node = node.args[0]
        elif node.op == "call_function" and node.target is operator.getitem and _adds_axes_only(node.args[1]):
            grouped, node = True, node.args[0]
        elif node.op == "call_method" and name == "repeat" and _head_tiles(node) is not None:
            tiles, node = tiles * _head_tiles(node), node.args[0]
        else:
            return None
    return None


def _head_tiles(node: torch.fx.Node) -> int | None:
    """r for ``x.repeat(1, r, 1, 1)`` (as varargs or one sequence), else None."""
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) == 4 and all(isinstance(n, int) for n in sizes) and (sizes[0], sizes[2], sizes[3]) == (1, 1, 1):
        return sizes[1] if sizes[1] >= 1 else None
    return None


def _adds_axes_only(index: Any) -> bool:
    """An index of full slices and Nones only (``x[:, :, None]``): new axes, nothing selected."""
    items = index if isinstance(index, tuple) else (index,)
    return any(i is None for i in items) and all(
        i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)


def check_reads_cache(node: torch.fx.Node, k_new: Any, v_new: Any, layer: int) -> int:
    """The tiling ``r`` (:func:`cached_tiling`) by which the attention call ``node`` reads the
    keys and values its layer wrote to the cache: 1, or JetMoE's number of query experts, whose
    cache the passes then write tiled, as the call reads it. ValueError for any other
    transformation; checked for every layer before a rewrite."""
    found = []
    for what, value, cached in (("keys", node.args[1], k_new), ("values", node.args[2], v_new)):
        tiles = cached_tiling(value, cached)
        if tiles is None:
            raise ValueError(
                f"layer {layer}: the attention call's {what} are not what the layer wrote to its cache (nor HF's "
                f"grouped expansion of them, repeat_kv, nor JetMoE's tiling, .repeat(1, r, 1, 1)): the model "
                "transforms them in between, which moa-flex's ragged cache does not model"
            )
        found.append(tiles)
    if found[0] != found[1]:
        raise ValueError(f"layer {layer}: the attention call tiles its keys {found[0]} times and its values {found[1]} "
                         "times; moa-flex's cache keeps one layout for both")
    return found[0]


def as_cached(graph: torch.fx.Graph, before: torch.fx.Node, tensor: Any, tiles: int, kv_heads: int) -> Any:
    """``tensor`` (a layer's new keys or values, [B, G, S, D]) in the layout the MoA cache holds
    (``kv_heads``, the plan's KV heads), new nodes before ``before``: tiled ``tiles`` times as a
    tiling model's call reads it (:func:`check_reads_cache`), or, for a layer running fewer KV
    heads than the plan (MiMo-V2's full-attention layers beside its sliding ones), each head
    repeated in place, HF's grouped expansion, so query head h still reads the layer's head
    h // (H / G). ``tensor`` itself when it already is the cache's layout."""
    value = tensor.meta.get("val", tensor.meta.get("example_value")) if isinstance(tensor, torch.fx.Node) else None
    heads = int(value.shape[1]) if isinstance(value, torch.Tensor) and value.dim() == 4 else None
    if tiles > 1:
        op, how = torch.ops.aten.repeat.default, [1, tiles, 1, 1]
    elif heads is not None and heads < kv_heads:
        if kv_heads % heads:
            raise ValueError(f"a layer writes {heads} KV heads, which do not divide the plan's {kv_heads}")
        op, how = torch.ops.aten.repeat_interleave.self_int, kv_heads // heads
    else:
        return tensor
    with graph.inserting_before(before):
        node = graph.call_function(op, (tensor, how) if tiles > 1 else (tensor, how, 1))
    for key in ("example_value", "val"):  # fake values, as Dynamo's nodes carry (AOTAutograd's cache reads them)
        if isinstance(tensor.meta.get(key), torch.Tensor):
            fake = tensor.meta[key]
            node.meta[key] = fake.repeat(*how) if tiles > 1 else fake.repeat_interleave(how, 1)
    return node


def attention_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The scaled_dot_product_attention call nodes of a graph, in order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def node_layer(node: torch.fx.Node) -> tuple[int, str]:
    """(decoder layer index, module path) of an attention node, from its module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _type in reversed(list(stack.values())):
        m = _LAYER.search(str(path))
        if m:
            return int(m.group(1)), str(path).replace("L['self'].", "")
    raise ValueError(
        f"attention node {node.name} has no decoder layer in its module stack ({list(stack.values())}); "
        "moa-flex maps attention calls to layers through module paths like 'model.layers.7.self_attn'"
    )


def arg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def call_args(node: torch.fx.Node, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> tuple:
    """A call node's arguments in schema order (Dynamo may record some as keyword arguments);
    ``optional`` names not given are None."""
    return tuple(list(node.args) + [node.kwargs[name] if name in node.kwargs or name not in optional else None
                                    for name in names[len(node.args):]])


def plan_layers(model_layers: list[int], shape: Any, what: str) -> list[int]:
    """The plan's layer index of each decoder layer in ``model_layers`` (``shape``: the plan's
    :class:`~moa_flex.plan.ModelShape`); ValueError unless they are the planned layers, each
    exactly once (``what``: which calls, for the message)."""
    wanted = list(shape.layer_indices)
    if sorted(model_layers) != wanted:
        covers = (f"num_layers = {shape.num_layers}" if shape.layers is None
                  else f"decoder layers {wanted} (its attention layers)")
        raise ValueError(f"{what} for layers {sorted(model_layers)} but the plan has {covers} (expected one call per "
                         "planned layer)")
    return [shape.plan_layer(layer) for layer in model_layers]


def by_layer(nodes: list[torch.fx.Node], what: str, shape: Any, graph: str) -> dict[int, tuple[torch.fx.Node, str]]:
    """Plan layer -> (node, module path) for nodes of which each planned layer must have
    exactly one (``shape``: the plan's ModelShape); ValueError naming the layers otherwise
    (``graph``: what graph this is, for the message)."""
    found: dict[int, tuple[torch.fx.Node, str]] = {}
    for node in nodes:
        layer, path = node_layer(node)
        if layer in found:
            raise ValueError(
                f"{graph} graph: two {what} nodes for layer {layer} ({found[layer][0].name} in {found[layer][1]}, "
                f"{node.name} in {path}); a vision or audio encoder run inside the compiled forward (raw images "
                "that generate did not encode first) has attention layers of its own, which a MoA plan does not rule")
        found[layer] = (node, path)
    planned = plan_layers(list(found), shape, f"{graph} graph: {what} nodes")
    return {p: found[m] for p, m in zip(planned, found)}


def check_heads(node: torch.fx.Node, shape: Any, layer: int) -> None:
    """ValueError unless an attention call's query heads are the plan's and its key heads are
    the plan's KV heads, a divisor of them (a layer running fewer KV heads: the cache holds them
    expanded, :func:`as_cached`), or the query heads (HF's repeat_kv); ``shape``: the plan's
    ModelShape. Other layouts would index the plan's rules out of range."""
    q, k = (a.meta.get("val", a.meta.get("example_value")) if isinstance(a, torch.fx.Node) else None
            for a in node.args[:2])
    if q is None or k is None:
        return
    heads, kv = int(q.shape[1]), int(k.shape[1])
    if heads != shape.num_heads or not (kv == heads or shape.num_kv_heads % kv == 0):
        raise ValueError(f"layer {layer}: the attention call has {heads} query and {kv} key heads, "
                         f"the plan {shape.num_heads} and {shape.num_kv_heads} (the config's); moa-flex needs every "
                         "planned layer to run the plan's query heads and its KV heads or a divisor of them")


def head_dim(q: torch.fx.Node) -> int:
    """The last dimension of a query node's recorded value."""
    val = q.meta.get("val", q.meta.get("example_value"))
    if val is None:
        raise ValueError(f"no shape recorded for query node {q.name}")
    return int(val.shape[-1])


def padding_mask_input(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The graph input holding the forward's 2-D ``attention_mask`` (None if not passed)."""
    for node in graph.nodes:
        if node.op == "placeholder" and re.search(r"(^|_)attention_mask_?$", str(node.target)):
            val = node.meta.get("example_value", node.meta.get("val"))
            if val is None or getattr(val, "dim", lambda: 0)() == 2:
                return node
    return None


def check_no_dropout(nodes: list[torch.fx.Node]) -> None:
    """ValueError if an attention node uses dropout (moa-flex runs attention in eval mode)."""
    for node in nodes:
        dropout = arg(node, 4, "dropout_p", 0.0)
        if isinstance(dropout, (int, float)) and dropout != 0.0:
            raise ValueError(f"attention node {node.name} uses dropout_p={dropout}; moa-flex runs attention in eval mode only")
