"""What the passes do for attention whose keys an indexer selects: DeepSeek Sparse Attention.

DeepSeek-V3.2 and its kin (GLM-5, HY-V4, AXK2) run a small indexer beside each layer's latent
attention: it scores every (query, key) pair, masks them with the layer's causal mask, keeps
each query's ``index_topk`` best keys (``topk(...).indices``), and the attention runs under
the causal mask ANDed with that selection (``scatter`` of the indices into a boolean mask).
A MoA plan composes with it as a rule first and a selection second: the indexer picks its top-k
among the keys the layer's rule keeps, and the attention runs under rule AND selection. Both
halves matter: the rule must reach the indexer (else it spends its k picks on keys the cache
will not hold, and a prefill would select what a decode over the cache cannot), and the
selection must reach the attention (it is the model's own sparsity).

In the graph: the ``topk`` whose indices reach an attention call's mask is the layer's
indexer. Its input gets the rule as ``-inf`` (``moa_flex::index_keep``, the rule as a dense
[B, Q, K] mask: the indexer's own scores are that size already), and the call keeps the model's
mask, which the attention op ANDs in densely, with the left pads read from the mask without the
selection (``moa_flex::selection_info``). The selection is a choice of keys by content, so
``mask_sources`` does not walk through the indices (it would take them for a score bias); the
rest of the mask is checked like any other.

Over a MoA cache: the prefill of an empty cache attends as above, beside the cache writes of
the latent and of the indexer's keys (``moa_flex::index_extend``). A prefill chunk over a cache
holding tokens (later chunks, later turns) gets the ring's keys then the chunk's
(``MoaCacheLayer.selects_over_cache``): the ``topk`` input gets ``-inf`` where a column holds no
token the rule keeps for the query (``moa_flex::chunk_select_keep``), and the selection reaches
``moa_flex::chunk_prefill`` as its ``select`` (:func:`select_chunk`). In a decode
step the cache hands the indexer its whole ring of keys (``MoaCacheLayer.update_indexer``); the
``topk`` input gets ``-inf`` at the slots holding no token the rule keeps
(``moa_flex::slot_keep``), and the selected slots reach ``moa_flex::ragged_decode`` as its
``select``. Everywhere the ``topk`` becomes ``moa_flex::topk_earliest``: equal scores go to the
earlier position, so a prefill and a decode step select the same keys
(moa_flex/runtime/selection.py).
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterator

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers index_keep, selection_info, slot_keep, topk_earliest)

from .eager_attention import MODEL_OUTPUT
from .mask_sources import mask_sources_until
from .nodes import alibi_of, arg, erase_with_inputs, key_bias_of, recorded_value, sinks_of

_TOPK = ("topk",)
_COMBINE_METHODS = ("masked_fill", "__and__", "logical_and")  # a mask ANDed with a selection
_COMBINE_FUNCTIONS = (operator.and_, torch.logical_and, torch.Tensor.masked_fill, torch.masked_fill)


def is_topk(node: object) -> bool:
    """A ``topk`` call (method or function)."""
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_method" and node.target in _TOPK) or (node.op == "call_function" and node.target is torch.topk))


def is_block_selection(node: object) -> bool:
    """A ``moa_flex::block_select`` call: Qwen4-Exp's indexer, routed through the op
    (moa_flex/runtime/traceable.py); its ``visible`` argument (4) is what it selects among."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and (
        node.target in (torch.ops.moa_flex.block_select.default, torch.ops.moa_flex.block_select))


def is_selection(node: torch.fx.Node) -> bool:
    """``topk(...).indices``: keys chosen by their scores (``getitem`` 1 of a ``topk``), or the
    keys a block selection picked."""
    return is_block_selection(node) or (
        node.op == "call_function" and node.target is operator.getitem and is_topk(node.args[0])
        and node.args[1] == 1)


def selections(mask: object) -> list[torch.fx.Node]:
    """The indexers whose choice reaches ``mask`` (an attention call's ``attn_mask``): ``topk``
    nodes, and ``moa_flex::block_select`` nodes."""
    if not isinstance(mask, torch.fx.Node):
        return []
    found: list[torch.fx.Node] = []
    mask_sources_until(mask, lambda n: is_selection(n) and not found.append(n if is_block_selection(n) else n.args[0]))
    return list(dict.fromkeys(found))


