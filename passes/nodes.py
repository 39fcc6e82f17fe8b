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
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers torch.ops.moa_flex.sdpa_sinks / sdpa_alibi)
from moa_flex.plan import Plan

# SDPA calls, what a model with learned sinks traces instead (SDPA's arguments, then sinks), and
# what the own-code pass makes of ALiBi attention (SDPA's arguments, then the slopes)
SINK_TARGETS = (torch.ops.moa_flex.sdpa_sinks, torch.ops.moa_flex.sdpa_sinks.default)
ALIBI_TARGETS = (torch.ops.moa_flex.sdpa_alibi, torch.ops.moa_flex.sdpa_alibi.default)
KEY_BIAS_TARGETS = (torch.ops.moa_flex.sdpa_key_bias, torch.ops.moa_flex.sdpa_key_bias.default)
SDPA_TARGETS = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                *SINK_TARGETS, *ALIBI_TARGETS, *KEY_BIAS_TARGETS)


def sinks_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The learned sink logits an attention node carries (``moa_flex::sdpa_sinks``), or None."""
    return arg(node, 8, "sinks", None) if node.target in SINK_TARGETS else None


def alibi_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The ALiBi slopes [H] an attention node carries (``moa_flex::sdpa_alibi``), or None."""
    return arg(node, 8, "alibi", None) if node.target in ALIBI_TARGETS else None


def key_bias_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The per-key score bias [B, G, K] an attention node carries (``moa_flex::sdpa_key_bias``), or None."""
    return arg(node, 8, "key_bias", None) if node.target in KEY_BIAS_TARGETS else None

def recorded_value(node: Any) -> torch.Tensor | None:
    """The (fake) tensor Dynamo or a pass recorded for ``node`` (``val`` or ``example_value``),
    or None: not a node, nothing recorded, or not a tensor."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


