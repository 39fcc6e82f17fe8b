"""FX graph pass for decoding with the ragged MoA cache.

In a decode step traced with a :class:`moa_flex.cache.MoaCache`, every layer's cache update
is a ``torch.ops.moa_flex.cache_append`` node (it writes the new token into its slot of each
group and advances the row's length) followed by the layer's attention call, an SDPA node
over that single new token. The pass maps both to their layer (module stack), checks there
is exactly one of each per layer, and replaces the SDPA node by
``torch.ops.moa_flex.ragged_decode`` over the cache tensors the append node mutated, with
the query at logical position ``length - 1``. Functionalization orders the decode after the
append, so the new token is attended. Nothing is rewritten unless every layer matches.
The decode backend then (by default on CUDA) fuses the step's q/k/v and gate/up projections
into moa-flex's skinny-GEMM kernels (``moa_flex.passes.linear_pass``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers the cache ops and torch.ops.moa_flex.ragged_decode)
from moa_flex.plan import Plan

from .inner import compile_graph
from .latent import LatentDims, absorb, expansion_weight
from .regional import RegionReport
from .saved import SavedGraph
from .eager_attention import rewrite_eager_attention
from .value_fusion import fuse_value_splits
from .key_bias import rewrite_key_bias, with_key_bias
from .linear_pass import LinearFusionReport, fuse_linears
from .mask_sources import check_masks_are_masks
from .indexed import is_selection, select_slots, selections
from .nodes import (
    PassReport, RewrittenNode, arg, attention_nodes, by_layer, call_args, check_no_dropout, eliminate_dead_code,
    runs_modules_again, check_heads, check_reads_cache, check_width, erase_with_inputs, head_dim, sinks_of, alibi_of,
    as_cached, key_bias_of, CACHED,
)

APPEND = (torch.ops.moa_flex.cache_append, torch.ops.moa_flex.cache_append.default)


@dataclass
class DecodeReport(PassReport):
    """A decode graph's :class:`PassReport`, plus what :func:`fuse_linears` did (None: not run)."""

    linear_fusion: LinearFusionReport | None = None


def append_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The ``moa_flex::cache_append`` nodes of a graph (one per layer in a decode step)."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in APPEND]


def _append_args(node: torch.fx.Node) -> tuple:
    """The append node's arguments in schema order (Dynamo may record some as kwargs)."""
    return call_args(node, ("keys", "values", "length", "k_new", "v_new", "spans", "caps", "offsets", "sink",
                            "k_scale", "v_scale"), optional=("k_scale", "v_scale"))