def unselected_mask(mask: torch.fx.Node) -> torch.fx.Node:
    """The operand of the node combining a mask with a selection (``and_``, ``masked_fill``)
    that carries no selection: the layer's mask of positions and padding. ValueError where the
    selection enters the mask in another form (nothing known to AND)."""
    combines = (mask.op == "call_method" and mask.target in _COMBINE_METHODS) or (
        mask.op == "call_function" and mask.target in _COMBINE_FUNCTIONS)
    operands = [a for a in mask.args[:2] if isinstance(a, torch.fx.Node)]
    plain = [a for a in operands if not selections(a)]
    if combines and len(operands) == 2 and len(plain) == 1:
        return plain[0]
    raise ValueError(
        f"the attention mask {mask.name} carries keys selected by a top-k (an indexer, as in DeepSeek Sparse "
        f"Attention) but is not a mask ANDed with that selection ({mask.op} {mask.target}); moa-flex composes a "
        "plan with a selection only in that form")


def check_selects_keys(topk: torch.fx.Node, node: torch.fx.Node, layer: int) -> None:
    """ValueError unless ``topk`` picks along the last dim of scores [B, Q, K] over attention
    ``node``'s queries and keys (an indexer that selects blocks of keys, or selects over
    anything else, is not one the rule can be put into)."""
    scores, q, k = recorded_value(topk.args[0]), recorded_value(node.args[0]), recorded_value(node.args[1])
    dim = arg(topk, 2, "dim", -1)
    ok = scores is not None and q is not None and k is not None and scores.dim() == 3 and dim in (-1, 2) and (
        tuple(scores.shape) == (q.shape[0], q.shape[2], k.shape[2]))
    if not ok:
        raise ValueError(
            f"layer {layer}'s attention mask carries a top-k selection ({topk.name}) that is not a choice among the "
            f"call's keys (scores {list(getattr(scores, 'shape', []))}, dim {dim}; the call has queries "
            f"{list(getattr(q, 'shape', []))} and keys {list(getattr(k, 'shape', []))}): an indexer that selects "
            "blocks of keys, which moa-flex does not compose with a plan")


def rewrite_indexer(graph: torch.fx.Graph, node: torch.fx.Node, layer: int, runtime_id: int,
                    infos: dict[torch.fx.Node, torch.fx.Node]) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Put ``layer``'s rule into the indexer whose selection reaches attention ``node``'s mask:
    its ``topk`` input gets ``-inf`` where the rule drops a key. Returns the call's mask (the
    model's, selection included) and the ``selection_info`` of the mask without it (one per
    such mask, in ``infos``, placed beside the mask: the layers that share it share it)."""
    mask = arg(node, 3, "attn_mask", None)
    topk = layer_indexer(node, layer)
    if not is_block_selection(topk):
        check_selects_keys(topk, node, layer)
    plain = unselected_mask(mask)
    info = infos.get(plain)
    if info is None:
        with graph.inserting_after(plain):
            info = infos[plain] = graph.call_function(torch.ops.moa_flex.selection_info.default, (plain,))
        info.meta = {k: v for k, v in plain.meta.items() if k in ("stack_trace", "nn_module_stack")}
    if is_block_selection(topk):
        rule_blocks(graph, topk, node, layer, info, runtime_id)
        return mask, info
    scores = topk.args[0]
    with _tagged(graph, topk), graph.inserting_before(topk):
        keep = graph.call_function(torch.ops.moa_flex.index_keep.default, (scores, info, layer, runtime_id))
        keys = graph.call_function(torch.ops.aten.sym_size.int, (scores, 2))
        positions = graph.call_function(torch.arange, (keys,), {"device": recorded_value(scores).device})
    rule_topk(graph, topk, keep, positions, layer)
    return mask, info


def rule_blocks(graph: torch.fx.Graph, select: torch.fx.Node, node: torch.fx.Node, layer: int, info: torch.fx.Node,
                runtime_id: int) -> None:
    """The rule into a block selection (``moa_flex::block_select``): its ``visible`` keys [B, Q, K]
    ANDed with the keys ``layer``'s rule keeps (``moa_flex::index_keep``), so that its blocks are
    cut from the kept keys. ValueError unless it selects among attention ``node``'s keys."""
    visible = select.args[4]
    seen, q, k = recorded_value(visible), recorded_value(node.args[0]), recorded_value(node.args[1])
    if seen is None or q is None or k is None or tuple(seen.shape) != (q.shape[0], q.shape[2], k.shape[2]):
        raise ValueError(
            f"layer {layer}'s block selection ({select.name}) chooses among {list(getattr(seen, 'shape', []))} keys, "
            f"not the attention call's (queries {list(getattr(q, 'shape', []))}, keys {list(getattr(k, 'shape', []))})")
    with _tagged(graph, select), graph.inserting_before(select):
        keep = graph.call_function(torch.ops.moa_flex.index_keep.default, (visible, info, layer, runtime_id))
        ruled = graph.call_function(operator.and_, (visible, keep))
    select.update_arg(4, ruled)


