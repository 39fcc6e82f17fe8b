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
"""

from __future__ import annotations

import operator

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers moa_flex::index_keep / selection_info)

from .mask_sources import mask_sources_until
from .nodes import arg, recorded_value

_TOPK = ("topk",)
_COMBINE_METHODS = ("masked_fill", "__and__", "logical_and", "mul")
_COMBINE_FUNCTIONS = (operator.and_, torch.logical_and, torch.Tensor.masked_fill, torch.masked_fill, operator.mul)


def is_topk(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_method" and node.target in _TOPK) or (node.op == "call_function" and node.target is torch.topk))


def is_selection(node: torch.fx.Node) -> bool:
    """``topk(...).indices``: keys chosen by their scores (``getitem`` 1 of a ``topk``)."""
    return (node.op == "call_function" and node.target is operator.getitem and is_topk(node.args[0])
            and node.args[1] == 1)


def selections(mask: object) -> list[torch.fx.Node]:
    """The ``topk`` nodes whose indices reach ``mask`` (an attention call's ``attn_mask``)."""
    if not isinstance(mask, torch.fx.Node):
        return []
    found: list[torch.fx.Node] = []
    mask_sources_until(mask, lambda n: is_selection(n) and not found.append(n.args[0]))
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
    found = selections(mask)
    if len(found) != 1:
        raise ValueError(f"layer {layer}'s attention mask carries {len(found)} top-k selections; moa-flex composes "
                         "a plan with one indexer a layer")
    topk = found[0]
    check_selects_keys(topk, node, layer)
    plain = unselected_mask(mask)
    info = infos.get(plain)
    if info is None:
        with graph.inserting_after(plain):
            info = infos[plain] = graph.call_function(torch.ops.moa_flex.selection_info.default, (plain,))
        info.meta = {k: v for k, v in plain.meta.items() if k in ("stack_trace", "nn_module_stack")}
    scores = topk.args[0]
    with graph.inserting_before(topk):
        keep = graph.call_function(torch.ops.moa_flex.index_keep.default, (scores, info, layer, runtime_id))
        dropped = graph.call_function(torch.logical_not, (keep,))
        ruled = graph.call_method("masked_fill", (scores, dropped, float("-inf")))
    for n in (keep, dropped, ruled):
        n.meta = {k: v for k, v in topk.meta.items() if k in ("stack_trace", "nn_module_stack")}
    topk.replace_input_with(scores, ruled)
    return mask, info
