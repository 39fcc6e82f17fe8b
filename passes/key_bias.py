"""FX pass: a per-key score bias read out of an SDPA call's float mask (Doge).

Doge's attention (transformers' ``DogeAttention``, "dynamic mask attention") hands SDPA a float
mask that adds to every score of key j a bias of key j's own,

    dt = exp(A * softplus(dt_proj(values)))                    # [B, G, K]: per KV head and key
    M  = repeat_kv(dt[:, :, None, :].expand(-1, -1, Q, -1)
                   .masked_fill(attention_mask != 0, min))     # [B, H, Q, K]

(the masked_fill and the repeat optional). This pass finds exactly that form and puts
``moa_flex::sdpa_key_bias(q, k, v, ~cond, ..., dt)`` in the SDPA call's place: the mask now a
boolean one made from ``cond`` alone (which the other passes check is position data), the bias a
separate argument. ``cond`` must be a boolean tensor and ``min`` its dtype's minimum, so that a
masked key's weight is exactly 0 as in the model. The fill does not add the bias to masked keys,
so nothing else changes.

A plain forward's attention (FlexAttention) adds it in a score_mod. Over the MoA cache the passes
carry it as one more key column: ``k' = [k, dt]`` and ``q' = [q, 1 / scale]``
(:func:`with_key_bias`), so that ``scale * q'.k' = scale * q.k + dt`` in moa-flex's own chunk and
decode kernels, unchanged. The MoA cache keeps the column beside each key (``architecture.key_bias_columns``), written when the
token is, so a decode step reads the bias of every kept key although it computes the bias of its
new token only. The bias of a key depends on that key's values only, so the cached column is
what the model computes over its whole cache.

Past ``keep_window_size`` keys (``architecture.key_bias_limit``) Doge keeps only the top-k keys by
bias, a selection by content: a mask with a ``topk`` among its inputs is refused by name here, and
the MoA cache refuses requests longer than that (its decode steps' masks cover their new token
only, so the model would not select).

With ``keep_original=True`` (the first-call check's graph) the model's SDPA call stays, as aten's
op (:data:`MODEL_CALL`: the same computation, which the passes do not take for an attention call to
rewrite, and which precompile can save), and the new node names its output (``MODEL_OUTPUT``):
the check compares moa-flex attention with the model's own result.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

import moa_flex.runtime.ops  # noqa: F401  (registers torch.ops.moa_flex.sdpa_key_bias)

from .eager_attention import MODEL_OUTPUT
from .nodes import arg, call_before, recorded_value

PLAIN_SDPA = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
MODEL_CALL = torch.ops.aten.scaled_dot_product_attention.default  # the model's call kept for the first-call check
_SDPA_ARGS = (("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False))
_SEARCH = 64  # nodes: how far up a mask's inputs the top-k search looks


def _method_or_function(node: Any, name: str) -> bool:
    """Whether ``node`` calls the tensor method ``name`` or a function of that name."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_method":
        return node.target == name
    return node.op == "call_function" and getattr(node.target, "__name__", "") == name


def _unrepeated(node: Any) -> Any:
    """``x`` for HF's ``repeat_kv(x)``, ``x[:, :, None].expand(...).reshape(...)``; else ``node``."""
    if not (_method_or_function(node, "reshape") or _method_or_function(node, "view")):
        return node
    expand = node.args[0]
    if not _method_or_function(expand, "expand"):
        return node
    index = expand.args[0]
    if not (isinstance(index, torch.fx.Node) and index.op == "call_function" and index.target is operator.getitem
            and _new_axis_at(index.args[1], 2)):
        return node
    return index.args[0]


def _new_axis_at(index: Any, axis: int) -> bool:
    """``index`` is ``(:, ..., :, None, ...)`` with the None at ``axis``, full slices before it and after."""
    items = index if isinstance(index, tuple) else (index,)
    return (len(items) > axis and items[axis] is None
            and all(i is None if n == axis else (isinstance(i, slice) and i == slice(None)) or i is Ellipsis
                    for n, i in enumerate(items)))


def _broadcast_over_queries(node: Any) -> Any:
    """``dt`` for ``dt[:, :, None, :].expand(...)`` (or ``dt.unsqueeze(2).expand(...)``) with ``dt``
    3-D; else None."""
    if not _method_or_function(node, "expand"):
        return None
    inner = node.args[0]
    if isinstance(inner, torch.fx.Node) and inner.op == "call_function" and inner.target is operator.getitem:
        if not _new_axis_at(inner.args[1], 2):
            return None
        dt = inner.args[0]
    elif _method_or_function(inner, "unsqueeze") and arg(inner, 1, "dim", None) == 2:
        dt = inner.args[0]
    else:
        return None
    value = recorded_value(dt)
    return dt if value is not None and value.dim() == 3 and value.is_floating_point() else None


def match_key_bias(mask: Any) -> tuple[torch.fx.Node, torch.fx.Node | None] | None:
    """(bias [B, G, K], cond or None) when ``mask`` is exactly the module docstring's form; else None."""
    node = _unrepeated(mask)
    cond = None
    if _method_or_function(node, "masked_fill") and len(node.args) == 3:
        node, cond, fill = node.args
        c, m = recorded_value(cond), recorded_value(node)
        if (c is None or m is None or c.dtype != torch.bool or not isinstance(fill, float)
                or fill != torch.finfo(m.dtype).min):
            return None
    dt = _broadcast_over_queries(node)
    return None if dt is None else (dt, cond)


