"""FX graph pass: put a moa-flex plan into the graph Dynamo traced from an HF decoder.

Every ``F.scaled_dot_product_attention`` node is mapped to its decoder layer through the
node's ``nn_module_stack`` metadata (``model.layers.7.self_attn`` -> layer 7) and replaced by
``torch.ops.moa_flex.attention`` with the same q, k, v and scale. Layers without a sliding
window of the model's own take the forward's 2-D padding mask instead of the model's dense
[B, 1, Q, K] mask, which then is dead code and removed; each distinct mask
gets one ``torch.ops.moa_flex.mask_info`` node (its left pads, and whether it is plain causal
+ padding) that all its layers share. The pass checks the
whole graph first: if the attention calls do not match the plan (count, layer indices), it
raises and changes nothing.

Graphs that call ``flex_attention`` (models loaded with ``attn_implementation="flex_attention"``)
are rewritten by ``moa_flex.passes.flex_pass``, which proves each call's score_mod and mask_mod
by evaluation first. Such models graph-break in HF's mask creation, so the backend sees
attention-free pieces too: ``partial_graphs=True`` lets those pass unchanged (the piece with
attention must still hold one call per layer).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers torch.ops.moa_flex.attention / mask_info)
from moa_flex.plan import Plan

from .flex_pass import flex_nodes, rewrite_flex_attention
from .inner import CheckedFirstCall, compile_graph, copy_graph_module
from .saved import SavedGraph
from .regional import RegionReport
from .prefill_pass import extend_nodes, rewrite_prefill
from .latent import LatentDims
from .value_fusion import fuse_value_splits
from .key_bias import rewrite_key_bias
from .eager_attention import MODEL_OUTPUT, has_eager_attention, rewrite_eager_attention, unread_score_biases
from .mask_sources import check_masks_are_masks, described
from .indexed import attend_selected, is_selection, selections
from .nodes import (
    PassReport, RewrittenNode, arg, attention_nodes, check_no_dropout, eliminate_dead_code, erase_with_inputs, call_layers, plan_layers, check_heads, sinks_of, alibi_of,
    padding_mask_input, key_bias_of,
)


def rewrite_attention(
    gm: torch.fx.GraphModule, plan: Plan, runtime_id: int, softcaps: Sequence[float] | None = None,
    windows: Sequence[int | None] | None = None, partial_graphs: bool = False, verify_id: int | None = None,
    latent: Sequence[LatentDims] | None = None, kv_sources: Mapping[int, int] | None = None,
) -> PassReport:
    """Replace every SDPA (or flex_attention) node of ``gm`` by moa-flex attention for its
    layer; validate first.

    ``windows``: per layer, the model's own sliding window (tokens) or None; ``windows=None``
    (unknown: no config) keeps every layer's traced mask. Layers without a window get the
    forward's 2-D padding mask; the others keep the model's mask, ANDed in
    (flex_attention graphs: the window is the one the call's mask_mod is proven to apply).
    ``partial_graphs``: a graph without any attention call is returned unchanged (empty
    report) instead of raising. ``verify_id``: the graph of the first-call check
    (:mod:`moa_flex.runtime.verify`): each SDPA node stays beside its replacement, and a
    ``moa_flex::verify_attention`` node (under runtime ``verify_id``, a dense plan) compares
    them; flex_attention graphs are not checked (their mods are proven by evaluation).
    ``kv_sources``: KV sharing, for prefills over a cache (:func:`rewrite_prefill`).
    """
    rewrite_eager_attention(gm.graph, keep_original=verify_id is not None)  # attention in the model's own code
    fuse_value_splits(gm.graph)  # DiffLlama: one call per layer over both value halves
    rewrite_key_bias(gm.graph, keep_original=verify_id is not None)  # Doge: a per-key bias in the mask
    if extend_nodes(gm.graph):  # a prefill over a MoaCache (chunks, later turns)
        return rewrite_prefill(gm, plan, softcaps, windows, verify=verify_id is not None, latent=latent,
                               kv_sources=kv_sources, runtime_id=runtime_id, verify_id=verify_id)
    nodes = attention_nodes(gm.graph)
    flex = flex_nodes(gm.graph)
    if flex and nodes:
        raise ValueError(
            f"the traced graph calls both flex_attention ({len(flex)} nodes) and scaled_dot_product_attention "
            f"({len(nodes)} nodes); moa-flex expects one attention implementation for all layers"
        )
    if flex:
        return rewrite_flex_attention(gm, plan, runtime_id, softcaps)
    if not nodes:
        if partial_graphs:
            return PassReport(graph_module=gm)
        biases = unread_score_biases(gm.graph)
        if biases:
            term, sources = biases[0]
            raise ValueError(
                f"the model computes attention in its own code and adds to the scores a term computed from "
                f"floating-point tensors ({described(sources)}; node {term.name}, {len(biases)} such terms in the "
                "graph): a score bias such as a learned relative-position bias, which a MoA plan's rules do not "
                "carry, so moa-flex does not rewrite this model"
            )
        raise ValueError(
            "moa-flex found no attention call (F.scaled_dot_product_attention or flex_attention) in the traced "
            "graph, nor attention computed in the model's own code in the form moa-flex recognizes "
            "(matmul, constant scales, masks, ALiBi, softmax, matmul: moa_flex/passes/eager_attention.py; other "
            "score terms, such as relative-position biases or ALiBi rounded to 16 bits, are not read); is this a decoder "
            "model running with attn_implementation='sdpa'? (For a model that graph-breaks, e.g. one running "
            "flex_attention, pass partial_graphs=True.)"
        )
    located = call_layers(nodes, slots=plan.model.call_slots)
    planned = plan_layers([layer for layer, _ in located], plan.model, "the traced graph has attention calls")
    layers = [(p, path) for p, (_, path) in zip(planned, located)]
    check_no_dropout(nodes)
    for node, (layer, _) in zip(nodes, layers):
        check_heads(node, plan.model, layer)
    # an indexer's selection (DeepSeek Sparse Attention) stays in its layer's mask, ANDed in: passes/indexed.py
    indexed = {node for node in nodes if selections(arg(node, 3, "attn_mask", None))}
    check_masks_are_masks(((node, layer) for node, (layer, _) in zip(nodes, layers)), kept=is_selection)
    padding_mask = padding_mask_input(gm.graph)
    report = PassReport(graph_module=gm)
    infos: dict[torch.fx.Node, torch.fx.Node] = {}  # one mask_info per mask node, shared by its layers
    selection_infos: dict[torch.fx.Node, torch.fx.Node] = {}  # likewise for the masks an indexer's selection is ANDed to
    roots: list[torch.fx.Node] = []  # inputs of erased nodes: the model's dense mask may be dead now
    for node, (layer, path) in zip(nodes, layers):
        q, k, v = node.args[:3]
        mask = arg(node, 3, "attn_mask", None)
        if windows is not None and not windows[layer] and node not in indexed:
            # No window of the model's own: causal + the 2-D padding mask says everything,
            # and the model's dense [B, 1, Q, K] mask becomes dead code.
            mask = padding_mask
        scale = arg(node, 6, "scale", None)
        bias = key_bias_of(node)  # Doge's: a score_mod here, a cached key column over a cache (passes/key_bias.py)
        softcap = float(softcaps[layer]) if softcaps else 0.0
        info = None
        if node in indexed:
            new = attend_selected(gm.graph, node, layer, runtime_id, softcap, selection_infos, roots, verify_id,
                                  padding_mask)
            report.rewritten.append(RewrittenNode(layer, new.name, path))
            continue
        if isinstance(mask, torch.fx.Node):
            if mask not in infos:
                with gm.graph.inserting_after(mask):
                    infos[mask] = gm.graph.call_function(torch.ops.moa_flex.mask_info.default, (mask,))
                infos[mask].meta = {k_: v_ for k_, v_ in mask.meta.items() if k_ in ("stack_trace", "nn_module_stack")}
            info = infos[mask]
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(
                torch.ops.moa_flex.attention.default,
                (q, k, v, mask, -1.0 if scale is None else scale, layer, runtime_id, softcap, info, sinks_of(node),
                 alibi_of(node), bias),
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        if verify_id is None:
            erase_with_inputs(gm.graph, node, roots)
        else:  # the check: the model's call stays, compared with moa-flex attention under a dense plan
            with gm.graph.inserting_after(new):
                gm.graph.call_function(
                    torch.ops.moa_flex.verify_attention.default,
                    (q, k, v, mask, -1.0 if scale is None else scale, layer, verify_id, info,
                     node.meta.get(MODEL_OUTPUT, node), padding_mask,
                     sinks_of(node), alibi_of(node), bias),
                )
        report.rewritten.append(RewrittenNode(layer, new.name, path))
    eliminate_dead_code(gm.graph, roots)
    gm.graph.lint()
    gm.recompile()
    return report


def make_backend(
    plan: Plan, runtime_id: int, *, inner: str = "inductor", mode: str | None = None,
    on_report: Callable[[PassReport], None] | None = None, softcaps: Sequence[float] | None = None,
    windows: Sequence[int | None] | None = None, partial_graphs: bool = False, verify_id: int | None = None,
    say: Callable[[str], None] | None = None, regional: bool = False,
    on_regions: Callable[[RegionReport], None] | None = None, latent: Sequence[LatentDims] | None = None,
    kv_sources: Mapping[int, int] | None = None,
) -> Callable:
    """A torch.compile backend: rewrite attention, then hand the graph to inductor (or run eagerly).

    ``partial_graphs``: accept graph pieces without attention (graph breaks, as in models
    running flex_attention); ``on_report`` is called only for pieces that had attention.
    ``verify_id``: a runtime with a dense plan: the first call of each graph runs the
    first-call check (:mod:`moa_flex.runtime.verify`) instead of the compiled graph, once;
    ``say`` hears its outcome. ``regional``: decoder layers with equal graphs share one
    inductor compile (:mod:`moa_flex.passes.regional`; ``on_regions`` hears what it did).
    ``latent``: per planned layer, the sizes of a model with latent attention (passes/latent.py), for prefills
    over its cache. ``kv_sources``: KV sharing (``architecture.kv_sources``), for prefills over
    a cache.
    """
    if inner not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {inner!r}")

    own_confirmed = [False]  # attention in the model's own code: True once a first-call check of it passed

    def moa_flex_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        own_code = has_eager_attention(gm.graph)
        if verify_id is None and own_code:
            raise ValueError(
                "this model computes attention in its own code: moa-flex reads it as one attention call per layer "
                "(moa_flex/passes/eager_attention.py) but cannot see from the graph that the model's mask is "
                "causal; the first-call check compares the two on real inputs and is required for such models: "
                "compile with verify=True (the default)")
        checked = copy_graph_module(gm) if verify_id is not None and not flex_nodes(gm.graph) else None
        report = rewrite_attention(gm, plan, runtime_id, softcaps, windows, partial_graphs, latent=latent,
                                   kv_sources=kv_sources)
        compiled = compile_graph(gm, example_inputs, inner, mode, regional and bool(report.rewritten), on_regions)
        if checked is not None and report.rewritten:
            rewrite_attention(checked, plan, runtime_id, softcaps, windows, partial_graphs, verify_id=verify_id,
                              latent=latent, kv_sources=kv_sources)
            compiled = CheckedFirstCall(checked, compiled, say, own_confirmed if own_code else None)
        # Reported only once compiled: dynamo may restart an analysis (and call us again).
        if on_report is not None and report.rewritten:
            on_report(report)
        return SavedGraph(compiled, [report] if report.rewritten else [])

    return moa_flex_backend