def rewrite_decode(
    gm: torch.fx.GraphModule, plan: Plan, softcaps: Sequence[float] | None = None,
    windows: Sequence[int | None] | None = None, latent: Sequence[LatentDims] | None = None,
    kv_sources: Mapping[int, int] | None = None,
) -> DecodeReport:
    """Replace each layer's single-token SDPA node by ragged decode over its MoA cache.

    ``softcaps``/``windows``: per layer, the model's logit soft-cap and own sliding window
    (tokens), or 0/None. ``latent``: per planned layer, the sizes of a model with latent attention (its cache
    holds the latent: passes/latent.py). ``kv_sources``: plan layer -> the plan layer whose keys
    and values it attends (KV sharing, ``architecture.kv_sources``); such a layer has a cache of
    its own, which its source's cache layer writes (``MoaCacheLayer.update``).
    """
    rewrite_eager_attention(gm.graph)  # attention in the model's own code
    fuse_value_splits(gm.graph)  # DiffLlama: one call per layer over both value halves
    rewrite_key_bias(gm.graph)  # Doge: a per-key bias in the mask
    calls = attention_nodes(gm.graph)
    in_call_order = runs_modules_again(calls)  # HRM's cycles: the k-th call is slot k
    appends = by_layer(append_nodes(gm.graph), "cache_append", plan.model, "decode", kv_sources, in_call_order)
    attns = by_layer(calls, "attention", plan.model, "decode", in_call_order=in_call_order)
    check_no_dropout([node for node, _ in attns.values()])
    for layer, (node, _) in attns.items():
        check_heads(node, plan.model, layer)
    # an indexer's selection (DeepSeek Sparse Attention): ruled over the cache's slots, then read by the kernel
    indexed = {layer for layer, (node, _) in attns.items() if selections(arg(node, 3, "attn_mask", None))}
    check_masks_are_masks(((node, layer) for layer, (node, _) in attns.items()), kept=is_selection)
    layouts = {}  # per layer: how the call reads the keys and values it cached (the cache is written so)
    for layer in range(plan.num_layers):  # everything checked before anything changes
        append_args = _append_args(appends[layer][0])
        if latent is not None:  # the cache writes (latent ; rotary key) and the latent: the model's expansion
            layouts[layer] = expansion_weight(attns[layer][0], append_args[4], layer)
        else:
            layouts[layer] = check_reads_cache(attns[layer][0], append_args[3], append_args[4], layer)
    report = DecodeReport(graph_module=gm)
    roots: list[torch.fx.Node] = []
    for layer in range(plan.num_layers):
        node, path = attns[layer]
        append = appends[layer][0]
        # the cache's own sink (a guarded constant of the traced cache), not the compile-time plan's
        keys, values, length, k_new, v_new, spans, caps, offsets, sink, k_scale, v_scale = _append_args(append)
        q = node.args[0]
        scale = arg(node, 6, "scale", None)
        if scale is None:
            scale = head_dim(q) ** -0.5
        absorbed = None
        if latent is not None:
            absorbed = absorb(gm.graph, node, q, *layouts[layer], latent[layer], node)
            q = absorbed.q
            check_width(v_new, values, layer)
        else:
            for t, how in zip((k_new, v_new), layouts[layer]):  # the cache's layout: as the call reads them
                cached = as_cached(gm.graph, append, t, how, plan.num_kv_heads)
                if cached is not t:
                    append.replace_input_with(t, cached)
                if t is v_new:
                    check_width(cached, values, layer)
        bias = key_bias_of(node)
        if bias is not None:  # one more key column (passes/key_bias.py), written with the key
            if latent is not None or layouts[layer] != (CACHED, CACHED):
                raise ValueError(f"layer {layer}: a per-key score bias beside latent attention or a rearranged cache "
                                 "layout is not modeled")
            k_cached = _append_args(append)[3]
            q, k_aug = with_key_bias(gm.graph, node, q, k_cached, bias, scale)
            append.replace_input_with(k_cached, k_aug)
            node.prepend(append)  # the write after the bias it carries (its new token's only), still before the read
        softcap = float(softcaps[layer]) if softcaps else 0.0
        window = int(windows[layer] or 0) if windows else 0
        select = None
        if layer in indexed:
            select = select_slots(gm.graph, node, layer, keys, length, spans, caps, offsets, sink, window)
        with gm.graph.inserting_before(node):
            pos = gm.graph.call_function(torch.ops.aten.sub.Scalar, (length, 1))
            q1 = gm.graph.call_function(torch.ops.aten.select.int, (q, 2, 0))
            out = gm.graph.call_function(
                torch.ops.moa_flex.ragged_decode.default,
                (q1, keys, values, offsets, caps, spans, pos, sink, window,
                 scale if isinstance(scale, torch.fx.Node) else float(scale), softcap, sinks_of(node), k_scale, v_scale,
                 alibi_of(node), select),
            )
            new = gm.graph.call_function(torch.ops.aten.unsqueeze.default, (out, 2))
        for n in (pos, q1, out, new):
            n.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
        # the replaced node's output (same shape): AOTAutograd's cache needs example values on
        # the nodes that tensor methods are called on, and bypasses the graph without them
        new.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val")})
        if absorbed is not None:  # attention over the latent: [B, H, 1, r], projected to the model's values
            for key in ("example_value", "val"):
                if isinstance(new.meta.get(key), torch.Tensor):
                    new.meta[key] = new.meta[key].new_empty((*new.meta[key].shape[:-1], latent[layer].rank))
            new = absorbed.project(gm.graph, new, node)
        node.replace_all_uses_with(new)
        erase_with_inputs(gm.graph, node, roots)
        report.rewritten.append(RewrittenNode(layer, out.name, path))
    eliminate_dead_code(gm.graph, roots)
    gm.graph.lint()
    gm.recompile()
    return report


def fuses_linears(fuse_linear: bool | None, example_inputs: list) -> bool:
    """Whether the decode backend runs :func:`fuse_linears`: as asked, or (None) when the
    graph's example inputs include CUDA tensors (the Triton kernels; on CPU the ops would
    only run their fp32 twins)."""
    if fuse_linear is not None:
        return fuse_linear
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)


def make_decode_backend(
    plan: Plan, *, inner: str = "inductor", mode: str | None = None,
    on_report: Callable[[PassReport], None] | None = None, softcaps: Sequence[float] | None = None,
    windows: Sequence[int | None] | None = None, fuse_linear: bool | None = None, regional: bool = False,
    on_regions: Callable[[RegionReport], None] | None = None, latent: Sequence[LatentDims] | None = None,
    kv_sources: Mapping[int, int] | None = None,
) -> Callable:
    """A torch.compile backend for decode steps: :func:`rewrite_decode`, then (``fuse_linear``)
    :func:`~moa_flex.passes.linear_pass.fuse_linears`, then inductor (or eager).
    ``mode="reduce-overhead"`` runs the step under CUDA graphs (the cache has static addresses).
    ``fuse_linear``: True / False, or None for "on when the example inputs are CUDA tensors";
    the reports passed to ``on_report`` are :class:`DecodeReport` (``linear_fusion`` is None
    when the fusion did not run). ``regional``/``on_regions``: as for the prefill backend
    (:func:`moa_flex.passes.attention_pass.make_backend`). ``latent``, ``kv_sources``: as for
    :func:`rewrite_decode`."""
    if inner not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {inner!r}")
    if fuse_linear is not None and not isinstance(fuse_linear, bool):
        raise ValueError(f"fuse_linear must be True, False or None, got {fuse_linear!r}")

    def moa_flex_decode_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        report = rewrite_decode(gm, plan, softcaps, windows, latent, kv_sources)
        if fuses_linears(fuse_linear, example_inputs):
            report.linear_fusion = fuse_linears(gm)
        compiled = compile_graph(gm, example_inputs, inner, mode, regional, on_regions)
        if on_report is not None:
            on_report(report)
        return SavedGraph(compiled, [report])

    return moa_flex_decode_backend
