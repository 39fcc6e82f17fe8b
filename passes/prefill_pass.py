"""FX graph pass for prefill over the ragged MoA cache: chunked prefill and later turns.

A forward of several tokens with a :class:`moa_flex.runtime.cache.MoaCache` traces, in every
layer, a ``moa_flex::cache_extend`` node (the cache write of the chunk's keys and values) and
the layer's SDPA node over the chunk. The pass maps both to their layer, checks there is
exactly one of each per layer, and replaces the pair by one ``moa_flex::chunk_prefill`` node:
the chunk's queries over the cache as the chunks before left it, plus the chunk's own keys,
under the keep rule (docs/DESIGN.md, "Long contexts"), then the chunk's write. One op, so no
scheduler can order the write before the read (and inductor need not copy the cache to keep
its old value). The forward's 2-D padding mask (the chunk's slice) gives
every row's leading left padding through one ``moa_flex::mask_info`` node; a model's own
sliding window and soft-cap are passed as numbers, so HF's dense [B, 1, C, C] mask becomes
dead code. Nothing is rewritten unless every layer matches.
"""

from __future__ import annotations

import operator
from typing import Mapping, Sequence

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers cache_extend / chunk_prefill / mask_info)
from moa_flex.plan import Plan

from .latent import LatentDims, absorb, expansion_weight
from .key_bias import with_key_bias
from .eager_attention import MODEL_OUTPUT
from .mask_sources import check_masks_are_masks
from .indexed import attend_selected, chunk_of_held, is_selection, over_cache, select_chunk, selections
from .nodes import (
    PassReport, RewrittenNode, arg, attention_nodes, by_layer, call_args, check_no_dropout, eliminate_dead_code,
    runs_modules_again, check_heads, check_reads_cache, check_width, erase_with_inputs, sinks_of, alibi_of, as_cached, key_bias_of, CACHED,
    head_dim, padding_mask_input, recorded_value,
)

EXTEND = (torch.ops.moa_flex.cache_extend, torch.ops.moa_flex.cache_extend.default)
EXTEND_ARGS = ("keys", "values", "length", "k_new", "v_new", "chunk_pads", "spans", "caps", "offsets", "sink", "k_scale",
               "v_scale")
SCALE_ARGS = ("k_scale", "v_scale")  # an FP8 cache's (None otherwise)


def extend_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The ``moa_flex::cache_extend`` nodes of a graph (one per layer in a prefill over a cache)."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in EXTEND]


INDEX_EXTEND = (torch.ops.moa_flex.index_extend, torch.ops.moa_flex.index_extend.default)