def layer_indexer(node: torch.fx.Node, layer: int) -> torch.fx.Node:
    """The one ``topk`` whose indices reach attention ``node``'s mask (ValueError for none or several)."""
    found = selections(arg(node, 3, "attn_mask", None))
    if len(found) != 1:
        raise ValueError(f"layer {layer}'s attention mask carries {len(found)} top-k selections; moa-flex composes "
                         "a plan with one indexer a layer")
    return found[0]


@contextlib.contextmanager
def _tagged(graph: torch.fx.Graph, like: torch.fx.Node) -> Iterator[None]:
    """The nodes added meanwhile take ``like``'s module stack and trace where they have none."""
    before = set(graph.nodes)
    yield
    meta = {k: v for k, v in like.meta.items() if k in ("stack_trace", "nn_module_stack")}
    for n in graph.nodes:
        if n not in before and not n.meta.get("nn_module_stack"):
            n.meta.update(meta)


def rule_topk(graph: torch.fx.Graph, topk: torch.fx.Node, keep: torch.fx.Node, positions: torch.fx.Node,
              layer: int) -> torch.fx.Node:
    """The rule into an indexer: ``topk``'s scores get ``-inf`` where ``keep`` (broadcast over
    them) is False, and the ``topk`` becomes :func:`by_position` over ``positions``. Returns the
    node of the picked indices."""
    scores = topk.args[0]
    with _tagged(graph, topk), graph.inserting_before(topk):
        ruled = graph.call_method("masked_fill", (scores, graph.call_function(torch.logical_not, (keep,)),
                                                  float("-inf")))
    topk.replace_input_with(scores, ruled)
    return by_position(graph, topk, positions, layer)


def _selection(graph: torch.fx.Graph, node: torch.fx.Node, topk_meta: torch.fx.Node, keep: torch.fx.Node,
               picked: torch.fx.Node) -> torch.fx.Node:
    """Before attention ``node``: the picked columns as a bool mask like ``keep``, ANDed with it
    (a query with fewer kept columns than k picks some it may not read)."""
    with _tagged(graph, topk_meta), graph.inserting_before(node):
        chosen = graph.call_method("scatter", (graph.call_function(torch.zeros_like, (keep,)), -1, picked, True))
        return graph.call_function(operator.and_, (chosen, keep))


def by_position(graph: torch.fx.Graph, topk: torch.fx.Node, positions: torch.fx.Node, layer: int) -> torch.fx.Node:
    """Replace an indexer's ``topk`` (of which only the indices are read) by
    ``moa_flex::topk_earliest``: equal scores go to the earlier of ``positions`` (the keys'
    logical positions), in a prefill and a decode step alike (moa_flex/runtime/selection.py).
    Returns the node of the indices."""
    readers = list(topk.users)
    if not all(is_selection(u) for u in readers):
        raise ValueError(f"layer {layer}'s indexer reads the values of its top-k ({topk.name}), not only which keys "
                         "it picked; moa-flex composes a plan with a selection of keys only")
    with graph.inserting_before(topk):
        picked = graph.call_function(torch.ops.moa_flex.topk_earliest.default,
                                     (topk.args[0], positions, arg(topk, 1, "k", None)))
    picked.meta = {k: v for k, v in topk.meta.items() if k in ("stack_trace", "nn_module_stack")}
    for reader in readers:
        reader.replace_all_uses_with(picked)
        graph.erase_node(reader)
    graph.erase_node(topk)
    return picked