def _selects_top_k(mask: torch.fx.Node) -> bool:
    """Whether a ``topk`` lies among the mask's nearest inputs (Doge past ``keep_window_size``)."""
    seen, todo = set(), [mask]
    while todo and len(seen) < _SEARCH:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if _method_or_function(node, "topk"):
            return True
        todo.extend(node.all_input_nodes)
    return False


def rewrite_key_bias(graph: torch.fx.Graph, keep_original: bool = False) -> int:
    """Replace every SDPA call whose mask adds a per-key bias (module docstring) by
    ``moa_flex::sdpa_key_bias``; ValueError for a mask that selects keys by top-k. Returns how
    many calls it replaced."""
    replaced = 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in PLAIN_SDPA]:
        q, k, v = node.args[:3]
        given = {name: arg(node, 3 + i, name, default) for i, (name, default) in enumerate(_SDPA_ARGS)}
        mask = given["attn_mask"]
        value = recorded_value(mask)
        if value is None or not value.is_floating_point():
            continue
        found = match_key_bias(mask)
        if found is None:
            if _selects_top_k(mask):
                raise ValueError(
                    f"the attention mask of node {node.name} keeps only the top-k keys by a score the model computes "
                    "from their values (Doge's dynamic mask past keep_window_size): a selection by content, which a "
                    "MoA plan's sink and window rules do not model; run inputs within keep_window_size tokens")
            continue
        dt, cond = found
        queries = recorded_value(q)
        if cond is None and not given["is_causal"] and (queries is None or str(queries.shape[2]) != "1"):
            raise ValueError(
                f"the attention call {node.name} adds a per-key bias and masks nothing, with is_causal=False: each "
                "query attends every key of the call, later ones included (transformers 5.17's Doge under sdpa, "
                "whose causal mask is skipped for an input without padding), while a MoA plan rules causal "
                "attention; upgrade transformers")
        bool_mask = None if cond is None else call_before(graph, node, torch.ops.aten.logical_not.default, (cond,),
                                                          torch.logical_not)
        args = (q, k, v, bool_mask, given["dropout_p"], given["is_causal"], given["scale"], given["enable_gqa"], dt)
        with graph.inserting_after(node):  # after the model's call: the first-call check reads its output
            new = graph.call_function(torch.ops.moa_flex.sdpa_key_bias.default, args)
        new.meta = {key: val for key, val in node.meta.items() if key in ("stack_trace", "nn_module_stack", "val",
                                                                          "example_value")}
        node.replace_all_uses_with(new)
        if keep_original:  # as aten's op: the same call, which the passes do not take for attention to rewrite
            node.target = MODEL_CALL
            new.meta[MODEL_OUTPUT] = node
        else:
            graph.erase_node(node)
        replaced += 1
    return replaced


def with_key_bias(graph: torch.fx.Graph, before: torch.fx.Node, q: Any, k: Any, bias: Any, scale: float
                  ) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(q', k') = ([q, 1 / scale], [k, bias]) along the last dim, new nodes before ``before``:
    ``scale * q'.k'`` is ``scale * q.k + bias``. q [B, H, T, D], k [B, Hk, S, D] and bias [B, G, S]
    with G dividing Hk (each of its heads repeated in place: query head h reads k's head h // (H / Hk))."""
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"a per-key score bias needs a constant positive attention scale, got {scale!r}")
    kv, bv = recorded_value(k), recorded_value(bias)
    if kv is None or bv is None:
        raise ValueError(f"no shape recorded for {k} or {bias}: cannot add the per-key bias as a key column")
    if kv.shape[1] % bv.shape[1]:
        raise ValueError(f"the per-key bias has {bv.shape[1]} heads, which do not divide the keys' {kv.shape[1]}")
    if kv.shape[1] != bv.shape[1]:
        n = kv.shape[1] // bv.shape[1]
        bias = call_before(graph, before, torch.ops.aten.repeat_interleave.self_int, (bias, n, 1),
                           lambda t: t.repeat_interleave(n, 1))
    col = call_before(graph, before, torch.ops.aten.unsqueeze.default, (bias, -1), lambda t: t.unsqueeze(-1))
    col = call_before(graph, before, torch.ops.prims.convert_element_type.default, (col, kv.dtype),
                      lambda t: t.to(kv.dtype))
    k_aug = call_before(graph, before, torch.ops.aten.cat.default, ([k, col], -1), lambda *xs: torch.cat(xs, -1),
                        many=True)
    first = call_before(graph, before, torch.ops.aten.slice.Tensor, (q, -1, 0, 1), lambda t: t[..., :1])
    ones = call_before(graph, before, torch.ops.aten.full_like.default, (first, 1.0 / scale),
                       lambda t: torch.full_like(t, 1.0 / scale))
    q_aug = call_before(graph, before, torch.ops.aten.cat.default, ([q, ones], -1), lambda *xs: torch.cat(xs, -1),
                        many=True)
    return q_aug, k_aug