def index_extend_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The ``moa_flex::index_extend`` nodes of a graph (an indexer's writes, DeepSeek Sparse Attention)."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in INDEX_EXTEND]


def _set_arg(node: torch.fx.Node, index: int, names: tuple[str, ...], value: object) -> None:
    """Set ``node``'s argument at ``index`` (or, where Dynamo recorded it by name, that kwarg)."""
    for name in names:
        if name in node.kwargs:
            node.update_kwarg(name, value)
            return
    node.update_arg(index, value)


def _aligned_queries(graph: torch.fx.Graph, node: torch.fx.Node, q: torch.fx.Node,
                     k_new: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node | None]:
    """For a layer reading another layer's keys: its queries [B, H, C, D] as they are, and None,
    when they match the chunk's keys; or, where they may be fewer (Gemma 4 runs those layers on
    the last ``logits_to_keep`` positions only), left-padded with zeros to the chunk's length,
    and the node of how many were added (the output's first rows, dropped after). The model's
    own SDPA aligns such queries with the chunk's last keys, as the padding does."""
    qv, kv = recorded_value(q), recorded_value(k_new)
    if qv is None or kv is None or str(qv.shape[2]) == str(kv.shape[2]):
        return q, None
    with graph.inserting_before(node):
        keys = graph.call_function(torch.ops.aten.sym_size.int, (k_new, 2))
        queries = graph.call_function(torch.ops.aten.sym_size.int, (q, 2))
        skipped = graph.call_function(operator.sub, (keys, queries))
        # zeros and a cat, not constant_pad_nd: its fake kernel wants a concrete pad (it logs and falls back)
        size = [graph.call_function(torch.ops.aten.sym_size.int, (q, d)) for d in (0, 1)]
        size += [skipped, graph.call_function(torch.ops.aten.sym_size.int, (q, 3))]
        zeros = graph.call_function(torch.ops.aten.new_zeros.default, (q, size))
        padded = graph.call_function(torch.ops.aten.cat.default, ([zeros, q], 2))
    return padded, skipped


def rewrite_prefill(
    gm: torch.fx.GraphModule, plan: Plan, softcaps: Sequence[float] | None = None,
    windows: Sequence[int | None] | None = None, verify: bool = False, latent: Sequence[LatentDims] | None = None,
    kv_sources: Mapping[int, int] | None = None, runtime_id: int | None = None, verify_id: int | None = None,
) -> PassReport:
    """Replace each layer's cache write and SDPA node by one chunk prefill over its MoA cache.

    ``softcaps``/``windows``: per layer, the model's logit soft-cap and own sliding window
    (tokens), or 0/None; ``windows=None`` (unknown) is refused. ``verify``: the graph of the
    first-call check (:mod:`moa_flex.runtime.verify`): each SDPA node stays, and a
    ``moa_flex::verify_chunk`` node between it and the chunk prefill compares them (before the
    chunk is written). ``latent``: per planned layer, the sizes of a model with latent attention, whose cache holds
    the latent (passes/latent.py: the chunk prefill attends with absorbed queries, and its output
    is projected to the model's values). ``kv_sources``: as for
    :func:`moa_flex.passes.decode_pass.rewrite_decode` (a reader's cache write sits in its
    source layer; its chunk prefill replaces the reader's attention, reading before writing).
    A layer whose keys an indexer selects (DeepSeek Sparse Attention, passes/indexed.py): in the
    first prefill of a cache it keeps its write and attends through ``moa_flex::attention`` under
    runtime ``runtime_id`` (``verify_id``: the check's), its indexer's write
    (``moa_flex::index_extend``) getting the chunk's left pads as the latent's write does; over a
    cache holding tokens (its keys are the cache's slots and the chunk's) its chunk prefill reads
    the indexer's selection (:func:`~.indexed.select_chunk`), unchecked by ``verify``.
    """
    if windows is None:
        raise ValueError("a prefill over a MoaCache needs each layer's own sliding window: compile with "
                         "moa_flex.compile(model, plan), or pass config= to moa_flex.backend")
    calls = attention_nodes(gm.graph)
    in_call_order = runs_modules_again(calls)  # HRM's cycles: the k-th call is slot k
    extends = by_layer(extend_nodes(gm.graph), "cache_extend", plan.model, "prefill", kv_sources, in_call_order)
    attns = by_layer(calls, "attention", plan.model, "prefill", in_call_order=in_call_order)
    check_no_dropout([node for node, _ in attns.values()])
    for layer, (node, _) in attns.items():
        check_heads(node, plan.model, layer)
    indexed = {layer for layer, (node, _) in attns.items() if selections(arg(node, 3, "attn_mask", None))}
    # a chunk over a cache holding tokens, traced apart from the first prefill (the cache's Python flag
    # ``filled``): the first-call check compares an empty cache's chunk only, so it has nothing to do in
    # this graph, and the model's calls here get the all-True [B, 1, C, 1] mask that indexed layers need
    # (on a GPU, SDPA refuses that broadcast mask of another layer: keep no model call to give it to)
    overs = {layer for layer in indexed if over_cache(attns[layer][0])}
    verify = verify and not overs
    if indexed and runtime_id is None:
        raise ValueError("a prefill over a MoaCache of a model whose indexer selects keys needs the runtime's id")
    check_masks_are_masks(((node, layer) for layer, (node, _) in attns.items()), kept=is_selection)
    layouts = {}  # per layer: how the call reads the keys and values it cached (the cache is written so)
    for layer in range(plan.num_layers):  # everything checked before anything changes
        extend_args = call_args(extends[layer][0], EXTEND_ARGS, SCALE_ARGS)
        if latent is not None:  # the cache writes (latent ; rotary key) and the latent: the model's expansion
            node = attns[layer][0]
            layouts[layer] = expansion_weight(node, extend_args[4], layer, layer in overs)
        else:
            if layer in overs:  # the call's keys and values: the cache's slots, then the chunk's (Qwen4-Exp)
                chunk_of_held(attns[layer][0], extend_args[3], extend_args[4], layer)
            layouts[layer] = check_reads_cache(attns[layer][0], extend_args[3], extend_args[4], layer)
    graph = gm.graph
    mask = padding_mask_input(graph)
    pads = None  # the chunk's leading left padding per row, from its 2-D mask (mask_info's first B entries)
    if mask is not None:
        with graph.inserting_after(mask):
            info = graph.call_function(torch.ops.moa_flex.mask_info.default, (mask,))
        with graph.inserting_after(info):
            pads = graph.call_function(torch.ops.aten.slice.Tensor, (info, 0, 0, -1))
    report = PassReport(graph_module=gm)
    roots: list[torch.fx.Node] = []
    selection_infos: dict[torch.fx.Node, torch.fx.Node] = {}
    index_writes = by_layer(index_extend_nodes(graph), "index_extend", plan.model, "prefill",
                            only=indexed) if indexed else {}
    for layer in range(plan.num_layers):
        node, path = attns[layer]
        extend = extends[layer][0]
        if layer in indexed and layer not in overs:  # an empty cache's prompt: the write stays, attention selects
            if pads is not None:  # else both writes' pads are zeros already (Qwen4-Exp writes its indexer first)
                for write, at in ((extend, 5), (index_writes[layer][0], 3)):
                    _set_arg(write, at, ("chunk_pads",), pads)
            softcap = float(softcaps[layer]) if softcaps else 0.0
            new = attend_selected(graph, node, layer, runtime_id, softcap, selection_infos, roots,
                                  verify_id if verify else None, mask)
            report.rewritten.append(RewrittenNode(layer, new.name, path))
            continue
        # the cache's own sink (a guarded constant of the traced cache), not the compile-time
        # plan's: set_plan may switch to a plan with another sink
        keys, values, length, k_new, v_new, zeros, spans, caps, offsets, sink, k_scale, v_scale = call_args(
            extend, EXTEND_ARGS, SCALE_ARGS)
        q = node.args[0]
        scale = arg(node, 6, "scale", None)
        scale = head_dim(q) ** -0.5 if scale is None else scale
        absorbed = None
        if latent is not None:
            absorbed = absorb(graph, node, q, *layouts[layer], latent[layer], node)
            q = absorbed.q
        else:
            k_new, v_new = (as_cached(graph, extend, t, how, plan.num_kv_heads)
                            for t, how in zip((k_new, v_new), layouts[layer]))
        check_width(v_new, values, layer)
        bias = key_bias_of(node)
        if bias is not None:  # one more key column, cached with the key (passes/key_bias.py)
            if latent is not None or layouts[layer] != (CACHED, CACHED):
                raise ValueError(f"layer {layer}: a per-key score bias beside latent attention or a rearranged cache "
                                 "layout is not modeled")
            q, k_new = with_key_bias(graph, node, q, k_new, bias, scale)
        # only a layer reading another layer's keys may run fewer queries than the chunk (Gemma 4);
        # elsewhere chunk_prefill's own shape check refuses such a call
        q, skipped = _aligned_queries(graph, node, q, k_new) if layer in (kv_sources or {}) else (q, None)
        chunk_pads = zeros if pads is None else pads
        softcap = float(softcaps[layer]) if softcaps else 0.0
        window = int(windows[layer] or 0)
        scale = scale if isinstance(scale, torch.fx.Node) else float(scale)
        select = None
        if layer in indexed:  # a chunk over tokens cached: the indexer scores the slots and the chunk
            select = select_chunk(graph, node, layer, keys, length, chunk_pads, spans, caps, offsets, sink, window)
        check = None
        # the model's own call here reads the MoA ring, not its stock cache: nothing to compare an indexed layer with
        if verify and select is None:
            with graph.inserting_after(node):
                check = graph.call_function(
                    torch.ops.moa_flex.verify_chunk.default,
                    (q, k_new, v_new, keys, values, length, chunk_pads, caps, offsets, sink, window, scale, layer,
                     node.meta.get(MODEL_OUTPUT, node), sinks_of(node), k_scale, v_scale, absorbed and absorbed.up,
                     absorbed and absorbed.up_bias, alibi_of(node)),
                )
        with graph.inserting_after(node) if check is None else graph.inserting_after(check):
            new = graph.call_function(
                torch.ops.moa_flex.chunk_prefill.default,
                (q, k_new, v_new, keys, values, length, chunk_pads, spans, caps, offsets, sink, window, scale,
                 softcap, sinks_of(node), k_scale, v_scale, alibi_of(node), select),
            )
        # the replaced node's output (same shape): AOTAutograd's cache needs example values on
        # the nodes that tensor methods are called on, and bypasses the graph without them
        new.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", "example_value", "val")}
        out = new
        if skipped is not None:  # the chunk's last queries only: the model's own rows of the output
            new.meta = {k: v for k, v in new.meta.items() if k not in ("example_value", "val")}
            with graph.inserting_after(new):
                out = graph.call_function(torch.ops.aten.slice.Tensor, (new, 2, skipped))
            out.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", "example_value", "val")}
        if absorbed is not None:  # attention over the latent: [B, H, S, r], projected to the model's values
            for key in ("example_value", "val"):
                if isinstance(new.meta.get(key), torch.Tensor):
                    new.meta[key] = new.meta[key].new_empty((*new.meta[key].shape[:-1], latent[layer].rank))
            out = absorbed.project(graph, new, node)
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not check)
        if check is None:
            erase_with_inputs(graph, node, roots)
        erase_with_inputs(graph, extend, roots)  # chunk_prefill writes after it reads
        report.rewritten.append(RewrittenNode(layer, new.name, path))
    eliminate_dead_code(graph, roots)
    graph.lint()
    gm.recompile()
    return report