# the decoder-layer list: ``model.layers.7`` (Llama and most), ``transformer.h.7`` (GPT-2 style),
# ``blocks.7``, or XLM's list of attention modules beside its other per-layer lists
# (``transformer.attentions.7``); Dynamo's module paths may index it as ``layers[7]`` or ``layers['7']``
_LAYER = re.compile(r"(?:layers|\bh|blocks|\blayer|\battentions)(?:\.|\[)'?(\d+)'?\]?")


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
    order: dict[torch.fx.Node, int] | None = None
    while work:
        node = work.pop()
        if node in gone or node.op not in ("call_function", "call_method", "get_attr"):
            continue
        if node.users:  # a scratch tensor only written into (a model's keys assembled for a replaced call)
            group = _unread_scratch(node)
            if group is None:
                continue
            order = order or {n: i for i, n in enumerate(graph.nodes)}
            for member in sorted(group, key=order.__getitem__, reverse=True):  # users before what they use
                work.extend(n for n in member.all_input_nodes if n not in group)
                graph.erase_node(member)
                gone.add(member)
            continue
        if keeps_effects(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        gone.add(node)
        work.extend(inputs)


_FRESH = {"new_empty", "new_zeros", "new_ones", "new_full", "empty", "zeros", "ones", "full", "empty_like",
          "zeros_like", "ones_like", "full_like"}
_VIEWS = {"getitem", "view", "reshape", "narrow", "select", "slice", "transpose", "permute", "unsqueeze", "squeeze",
          "expand"}


def _call_name(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")


def _unread_scratch(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes of a tensor the graph allocates (``new_empty``, ``zeros`` ...) and never reads:
    every use, through views of it, an in-place write into it whose result nothing uses
    (DeepSeek-V3.2's ``expand_kv`` assembles its keys with ``copy_`` into a ``new_empty``, for an
    attention call the pass replaced). Such writes have no effect anyone can see. None otherwise."""
    if node.op not in ("call_function", "call_method") or _call_name(node) not in _FRESH:
        return None
    group, work = [node], [node]
    while work:
        cur = work.pop()
        for user in cur.users:
            if user in group:
                continue
            writes = keeps_effects(user) and not user.users
            if not (user.args and user.args[0] is cur) or not (_call_name(user) in _VIEWS or writes):
                return None
            group.append(user)
            if not writes:
                work.append(user)
    return group


def erase_with_inputs(graph: torch.fx.Graph, node: torch.fx.Node, roots: list[torch.fx.Node]) -> None:
    """Erase ``node`` (its users already rewired) and note its inputs in ``roots`` for
    :func:`eliminate_dead_code`."""
    roots.extend(node.all_input_nodes)
    graph.erase_node(node)


# what may stand between the keys a layer writes to its cache and its attention call, on top:
# HF's grouped expansion (repeat_kv: a None-index, expand, reshape) and dtype casts
_GROUPING = {"expand", "reshape", "view", "contiguous", "to", "float", "type_as", "unsqueeze"}
_CASTS = {"to", "float", "type_as", "contiguous"}  # in _GROUPING, but move no head


@dataclass(frozen=True)
class Layout:
    """How an attention call's keys or values derive, token by token, from what the layer
    wrote to its cache, below HF's grouped expansion: the cached tensor itself (``op="cached"``),
    its heads tiled ``n`` times (``"repeat"``, JetMoE's ``.repeat(1, n, 1, 1)``), chunk ``i`` of
    ``n`` along the heads (``"chunk"``, ``torch.chunk(x, n, dim=1)[i]``), or ``parts`` side by
    side in the last dim (``"cat"``: DiffLlama's two value halves, passes/value_fusion.py). The
    MoA cache holds each token in this layout (:func:`as_cached`), so query head h reads the
    cached head the call's grouping gives it."""

    op: str = "cached"
    parts: tuple["Layout", ...] = ()
    n: int = 1
    i: int = 0

    def heads(self, g: int) -> int:
        """Heads of the layout over a cached tensor of ``g`` heads."""
        if self.op == "cached":
            return g
        inner = [p.heads(g) for p in self.parts]
        if self.op == "repeat":
            return inner[0] * self.n
        if self.op == "chunk":
            size = -(-inner[0] // self.n)
            return max(0, min(inner[0], (self.i + 1) * size) - self.i * size)
        return inner[0]  # cat: every part has the same heads (checked when parsed)


CACHED = Layout()


def cached_layout(value: Any, cached: Any) -> Layout | None:
    """The :class:`Layout` by which ``value`` (an attention call's keys or values) derives from
    ``cached`` (what the layer wrote to its cache), HF's grouped expansion and casts on top
    allowed; None for anything else (a selection of tokens, grouping below a tiling), which
    changes what query head h reads in a way the cache does not model."""
    heads = _heads_of(cached)
    return _layout(value, _same_values(cached), True, heads)


def _same_values(cached: Any) -> Any:
    """The earliest node whose values ``cached`` repeats exactly: ``contiguous`` and casts to the
    dtype a tensor already has peeled off (GPT-NeoX-Japanese caches ``cat(...).contiguous()``
    and its attention call, once its [B * H] views are peeled, reads the ``cat``)."""
    while (isinstance(cached, torch.fx.Node) and cached.op == "call_method" and cached.target in _CASTS
           and cached.args and isinstance(cached.args[0], torch.fx.Node)):
        out, src = recorded_value(cached), recorded_value(cached.args[0])
        if out is None or src is None or out.dtype != src.dtype or out.shape != src.shape:
            break
        cached = cached.args[0]
    return cached


def _layout(node: Any, cached: Any, top: bool, g: int | None) -> Layout | None:
    """:func:`cached_layout` of ``node``; ``top``: nothing but grouping and casts lies above."""
    while isinstance(node, torch.fx.Node) and node is not cached:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op in ("call_method", "call_function") and name in _GROUPING and node.args and (top or name in _CASTS):
            node = node.args[0]
        elif top and node.op == "call_function" and node.target is operator.getitem and _adds_axes_only(node.args[1]):
            node = node.args[0]
        else:
            break
    if node is cached:
        return CACHED
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_method" and node.target == "repeat" and _head_tiles(node) is not None:
        inner = _layout(node.args[0], cached, False, g)
        return None if inner is None else Layout("repeat", (inner,), n=_head_tiles(node))
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        chunks = _head_chunks(node.args[0])
        if chunks is not None:
            inner = _layout(node.args[0].args[0], cached, False, g)
            return None if inner is None else Layout("chunk", (inner,), n=chunks, i=node.args[1])
    if top and node.op == "call_function" and node.target is torch.cat and _last_dim_cat(node):
        parts = tuple(_layout(p, cached, True, g) for p in node.args[0])
        if any(p is None for p in parts) or g is None or len({p.heads(g) for p in parts}) != 1:
            return None  # parts grouped differently: no one layout of cached heads
        return Layout("cat", parts)
    return None


def _head_tiles(node: torch.fx.Node) -> int | None:
    """r for ``x.repeat(1, r, 1, 1)`` (as varargs or one sequence), else None."""
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) == 4 and all(isinstance(n, int) for n in sizes) and (sizes[0], sizes[2], sizes[3]) == (1, 1, 1):
        return sizes[1] if sizes[1] >= 1 else None
    return None


def _head_chunks(node: Any) -> int | None:
    """n for ``torch.chunk(x, n, dim=1)`` (or ``x.chunk(n, 1)``), else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    if not ((node.op == "call_function" and node.target is torch.chunk)
            or (node.op == "call_method" and node.target == "chunk")):
        return None
    n = arg(node, 1, "chunks", None)
    dim = arg(node, 2, "dim", 0)
    return n if isinstance(n, int) and n >= 1 and dim == 1 else None


def _last_dim_cat(node: torch.fx.Node) -> bool:
    """``torch.cat(tensors, dim=-1)`` of 4-D tensors (features side by side, heads untouched)."""
    dim = arg(node, 1, "dim", 0)
    value = recorded_value(node)
    ndim = value.dim() if value is not None else 4
    return isinstance(node.args[0], (tuple, list)) and ndim == 4 and dim in (-1, 3)


def _heads_of(node: Any) -> int | None:
    """Dim 1 of a node's recorded 4-D value, or None."""
    value = recorded_value(node)
    return int(value.shape[1]) if value is not None and value.dim() == 4 else None


def _adds_axes_only(index: Any) -> bool:
    """An index of full slices and Nones only (``x[:, :, None]``): new axes, nothing selected."""
    items = index if isinstance(index, tuple) else (index,)
    return any(i is None for i in items) and all(
        i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)


def check_reads_cache(node: torch.fx.Node, k_new: Any, v_new: Any, layer: int) -> tuple[Layout, Layout]:
    """The layouts (:func:`cached_layout`) by which the attention call ``node`` reads the keys
    and values its layer wrote to the cache, which the passes then write to the cache so.
    ValueError for any other transformation, or keys and values in different head counts;
    checked for every layer before a rewrite."""
    found = []
    for what, value, cached in (("keys", node.args[1], k_new), ("values", node.args[2], v_new)):
        layout = cached_layout(value, cached)
        if layout is None:
            raise ValueError(
                f"layer {layer}: the attention call's {what} are not what the layer wrote to its cache, nor a "
                "per-token rearrangement of its heads that moa-flex models (HF's grouped expansion, repeat_kv; "
                "JetMoE's tiling, .repeat(1, r, 1, 1); chunks along the heads side by side, DiffLlama's values): the "
                "model transforms them in between, which moa-flex's ragged cache does not model"
            )
        found.append(layout)
    g = _heads_of(k_new)
    if g is not None and found[0].heads(g) != found[1].heads(g):
        raise ValueError(f"layer {layer}: the attention call reads its keys as {found[0].heads(g)} cached heads and "
                         f"its values as {found[1].heads(g)}; moa-flex's cache keeps one head layout for both")
    return found[0], found[1]


def check_width(v_new: Any, values: Any, layer: int) -> None:
    """ValueError unless the values a layer writes (as its call reads them, [B, G, S, Dv]) are as
    wide as its MoA cache's value storage ([B, slots, Dv]): the cache is sized from the config
    before anything is traced (runtime/cache.py ``_value_dims``)."""
    new, store = recorded_value(v_new), recorded_value(values)
    if new is not None and store is not None and new.shape[-1] != store.shape[-1]:
        raise ValueError(f"layer {layer}: the attention call reads values {new.shape[-1]} wide per head, but the MoA "
                         f"cache holds {store.shape[-1]} (moa_flex.architecture.cached_value_dim knows no rule for "
                         "this model)")


def as_cached(graph: torch.fx.Graph, before: torch.fx.Node, tensor: Any, layout: Layout, kv_heads: int) -> Any:
    """``tensor`` (a layer's new keys or values, [B, G, S, D]) in the layout the MoA cache holds
    (``kv_heads``, the plan's KV heads), new nodes before ``before``: rearranged as the call
    reads it (``layout``, :func:`check_reads_cache`), and, for a layer running fewer KV heads
    than the plan (MiMo-V2's full-attention layers beside its sliding ones), each head
    repeated in place, HF's grouped expansion, so query head h still reads the layer's head
    h // (H / G). ``tensor`` itself when it already is the cache's layout."""
    node = _replay(graph, before, layout, tensor)
    heads = _heads_of(node)
    if heads is None or heads == kv_heads:
        return node
    if heads > kv_heads or kv_heads % heads:
        raise ValueError(f"a layer writes {heads} KV heads (as its attention call reads them), which do not divide "
                         f"the plan's {kv_heads}")
    return call_before(graph, before, torch.ops.aten.repeat_interleave.self_int, (node, kv_heads // heads, 1),
                 lambda x: x.repeat_interleave(kv_heads // heads, 1))


def _replay(graph: torch.fx.Graph, before: torch.fx.Node, layout: Layout, tensor: Any) -> Any:
    """``layout`` applied to ``tensor`` (new nodes before ``before``)."""
    if layout.op == "cached":
        return tensor
    parts = [_replay(graph, before, p, tensor) for p in layout.parts]
    if layout.op == "repeat":
        how = [1, layout.n, 1, 1]
        return call_before(graph, before, torch.ops.aten.repeat.default, (parts[0], how), lambda x: x.repeat(*how))
    if layout.op == "chunk":
        heads = _heads_of(parts[0])
        if heads is None:
            raise ValueError(f"no shape recorded for {parts[0]}: cannot write the cache in the call's layout")
        size = -(-heads // layout.n)
        lo, hi = layout.i * size, min(heads, (layout.i + 1) * size)
        return call_before(graph, before, torch.ops.aten.slice.Tensor, (parts[0], 1, lo, hi), lambda x: x[:, lo:hi])
    return call_before(graph, before, torch.ops.aten.cat.default, (parts, -1), lambda *xs: torch.cat(xs, -1), many=True)


def call_before(graph: torch.fx.Graph, before: torch.fx.Node, op: Any, args: tuple, fake: Any, many: bool = False) -> Any:
    """A call of ``op`` before ``before``, with the fake value ``fake`` gives its input's (Dynamo's
    nodes carry them; AOTAutograd's cache reads them)."""
    with graph.inserting_before(before):
        node = graph.call_function(op, args)
    inputs = list(args[0]) if many else [args[0]]
    for key in ("example_value", "val"):
        values = [i.meta.get(key) if isinstance(i, torch.fx.Node) else None for i in inputs]
        if all(isinstance(v, torch.Tensor) for v in values):
            node.meta[key] = fake(*values)
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


# an attention module in a list of them inside a decoder layer: ``layers.3.self_attn.1`` (LongCat-Flash)
_SUBLAYER = re.compile(r"(?:self_attn|attn|attention)(?:\.|\[)'?(\d+)'?\]?$")


def runs_modules_again(nodes: list[torch.fx.Node]) -> bool:
    """Whether one attention module made several of these calls: a model whose stacks run in
    cycles, each call on the cache slot its caller passes (HRM's ``cycle_offset``;
    ``architecture.attention_layer_problem`` refuses other modules sharing a ``layer_idx``, and
    the cache graphs check each write's slot: :func:`by_layer`)."""
    located = [node_layer(n) for n in nodes]
    return len(set(located)) < len(located)


def call_layers(nodes: list[torch.fx.Node], in_call_order: bool | None = None,
                slots: Sequence[int] | None = None) -> list[tuple[int, str]]:
    """(layer index, module path) of each attention node: its decoder layer, or where a decoder
    layer holds a list of attention sublayers (LongCat-Flash: ``self_attn.0`` and ``self_attn.1``,
    whose ``layer_idx`` is ``2 N + j``), ``N * sublayers + j``: the index transformers' cache and
    the plan give it (``architecture.attention_layer_problem`` checks the convention).
    ``in_call_order`` (default: whether :func:`runs_modules_again` holds for ``nodes``): the k-th
    call is cache slot k, for a model whose modules run several times per forward on slots that
    rise in call order (HRM: ``layer_idx + cycle_offset``, ``architecture.slots_in_call_order``),
    or, given ``slots`` (the plan's ``call_slots``: Dory's loops), cache slot ``slots[k]``."""
    located = [node_layer(n) for n in nodes]
    if in_call_order is None:
        in_call_order = runs_modules_again(nodes)
    if in_call_order:
        if slots is None:
            return [(k, path) for k, (_, path) in enumerate(located)]
        if len(slots) != len(located):
            raise ValueError(f"the graph has {len(located)} attention calls where the model makes {len(slots)} per "
                             f"forward (one per cache slot, in the order {list(slots)})")
        return [(slot, path) for slot, (_, path) in zip(slots, located)]
    subs = [_SUBLAYER.search(path) for _, path in located]
    if not any(subs):
        return located
    if not all(subs):
        raise ValueError("some attention calls sit in a list of attention sublayers and some do not "
                         f"({[path for _, path in located]}); moa-flex maps all of a model's calls one way")
    per = max(int(m.group(1)) for m in subs) + 1
    return [(layer * per + int(m.group(1)), path) for (layer, path), m in zip(located, subs)]


def arg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def call_args(node: torch.fx.Node, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> tuple:
    """A call node's arguments in schema order (Dynamo may record some as keyword arguments);
    ``optional`` names not given are None."""
    return tuple(list(node.args) + [node.kwargs[name] if name in node.kwargs or name not in optional else None
                                    for name in names[len(node.args):]])


def plan_layers(model_layers: list[int], shape: Any, what: str, only: Iterable[int] | None = None) -> list[int]:
    """The plan's layer index of each decoder layer in ``model_layers`` (``shape``: the plan's
    :class:`~moa_flex.plan.ModelShape`); ValueError unless they are the planned layers (or the
    plan layers ``only``), each exactly once (``what``: which calls, for the message)."""
    wanted = list(shape.layer_indices) if only is None else [shape.layer_indices[p] for p in sorted(only)]
    if sorted(model_layers) != wanted:
        covers = (f"num_layers = {shape.num_layers}" if shape.layers is None and only is None
                  else f"decoder layers {wanted} (its {'attention' if only is None else 'indexed'} layers)")
        raise ValueError(f"{what} for layers {sorted(model_layers)} but the plan has {covers} (expected one call per "
                         "planned layer)")
    return [shape.plan_layer(layer) for layer in model_layers]


def readers_of(sources: Mapping[int, int] | None) -> dict[int, list[int]]:
    """Plan layer -> the plan layers that attend its keys and values (KV sharing:
    ``architecture.kv_sources``), in plan order: the order in which its cache layer writes
    their caches (``MoaCacheLayer.update``)."""
    readers: dict[int, list[int]] = {}
    for reader, source in sorted((sources or {}).items()):
        readers.setdefault(source, []).append(reader)
    return readers


def by_layer(nodes: list[torch.fx.Node], what: str, shape: Any, graph: str,
             sources: Mapping[int, int] | None = None,
             in_call_order: bool = False, only: Iterable[int] | None = None) -> dict[int, tuple[torch.fx.Node, str]]:
    """Plan layer -> (node, module path) for nodes of which each planned layer (or each of the
    plan layers ``only``: an indexer's writes, in the layers that select keys) must have
    exactly one (``shape``: the plan's ModelShape); ValueError naming the layers otherwise
    (``graph``: what graph this is, for the message). ``sources`` (cache writes of a model with
    KV sharing, plan layer -> the plan layer it reads): a source layer writes its readers'
    caches after its own (:func:`readers_of`), so its later nodes belong to its readers.
    ``in_call_order``: the k-th node is layer k (:func:`call_layers`; the caller tells it from the
    graph's attention calls, as a KV-sharing layer's several cache writes are one module's too)."""
    found: dict[int, tuple[torch.fx.Node, str]] = {}
    if in_call_order and sources:
        raise ValueError(f"{graph} graph: this model runs its attention modules several times per forward and shares "
                         "keys and values between layers; moa-flex models either, not both")
    slots = getattr(shape, "call_slots", None)
    located = call_layers(nodes, in_call_order, slots)
    if in_call_order and what.startswith("cache_"):
        _check_slots_in_call_order(nodes, what, graph, slots)
    if sources:
        located = _readers_located(nodes, located, shape, readers_of(sources), what, graph)
    for node, (layer, path) in zip(nodes, located):
        if layer in found:
            raise ValueError(
                f"{graph} graph: two {what} nodes for layer {layer} ({found[layer][0].name} in {found[layer][1]}, "
                f"{node.name} in {path}); a vision or audio encoder run inside the compiled forward (raw images "
                "that generate did not encode first) has attention layers of its own, which a MoA plan does not rule")
        found[layer] = (node, path)
    planned = plan_layers(list(found), shape, f"{graph} graph: {what} nodes", only)
    return {p: found[m] for p, m in zip(planned, found)}


_SLOT = re.compile(r"\[(\d+)\]\.keys$")  # a cache layer's keys as Dynamo lifted them: ...layers[5].keys


def written_slot(node: torch.fx.Node) -> int | None:
    """The cache layer a cache-write node writes, read from the Dynamo source of its keys buffer
    (``L['cache'].layers[5].keys``), or None where the graph does not say."""
    keys = node.args[0] if node.args else None
    grapharg = keys.meta.get("grapharg") if isinstance(keys, torch.fx.Node) else None
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name() if callable(source.name) else source.name  # a method before torch 2.13
    m = _SLOT.search(str(name))
    return int(m.group(1)) if m else None


def _check_slots_in_call_order(nodes: list[torch.fx.Node], what: str, graph: str,
                               slots: Sequence[int] | None = None) -> None:
    """ValueError unless the k-th of these cache writes writes cache slot k (or ``slots[k]``, the
    plan's ``call_slots``), where the graph says which it writes: a model running its modules in
    cycles must visit its slots in the order moa-flex's mapping of calls to plan layers assumes."""
    for k, node in enumerate(nodes):
        slot = written_slot(node)
        want = k if slots is None else slots[k]
        if slot is not None and slot != want:
            order = "the call order" if slots is None else f"the order {list(slots)}"
            raise ValueError(f"{graph} graph: {what} call {k} writes cache slot {slot}: this model runs its attention "
                             f"modules several times per forward on cache slots that do not follow {order}, "
                             "which moa-flex's mapping of calls to plan layers assumes")


def _readers_located(nodes: list[torch.fx.Node], located: list[tuple[int, str]], shape: Any,
                     readers: dict[int, list[int]], what: str, graph: str) -> list[tuple[int, str]]:
    """``located`` with a source layer's second, third, ... node moved to its readers' decoder
    layers (in plan order); ValueError unless each source layer has one node per cache it writes."""
    seen: dict[int, int] = {}
    out = []
    for node, (layer, path) in zip(nodes, located):
        k = seen.get(layer, 0)
        seen[layer] = k + 1
        mine = readers.get(shape.plan_layer(layer), []) if layer in shape.layer_indices else []
        if 0 < k <= len(mine):
            layer = shape.layer_indices[mine[k - 1]]
        out.append((layer, path))
    for source, mine in readers.items():
        layer = shape.layer_indices[source]
        if seen.get(layer, 0) != 1 + len(mine):
            raise ValueError(f"{graph} graph: layer {layer} writes its own cache and those of layers "
                             f"{[shape.layer_indices[r] for r in mine]} (they read its keys and values), so "
                             f"{1 + len(mine)} {what} nodes were expected there, found {seen.get(layer, 0)} (a MoaCache "
                             "built without config= does not write them: pass config=model.config)")
    return out


def check_heads(node: torch.fx.Node, shape: Any, layer: int) -> None:
    """ValueError unless an attention call's query heads are the plan's and its key heads are
    the plan's KV heads, a divisor of them (a layer running fewer KV heads: the cache holds them
    expanded, :func:`as_cached`), or the query heads (HF's repeat_kv); ``shape``: the plan's
    ModelShape; ``layer``: the plan's layer, whose query heads are ``shape.heads_of(layer)``).
    Other layouts would index the plan's rules out of range."""
    q, k = (recorded_value(a) for a in node.args[:2])
    if q is None or k is None:
        return
    heads, kv = int(q.shape[1]), int(k.shape[1])
    if heads != shape.heads_of(layer) or not (kv == heads or shape.num_kv_heads % kv == 0):
        raise ValueError(f"layer {layer}: the attention call has {heads} query and {kv} key heads, "
                         f"the plan {shape.heads_of(layer)} and {shape.num_kv_heads} (the config's); moa-flex needs every "
                         "planned layer to run the plan's query heads and its KV heads or a divisor of them")


def head_dim(q: torch.fx.Node) -> int:
    """The last dimension of a query node's recorded value."""
    val = recorded_value(q)
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