def attend_selected(graph: torch.fx.Graph, node: torch.fx.Node, layer: int, runtime_id: int, softcap: float,
                    infos: dict[torch.fx.Node, torch.fx.Node], roots: list[torch.fx.Node],
                    verify_id: int | None = None, padding_mask: torch.fx.Node | None = None) -> torch.fx.Node:
    """Replace attention ``node`` of an indexed layer by ``moa_flex::attention`` over its own q,
    k, v and mask (:func:`rewrite_indexer` first): a forward without a cache, or the prefill of
    an empty MoA cache (whose write stays). ``verify_id``: the first-call check's graph, where
    the model's call stays and ``moa_flex::verify_attention`` compares the two."""
    mask, info = rewrite_indexer(graph, node, layer, runtime_id, infos)
    q, k, v = node.args[:3]
    scale = arg(node, 6, "scale", None)
    scale = -1.0 if scale is None else scale
    with graph.inserting_after(node):
        new = graph.call_function(torch.ops.moa_flex.attention.default,
                                  (q, k, v, mask, scale, layer, runtime_id, softcap, info, sinks_of(node),
                                   alibi_of(node), key_bias_of(node)))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    if verify_id is None:
        erase_with_inputs(graph, node, roots)
    else:
        with graph.inserting_after(new):
            graph.call_function(torch.ops.moa_flex.verify_attention.default,
                                (q, k, v, mask, scale, layer, verify_id, info, node.meta.get(MODEL_OUTPUT, node),
                                 padding_mask, sinks_of(node), alibi_of(node), key_bias_of(node)))
    return new


def select_slots(graph: torch.fx.Graph, node: torch.fx.Node, layer: int, keys: torch.fx.Node, length: torch.fx.Node,
                 spans: torch.fx.Node, caps: torch.fx.Node, offsets: torch.fx.Node, sink: object, window: int
                 ) -> torch.fx.Node:
    """A decode step's indexer over the MoA cache: it scores every slot of the indexer's ring
    (``MoaCacheLayer.update_indexer`` hands it the ring), so its ``topk`` input gets ``-inf``
    where the slot holds no token the rule keeps for this step's query
    (``moa_flex::slot_keep`` over the layer's cache ``keys``, after this step's append); returns
    the node of the selected slots, bool [B, S] (ANDed with that keep: a row with fewer kept
    slots than k picks some it may not read), for ``moa_flex::ragged_decode``'s ``select``."""
    topk = layer_indexer(node, layer)
    if is_block_selection(topk):
        return _select_slot_blocks(graph, node, topk, length, spans, caps, offsets, sink, window)
    scores = recorded_value(topk.args[0])
    # its slots are the ring's, as wide as the cache (a size symbol of their own: a wrong width
    # fails where the keep is broadcast over them, never silently)
    if scores is None or scores.dim() != 3 or str(scores.shape[1]) != "1" or arg(topk, 2, "dim", -1) not in (-1, 2):
        raise ValueError(
            f"layer {layer}'s indexer in a decode step scores {list(getattr(scores, 'shape', []))}, not one query over "
            "the cache's slots along the last dim: its keys do not come from the MoA cache's indexer ring "
            "(MoaCache.update_indexer)")
    with _tagged(graph, topk), graph.inserting_before(topk):
        pos = graph.call_function(torch.ops.aten.sub.Scalar, (length, 1))
        keep = graph.call_method("unsqueeze", (graph.call_function(
            torch.ops.moa_flex.slot_keep.default, (keys, offsets, caps, spans, pos, sink, window)), 1))  # [B, 1, S]
        held = graph.call_method("unsqueeze", (graph.call_function(torch.ops.moa_flex.slot_position.default,
                                                                   (keys, caps, offsets, pos, sink)), 1))
    select = _selection(graph, node, topk, keep, rule_topk(graph, topk, keep, held, layer))  # [B, 1, S]
    with _tagged(graph, select), graph.inserting_before(node):
        return graph.call_method("squeeze", (select, 1))


def _one_group(graph: torch.fx.Graph, select: torch.fx.Node, caps: torch.fx.Node, offsets: torch.fx.Node
               ) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """The ring's layout for a block selection ``select``: its keys [B, W, d] (the ring holds the
    first KV group's slots: the layer's groups share one rule, so one slot map), that group's
    caps [B, 1] and offsets [2], and the number of KV groups G (the cache holds G W slots)."""
    ring = select.args[1]
    one_caps = graph.call_function(operator.getitem, (caps, (slice(None), slice(None, 1))))
    one_offsets = graph.call_function(operator.getitem, (offsets, slice(None, 2)))
    groups = graph.call_function(operator.sub, (graph.call_function(torch.ops.aten.sym_size.int, (offsets, 0)), 1))
    return ring, one_caps, one_offsets, groups


def _select_slot_blocks(graph: torch.fx.Graph, node: torch.fx.Node, select: torch.fx.Node, length: torch.fx.Node,
                        spans: torch.fx.Node, caps: torch.fx.Node, offsets: torch.fx.Node, sink: object,
                        window: int) -> torch.fx.Node:
    """A decode step's block selection (Qwen4-Exp) over the MoA cache: its columns are the ring's
    slots (the cache hands them over, ``MoaCacheLayer.update_indexer``), among which it may see
    those holding a token the rule keeps (``moa_flex::slot_keep``), in the order of the positions
    they hold (``moa_flex::slot_position``); returns the node of the selected slots of every KV
    group, bool [B, S], for ``moa_flex::ragged_decode``'s ``select``."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    appends = [u for u in length.users
               if u.target in (torch.ops.moa_flex.cache_append.default, torch.ops.moa_flex.cache_append)]
    # Qwen4-Exp's indexer runs before the layer's cache write: ``length`` is then the step's position
    before_write = bool(appends) and all(order[select] < order[a] for a in appends)
    with _tagged(graph, select), graph.inserting_before(select):
        ring, one_caps, one_offsets, groups = _one_group(graph, select, caps, offsets)
        pos = length if before_write else graph.call_function(torch.ops.aten.sub.Scalar, (length, 1))
        keep = graph.call_method("unsqueeze", (graph.call_function(
            torch.ops.moa_flex.slot_keep.default, (ring, one_offsets, one_caps, spans, pos, sink, window)), 1))
        held = graph.call_function(torch.ops.moa_flex.slot_position.default, (ring, one_caps, one_offsets, pos, sink))
    select.update_arg(4, keep)  # [B, 1, W]
    select.update_kwarg("positions", held)
    with _tagged(graph, select), graph.inserting_before(node):
        return graph.call_method("repeat", (graph.call_method("squeeze", (select, 1)), 1, groups))


def _select_chunk_blocks(graph: torch.fx.Graph, node: torch.fx.Node, select: torch.fx.Node, length: torch.fx.Node,
                         chunk_pads: torch.fx.Node, spans: torch.fx.Node, caps: torch.fx.Node, offsets: torch.fx.Node,
                         sink: object, window: int) -> torch.fx.Node:
    """A prefill chunk's block selection (Qwen4-Exp) over the MoA cache: its columns are the
    ring's slots (the first KV group's), then the chunk's keys (``MoaCacheLayer.update_indexer``);
    each query may see those holding a token the rule keeps for it (``moa_flex::chunk_select_keep``,
    read before the chunk's write), in the order of their positions; returns the selection over
    every group's slots then the chunk, bool [B, C, S + C], for ``moa_flex::chunk_prefill``'s
    ``select``."""
    with _tagged(graph, select), graph.inserting_before(select):
        ring, one_caps, one_offsets, groups = _one_group(graph, select, caps, offsets)
        width = graph.call_function(torch.ops.aten.sym_size.int, (ring, 1))  # W + C columns: the ring's is W
        queries = graph.call_function(torch.ops.aten.sym_size.int, (select.args[0], 1))
        ring_slots = graph.call_function(operator.sub, (width, queries))
        shaped = graph.call_method("expand", (select.args[4], -1, -1, width))  # [B, C, W + C], a view
        slots = graph.call_function(operator.getitem, (ring, (slice(None), slice(None, ring_slots))))
        both = graph.call_function(torch.ops.moa_flex.chunk_select_keep.default,
                                   (shaped, slots, one_offsets, one_caps, spans, length, chunk_pads, sink, window))
        keep = graph.call_function(operator.getitem, (both, 0))
        positions = graph.call_function(operator.getitem, (both, 1))
    select.update_arg(4, keep)
    select.update_kwarg("positions", positions)
    with _tagged(graph, select), graph.inserting_before(node):
        held = graph.call_function(operator.getitem, (select, (Ellipsis, slice(None, ring_slots))))
        chunk = graph.call_function(operator.getitem, (select, (Ellipsis, slice(ring_slots, None))))
        every = graph.call_function(torch.cat, ([graph.call_method("repeat", (held, 1, 1, groups)), chunk], -1))
    return every


def chunk_of_held(node: torch.fx.Node, k_new: torch.fx.Node, v_new: torch.fx.Node, layer: int) -> None:
    """In a chunk over a MoA cache, an indexed layer of plain attention (Qwen4-Exp) attends the
    cache's slots then the chunk's keys and values (``MoaCacheLayer.held_keys_values``, concatenated
    in its ``update``): the model's call reads them so, but the pass replaces that call by the chunk
    kernel over the cache itself, and checks how the call reads the chunk's own. Each such
    concatenation feeding attention ``node`` is replaced by the chunk's tensor (``k_new``/``v_new``).
    ValueError where the call's keys or values come from no such concatenation."""
    for at, chunk in ((1, k_new), (2, v_new)):
        cats = [c for c in chunk.users if c.op == "call_function" and c.target is torch.cat
                and isinstance(c.args[0], (list, tuple)) and len(c.args[0]) == 2 and c.args[0][1] is chunk]
        if len(cats) != 1:
            raise ValueError(f"layer {layer}: in a chunk over the MoA cache its attention's "
                             f"{('keys', 'values')[at - 1]} are not the cache's slots then the chunk's")
        cats[0].replace_all_uses_with(chunk)


def over_cache(node: torch.fx.Node) -> bool:
    """Whether indexed attention ``node`` runs in a prefill chunk over a cache holding tokens: its
    keys are the cache's slots and the chunk's (``MoaCacheLayer.selects_over_cache``), more than
    its queries; the first prefill of a cache attends its own tokens only."""
    q, k = recorded_value(node.args[0]), recorded_value(node.args[1])
    return q is not None and k is not None and str(q.shape[2]) != str(k.shape[2])


def select_chunk(graph: torch.fx.Graph, node: torch.fx.Node, layer: int, keys: torch.fx.Node, length: torch.fx.Node,
                 chunk_pads: torch.fx.Node, spans: torch.fx.Node, caps: torch.fx.Node, offsets: torch.fx.Node,
                 sink: object, window: int) -> torch.fx.Node:
    """A prefill chunk's indexer over the MoA cache: it scores the cache's slots, then the chunk's
    keys (scores [B, C, S + C]), so its ``topk`` input gets ``-inf`` where the column holds no token
    the rule keeps for the query (``moa_flex::chunk_select_keep``, read before the chunk's write),
    with ties to the earlier position; returns the node of the selection, bool [B, C, S + C]
    (ANDed with that keep), for ``moa_flex::chunk_prefill``'s ``select``."""
    topk = layer_indexer(node, layer)
    if is_block_selection(topk):
        return _select_chunk_blocks(graph, node, topk, length, chunk_pads, spans, caps, offsets, sink, window)
    check_selects_keys(topk, node, layer)
    with _tagged(graph, topk), graph.inserting_before(topk):
        both = graph.call_function(torch.ops.moa_flex.chunk_select_keep.default,
                                   (topk.args[0], keys, offsets, caps, spans, length, chunk_pads, sink, window))
        keep = graph.call_function(operator.getitem, (both, 0))  # [B, C, S + C]
        positions = graph.call_method("unsqueeze", (graph.call_function(operator.getitem, (both, 1)), 1))
    return _selection(graph, node, topk, keep, rule_topk(graph, topk, keep, positions, layer))
