"""Every torch.library op of moa-flex, registered in one place.

The ops are what the compile passes put into traced graphs (``torch.ops.moa_flex.*``):
opaque to inductor, each with a fake implementation for tracing. Their bodies dispatch to
the pure-torch implementations (CPU, and the oracles of the tests) or to the Triton kernels
(CUDA), which live with their concepts:

=====================================  ==========================================================
op                                     implementation
=====================================  ==========================================================
``moa_flex::attention``                :class:`moa_flex.runtime.attention.MoaRuntime` (FlexAttention)
``moa_flex::sdpa_sinks``               here: SDPA with learned sinks, what sink models trace (dense, the check's reference)
``moa_flex::sdpa_alibi``               here: SDPA with ALiBi slopes, what the own-code pass makes of ALiBi models (dense)
``moa_flex::sdpa_key_bias``            here: SDPA with a per-key score bias, what passes/key_bias.py makes of Doge's mask (dense)
``moa_flex::mask_info``                :func:`moa_flex.masks.padding_info`
``moa_flex::cache_extend``             :func:`moa_flex.runtime.slots.cache_extend_reference`
``moa_flex::cache_append``             :mod:`moa_flex.kernels.append` / :func:`~moa_flex.runtime.slots.cache_append_reference`
``moa_flex::ragged_decode``            :mod:`moa_flex.kernels.decode` (kernel and twin)
``moa_flex::chunk_prefill``            :mod:`moa_flex.kernels.chunk` (kernel and twin), then ``cache_extend``
``moa_flex::selection_info``           :func:`moa_flex.masks.padding_info` of a mask without an indexer's selection
``moa_flex::index_keep``               :meth:`moa_flex.runtime.attention.MoaRuntime.index_keep` (DeepSeek Sparse Attention)
``moa_flex::index_extend`` / ``_append`` :func:`moa_flex.runtime.slots.ring_extend` / ``ring_append`` (the indexer's keys)
``moa_flex::slot_keep``                :func:`moa_flex.kernels.decode.slot_keep` (a decode step's indexer over the ring)
``moa_flex::slot_position``            :func:`moa_flex.kernels.decode.one_group_positions`
``moa_flex::chunk_select_keep``        :func:`moa_flex.kernels.decode.chunk_select_keep` (a chunk's indexer over the cache)
``moa_flex::topk_earliest``            :func:`moa_flex.runtime.selection.earliest_topk`
``moa_flex::block_select``             :func:`moa_flex.runtime.block_selection.block_select` (Qwen4-Exp's indexer)
``moa_flex::grouped_linear``           :mod:`moa_flex.kernels.linear` (kernel and twin)
``moa_flex::gated_mlp``                :mod:`moa_flex.kernels.linear` (kernel and twin)
``moa_flex::unpacked_rows``            :func:`unpacked_rows` (here: a check of HF's packed-sequence tensors)
``moa_flex::dbrx_experts``             :func:`moa_flex.runtime.traceable.run_dbrx_experts` (DBRX's own experts, as one node)
``moa_flex::verify_attention``         :func:`moa_flex.runtime.verify.check_close` over ``moa_flex::attention``
``moa_flex::verify_chunk``             :func:`moa_flex.runtime.verify.check_close` over the chunk twin / kernel
=====================================  ==========================================================

``moa_flex::attention`` finds its plan through :data:`RUNTIMES`: graphs hold only a runtime's
integer id, so a plan is data that can change without recompiling.

The cache ops take an FP8 cache's scales (``k_scale``/``v_scale`` [B, S], None for other
caches; :mod:`moa_flex.kernels.quant`): the writes quantize, the reads dequantize in the
kernels. The ops that mutate them take them (and ``sinks``) without a default: torch 2.11's
dispatcher drops trailing arguments equal to their defaults before its in-place version
bump, which then indexes past the arguments it got (IndexError); torch 2.13 fills them in.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch

from moa_flex.kernels.append import cache_append_triton
from moa_flex.kernels.chunk import check_chunk_inputs, chunk_attention_reference, chunk_attention_triton
from moa_flex.kernels.decode import (
    check_decode_inputs, chunk_select_keep, one_group_positions, ragged_decode_reference,
    ragged_decode_triton, slot_keep,
)
from moa_flex.kernels.linear import (
    check_gated_inputs, check_linear_inputs, gated_mlp, gated_mlp_reference, grouped_linear, grouped_linear_reference,
)
from moa_flex.kernels.quant import is_quantized, quantize_fp8
from moa_flex.masks import padding_info

from . import block_selection
from .selection import earliest_topk
from .slots import cache_append_reference, cache_extend_reference, ring_append, ring_extend
from .traceable import run_dbrx_experts
from .verify import check_close, record_skip, too_large

RUNTIMES: dict[int, Any] = {}  # runtime id -> MoaRuntime (moa_flex.runtime.attention)
_RENAMED = threading.local()  # during a call of a graph read back: the ids it names -> this model's runtimes


def runtime_of(runtime_id: int) -> Any:
    """The runtime a graph's ``runtime_id`` names: in a graph another process compiled
    (:mod:`moa_flex.runtime.precompiled`), the id that process gave it, renamed for the call;
    None if it is gone."""
    renamed = getattr(_RENAMED, "ids", None)
    if renamed:
        found = renamed.get(runtime_id)
        if found is not None:
            return found
    return RUNTIMES.get(runtime_id)


@contextlib.contextmanager
def renamed_runtimes(ids: dict[int, Any]) -> Iterator[None]:
    """Within: ``runtime_of(i)`` is ``ids[i]`` for each ``i`` in ``ids``."""
    before = getattr(_RENAMED, "ids", None)
    _RENAMED.ids = ids
    try:
        yield
    finally:
        _RENAMED.ids = before


def _device_error(op: str, device: torch.device) -> ValueError:
    return ValueError(f"moa_flex::{op} runs on CUDA or CPU tensors, got {device}")


# ------------------------------------------------------------------------------ attention
def dense_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                 scale: float | None, alibi: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's scores in float32, [B, H, Q, K] (-inf where masked; queries are the last Q of the
    K keys), with ``alibi`` [H] slopes' ``-slope * (i - j)`` and ``key_bias`` [B, G, K] (each
    key's own bias, G heads grouped as k's) added, and the values expanded to the query heads:
    what the dense reference ops (sdpa_sinks, sdpa_alibi, sdpa_key_bias) take their softmax of."""
    H, Q, K = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != H:
        k, v = (t.repeat_interleave(H // k.shape[1], 1) for t in (k, v))
    x = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if key_bias is not None:
        x = x + key_bias.float().repeat_interleave(H // key_bias.shape[1], 1).unsqueeze(2)
    dist = torch.arange(K - Q, K, device=q.device).view(-1, 1) - torch.arange(K, device=q.device).view(1, -1)
    if alibi is not None:
        x = x - alibi.float().view(1, H, 1, 1) * dist.float()
    if is_causal:
        x = x.masked_fill(dist < 0, float("-inf"))
    if attn_mask is not None:
        x = x.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else x + attn_mask.float()
    return x, v


@torch.library.custom_op("moa_flex::attention", mutates_args=())
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    scale: float, layer: int, runtime_id: int, softcap: float, info: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None, alibi: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """moa-flex attention of ``layer`` under the plan of runtime ``runtime_id``: q [B, H, Q, D],
    k/v [B, KVH, K, D] -> [B, H, Q, Dv]; ``info`` is ``mask_info(attn_mask)`` when the graph
    computed it; ``sinks`` [H]: learned sink logits (GPT-OSS); ``alibi`` [H] float32: ALiBi
    slopes, the bias ``-slope * (i - j)`` (BLOOM, MPT); ``key_bias`` [B, G, K]: each key's own
    bias (Doge)."""
    runtime = runtime_of(runtime_id)
    if runtime is None:
        raise RuntimeError(f"moa-flex runtime {runtime_id} is gone (model uncompiled?); compile the model again")
    return runtime.attention(q, k, v, attn_mask, scale, layer, softcap, info, sinks, alibi, key_bias).contiguous()


@attention.register_fake
def _(q, k, v, attn_mask, scale, layer, runtime_id, softcap, info=None, sinks=None, alibi=None, key_bias=None):  # noqa: ANN001, ANN202
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("moa_flex::sdpa_alibi", mutates_args=())
def sdpa_alibi(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
    is_causal: bool, scale: float | None, enable_gqa: bool, alibi: torch.Tensor,
) -> torch.Tensor:
    """What the own-code pass (passes/eager_attention.py) puts in place of a model's ALiBi
    attention: SDPA's arguments in SDPA's order, plus ``alibi`` [H], the slopes: scores get
    ``-slope_h * (i - j)`` for a query at key index i (queries are the last Q of the K keys) and
    a key at j. Dense, float32 scores; the passes replace it by moa-flex attention, so it runs
    only in a graph left as traced."""
    if dropout_p:
        raise ValueError("moa_flex::sdpa_alibi runs inference only (dropout_p must be 0)")
    x, v = dense_scores(q, k, v, attn_mask, is_causal, scale, alibi)
    return (torch.softmax(x, dim=-1) @ v.float()).to(q.dtype)


@sdpa_alibi.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, alibi):  # noqa: ANN001, ANN202
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("moa_flex::sdpa_sinks", mutates_args=())
def sdpa_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
    is_causal: bool, scale: float | None, enable_gqa: bool, sinks: torch.Tensor,
) -> torch.Tensor:
    """What a model with learned attention sinks (GPT-OSS) traces in place of SDPA: SDPA's
    arguments in SDPA's order, plus ``sinks`` [H], each head's learned logit as one more softmax
    term without a value, as transformers' eager attention computes it (dense scores, fp32;
    the passes replace it by moa-flex attention, so it runs only as the first-call check's
    reference)."""
    if dropout_p:
        raise ValueError("moa_flex::sdpa_sinks runs inference only (dropout_p must be 0)")
    B, H, Q, _ = q.shape
    x, v = dense_scores(q, k, v, attn_mask, is_causal, scale)
    col = sinks.float().view(1, H, 1, 1).expand(B, H, Q, 1)
    probs = torch.softmax(torch.cat([x, col], dim=-1), dim=-1)[..., :-1]
    return (probs @ v.float()).to(q.dtype)


@sdpa_sinks.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks):  # noqa: ANN001, ANN202
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("moa_flex::sdpa_key_bias", mutates_args=())
def sdpa_key_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
    is_causal: bool, scale: float | None, enable_gqa: bool, key_bias: torch.Tensor,
) -> torch.Tensor:
    """What passes/key_bias.py puts in place of an SDPA call whose float mask adds each key's own
    bias (Doge's dynamic mask): SDPA's arguments in SDPA's order, the mask now a boolean one, plus
    ``key_bias`` [B, G, K] (G: the model's KV heads, which query head h reads as h // (H / G)),
    added to every query's score of key j. Dense, float32 scores; the passes replace it by
    moa-flex attention, so it runs only in a graph left as traced."""
    if dropout_p:
        raise ValueError("moa_flex::sdpa_key_bias runs inference only (dropout_p must be 0)")
    x, v = dense_scores(q, k, v, attn_mask, is_causal, scale, key_bias=key_bias)
    return (torch.softmax(x, dim=-1) @ v.float()).to(q.dtype)


@sdpa_key_bias.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, key_bias):  # noqa: ANN001, ANN202
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("moa_flex::mask_info", mutates_args=())
def mask_info(attn_mask: torch.Tensor) -> torch.Tensor:
    """A model's mask -> LongTensor [B + 1]: left pads per row, then 1 if exactly causal + left
    padding (:func:`moa_flex.masks.padding_info`)."""
    return padding_info(attn_mask)


@mask_info.register_fake
def _(attn_mask):  # noqa: ANN001, ANN202
    return attn_mask.new_empty((attn_mask.shape[0] + 1,), dtype=torch.long)


@torch.library.custom_op("moa_flex::selection_info", mutates_args=())
def selection_info(attn_mask: torch.Tensor) -> torch.Tensor:
    """:func:`mask_info` of a layer whose attention mask also carries a selection of keys by
    content (DeepSeek Sparse Attention's top-k, passes/indexed.py): the left pads of the mask
    without the selection, and 0 (not plain causal), so that the selection is ANDed in."""
    info = padding_info(attn_mask)
    info[-1] = 0
    return info


@selection_info.register_fake
def _(attn_mask):  # noqa: ANN001, ANN202
    return attn_mask.new_empty((attn_mask.shape[0] + 1,), dtype=torch.long)


@torch.library.custom_op("moa_flex::index_keep", mutates_args=())
def index_keep(scores: torch.Tensor, info: torch.Tensor, layer: int, runtime_id: int) -> torch.Tensor:
    """Bool [B, Q, K] for an indexer's scores [B, Q, K]: the keys the plan's rule keeps for each
    query of ``layer`` (left pads from ``info``, :func:`selection_info`), where the indexer's
    top-k must pick (:meth:`moa_flex.runtime.attention.MoaRuntime.index_keep`)."""
    return runtime_of(runtime_id).index_keep(scores, info, layer)


@index_keep.register_fake
def _(scores, info, layer, runtime_id):  # noqa: ANN001, ANN202
    return scores.new_empty(scores.shape, dtype=torch.bool)


# ------------------------------------------------------------------------------ the cache
def chunk_start(length: torch.Tensor, chunk_pads: torch.Tensor) -> torch.Tensor:
    """Logical position of a chunk's index 0 per row: the row's cached real tokens, minus the
    chunk's leading left padding (tokens)."""
    return length - chunk_pads.to(length.device, torch.long)


@torch.library.custom_op("moa_flex::cache_extend", mutates_args=("keys", "values", "length", "k_scale", "v_scale"))
def cache_extend(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    chunk_pads: torch.Tensor, spans: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, sink: int,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
) -> None:
    """Write a chunk's real tokens (``k_new``/``v_new`` [B, G, C, D]) into a layer's cache:
    what the sinks and rings keep of them, after what the cache held; ``length`` advances by
    the chunk's real tokens. ``chunk_pads`` [B]: the chunk's leading left padding per row.
    ``spans`` [B, H] is not used here: it is the layout the prefill pass hands, with the
    tensors this op mutates, to the layer's chunk attention."""
    cache_extend_reference(keys, values, length, k_new, v_new, chunk_start(length, chunk_pads), caps, offsets, sink,
                           k_scale, v_scale)


@cache_extend.register_fake
def _(keys, values, length, k_new, v_new, chunk_pads, spans, caps, offsets, sink, k_scale, v_scale):  # noqa: ANN001, ANN202
    return None


@torch.library.custom_op("moa_flex::index_extend", mutates_args=("ring", "length"))
def index_extend(ring: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, chunk_pads: torch.Tensor,
                 caps: torch.Tensor, offsets: torch.Tensor, sink: int) -> None:
    """Write a chunk's indexer keys (``k_new`` [B, C, D], DeepSeek Sparse Attention) into the
    layer's indexer ring [B, S, D] through the cache's slot map, as ``cache_extend`` writes the
    latent (:func:`moa_flex.runtime.slots.ring_extend`); ``chunk_pads`` [B]: leading left pads."""
    ring_extend(ring, length, k_new, chunk_start(length, chunk_pads), caps, offsets, sink)


@index_extend.register_fake
def _(ring, length, k_new, chunk_pads, caps, offsets, sink):  # noqa: ANN001, ANN202
    return None


@torch.library.custom_op("moa_flex::index_append", mutates_args=("ring", "length"))
def index_append(ring: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, caps: torch.Tensor,
                 offsets: torch.Tensor, sink: int) -> None:
    """Write one token's indexer key per row (``k_new`` [B, 1, D]) into its slot of the ring
    (:func:`moa_flex.runtime.slots.ring_append`); ``length += 1``."""
    ring_append(ring, length, k_new, caps, offsets, sink)


@index_append.register_fake
def _(ring, length, k_new, caps, offsets, sink):  # noqa: ANN001, ANN202
    return None


@torch.library.custom_op("moa_flex::slot_keep", mutates_args=())
def slot_keep_op(keys: torch.Tensor, offsets: torch.Tensor, caps: torch.Tensor, spans: torch.Tensor, pos: torch.Tensor,
                 sink: int, window: int) -> torch.Tensor:
    """Bool [B, S] over a one-group cache ``keys`` [B, S, D]: the slots the rule keeps for each
    row's query at ``pos`` (:func:`moa_flex.kernels.decode.slot_keep`), where a decode step's
    indexer picks (DeepSeek Sparse Attention)."""
    return slot_keep(offsets, caps, spans, pos, sink, window, keys.shape[1])


@slot_keep_op.register_fake
def _(keys, offsets, caps, spans, pos, sink, window):  # noqa: ANN001, ANN202
    return keys.new_empty(keys.shape[:2], dtype=torch.bool)


@torch.library.custom_op("moa_flex::chunk_select_keep", mutates_args=())
def chunk_select_keep_op(scores: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor, caps: torch.Tensor,
                         spans: torch.Tensor, length: torch.Tensor, chunk_pads: torch.Tensor, sink: int,
                         window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For an indexer's scores [B, C, S + C] in a prefill chunk over a one-group cache ``keys``
    [B, S, D] holding ``length`` tokens (``chunk_pads`` [B]: the chunk's leading left pads): the
    columns the rule keeps, bool [B, C, S + C], and their positions [B, S + C]
    (:func:`moa_flex.kernels.decode.chunk_select_keep`; DeepSeek Sparse Attention)."""
    C, S = scores.shape[1], keys.shape[1]
    if scores.shape[2] != S + C:
        raise ValueError(f"an indexer's scores over a chunk of {C} tokens and a cache of {S} slots must have {S + C} "
                         f"columns (the slots, then the chunk), got {scores.shape[2]}")
    return chunk_select_keep(offsets, caps, spans, length, chunk_start(length, chunk_pads), sink, window, S, C)


@chunk_select_keep_op.register_fake
def _(scores, keys, offsets, caps, spans, length, chunk_pads, sink, window):  # noqa: ANN001, ANN202
    B, C, K = scores.shape
    return scores.new_empty((B, C, K), dtype=torch.bool), scores.new_empty((B, K), dtype=torch.long)


@torch.library.custom_op("moa_flex::slot_position", mutates_args=())
def slot_position(keys: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, pos: torch.Tensor,
                  sink: int) -> torch.Tensor:
    """LongTensor [B, S]: the logical position each slot of a one-group cache ``keys`` [B, S, D]
    holds once positions up to ``pos`` [B] were written (-1: none; as
    :func:`moa_flex.kernels.slot_map.slot_positions`, without reading ``offsets`` on the host)."""
    if offsets.shape[0] != 2:
        raise ValueError(f"slot_position takes a cache of one KV group (a latent), got {offsets.shape[0] - 1} groups")
    p, held = one_group_positions(caps, pos, sink, keys.shape[1])
    return torch.where(held, p, torch.full_like(p, -1))


@slot_position.register_fake
def _(keys, caps, offsets, pos, sink):  # noqa: ANN001, ANN202
    return keys.new_empty(keys.shape[:2], dtype=torch.long)


@torch.library.custom_op("moa_flex::topk_earliest", mutates_args=())
def topk_earliest(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the ``k`` best ``scores`` along the last dim, ties to the earlier
    position (:func:`moa_flex.runtime.selection.earliest_topk`): an indexer's top-k."""
    return earliest_topk(scores, positions, k)


@topk_earliest.register_fake
def _(scores, positions, k):  # noqa: ANN001, ANN202
    return scores.new_empty((*scores.shape[:-1], k), dtype=torch.long)


@torch.library.custom_op("moa_flex::block_select", mutates_args=())
def block_select(q: torch.Tensor, keys: torch.Tensor, key_cos: torch.Tensor, key_sin: torch.Tensor,
                 visible: torch.Tensor, norm_weight: torch.Tensor, eps: float, block: int, budget: int,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, Q, K]: the keys a query-aware sparse attention indexer (Qwen4-Exp) picks for each
    query among its ``visible`` ones (:func:`moa_flex.runtime.block_selection.block_select`)."""
    return block_selection.block_select(q, keys, key_cos, key_sin, visible, norm_weight, eps, block, budget,
                                        positions)


@block_select.register_fake
def _(q, keys, key_cos, key_sin, visible, norm_weight, eps, block, budget, positions=None):  # noqa: ANN001, ANN202
    return visible.new_empty(visible.shape, dtype=torch.bool)


@torch.library.custom_op("moa_flex::cache_append", mutates_args=("keys", "values", "length", "k_scale", "v_scale"))
def cache_append(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    spans: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, sink: int,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
) -> None:
    """Write one new token per row (``k_new``/``v_new`` [B, G, 1, D], logical position
    ``length[b]``) into its slot of every group, then ``length += 1``. CUDA: one Triton
    kernel; CPU: the torch twin.

    ``spans`` [B, H] is not used here: it is the layout the compile pass hands, with the
    tensors this op mutated, to the layer's decode attention.
    """
    if keys.device.type == "cuda":
        cache_append_triton(keys, values, length, k_new, v_new, caps, offsets, sink, k_scale, v_scale)
    else:
        cache_append_reference(keys, values, length, k_new, v_new, caps, offsets, sink, k_scale, v_scale)


@cache_append.register_fake
def _(keys, values, length, k_new, v_new, spans, caps, offsets, sink, k_scale, v_scale):  # noqa: ANN001, ANN202
    return None


# ------------------------------------------------------------------------------ decode
@torch.library.custom_op("moa_flex::ragged_decode", mutates_args=())
def ragged_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, caps: torch.Tensor,
    spans: torch.Tensor, pos: torch.Tensor, sink: int, window: int, scale: float, softcap: float,
    sinks: torch.Tensor | None = None, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None, select: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ragged MoA decode: q [B, H, D] -> [B, H, Dv] (``sinks`` [H]: learned sink logits; an FP8
    cache's ``k_scale``/``v_scale`` [B, S]; ``alibi`` [H]: ALiBi slopes; ``select`` bool [B, S]:
    an indexer's selected slots). CUDA: Triton; CPU: the twin."""
    if q.device.type == "cuda":
        return ragged_decode_triton(q, k, v, offsets, caps, spans, pos, sink, window, scale, softcap, sinks=sinks,
                                    k_scale=k_scale, v_scale=v_scale, alibi=alibi, select=select)
    if q.device.type == "cpu":
        return ragged_decode_reference(q, k, v, offsets, caps, spans, pos, sink, window, scale, softcap, sinks,
                                       k_scale, v_scale, alibi=alibi, select=select)
    raise _device_error("ragged_decode", q.device)


@ragged_decode.register_fake
def _(q, k, v, offsets, caps, spans, pos, sink, window, scale, softcap, sinks=None, k_scale=None, v_scale=None,  # noqa: ANN001, ANN202
      alibi=None, select=None):
    check_decode_inputs(q, k, v, offsets, caps, spans, pos, sink, window, scale, softcap, k_scale=k_scale,
                        v_scale=v_scale)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op("moa_flex::chunk_prefill", mutates_args=("keys", "values", "length", "k_scale", "v_scale"))
def chunk_prefill(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    length: torch.Tensor, chunk_pads: torch.Tensor, spans: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor,
    sink: int, window: int, scale: float, softcap: float, sinks: torch.Tensor | None,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, alibi: torch.Tensor | None,
    select: torch.Tensor | None,
) -> torch.Tensor:
    """One prefill chunk of a layer: its queries q [B, H, C, D] over the cache as the chunks
    before left it plus the chunk's own keys (-> [B, H, C, Dv]), then the chunk's write into
    the cache (``cache_extend``). One op, so the write can never be ordered before the read.
    ``chunk_pads`` [B]: the chunk's leading left padding per row; ``sinks`` [H]: learned sink
    logits; ``alibi`` [H]: ALiBi slopes. An FP8 cache (``k_scale``/``v_scale`` [B, S]): the chunk is quantized first, and
    its queries see its own keys and values as the cache will hold them. ``select`` bool
    [B, C, S + C]: an indexer's choice among the cache's slots and the chunk's keys (DeepSeek
    Sparse Attention; :func:`chunk_select_keep_op`). CUDA: Triton; CPU: the twin."""
    start = chunk_start(length, chunk_pads)
    kn_scale = vn_scale = None
    if is_quantized(keys.dtype):
        (k_new, kn_scale), (v_new, vn_scale) = quantize_fp8(k_new), quantize_fp8(v_new)
    args = (q, k_new, v_new, keys, values, offsets, caps, spans, length, start, sink, window, scale, softcap)
    scales = {"k_scale": k_scale, "v_scale": v_scale, "kn_scale": kn_scale, "vn_scale": vn_scale}
    if q.device.type == "cuda":
        out = chunk_attention_triton(*args, sinks=sinks, alibi=alibi, select=select, **scales)
    elif q.device.type == "cpu":
        out = chunk_attention_reference(*args, sinks=sinks, alibi=alibi, select=select, **scales)
    else:
        raise _device_error("chunk_prefill", q.device)
    cache_extend_reference(keys, values, length, k_new, v_new, start, caps, offsets, sink, k_scale, v_scale,
                           kn_scale, vn_scale)
    return out


@chunk_prefill.register_fake
def _(q, k_new, v_new, keys, values, length, chunk_pads, spans, caps, offsets, sink, window, scale, softcap,  # noqa: ANN001, ANN202
      sinks, k_scale, v_scale, alibi, select):
    check_chunk_inputs(q, k_new, v_new, keys, values, offsets, caps, spans, length, length, sink, window, scale, softcap,
                       k_scale=k_scale, v_scale=v_scale)
    return q.new_empty(*q.shape[:3], v_new.shape[3])


# ------------------------------------------------------------------------------ first-call checks
DENSE_SPAN = 2**30  # tokens: a span that keeps every key


@torch.library.custom_op("moa_flex::verify_attention", mutates_args=())
def verify_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float, layer: int,
    runtime_id: int, info: torch.Tensor | None, want: torch.Tensor, padding: torch.Tensor | None,
    sinks: torch.Tensor | None = None, alibi: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
) -> None:
    """The first-call check of a plain forward's layer (:mod:`moa_flex.runtime.verify`):
    ``moa_flex::attention`` under runtime ``runtime_id`` (a dense plan), without soft-cap,
    against ``want``, the model's own SDPA output; ``padding`` [B, K]: the 2-D padding mask
    (real query rows: its last Q columns), or None."""
    if too_large(layer, q.shape[0], q.shape[1], q.shape[2], k.shape[2]):
        return
    got = runtime_of(runtime_id).attention(q, k, v, attn_mask, scale, layer, 0.0, info, sinks, alibi, key_bias)
    real = None if padding is None else padding[:, -q.shape[2]:]
    check_close(got, want, real, layer, "moa_flex::attention")


@verify_attention.register_fake
def _(q, k, v, attn_mask, scale, layer, runtime_id, info, want, padding, sinks=None, alibi=None, key_bias=None):  # noqa: ANN001, ANN202
    return None


@torch.library.custom_op("moa_flex::verify_chunk", mutates_args=())
def verify_chunk(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    length: torch.Tensor, chunk_pads: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, sink: int,
    window: int, scale: float, layer: int, want: torch.Tensor, sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, up: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
) -> None:
    """The first-call check of a prefill chunk's layer: when the cache is empty (the first
    chunk), the chunk attention with dense spans, without soft-cap, against ``want``, the
    model's own SDPA output over the chunk (or over its last ``want.shape[2]`` positions,
    whose queries ``q`` holds last); real rows: positions >= 0. Reads ``length`` on
    the host (once per graph). An FP8 cache's chunk is compared unquantized (the check is of
    the rewrite's masks and grouping; quantization is the cache's own, documented error).
    ``up`` [H, r, v] (and ``up_bias`` [H, 1, v]): latent attention's projection of the output
    to the model's values (passes/latent.py), applied before the comparison."""
    if int(length.max()) > 0:
        record_skip(layer, "the cache was not empty (only a first chunk is compared)")
        return
    if too_large(layer, q.shape[0], q.shape[1], q.shape[2], q.shape[2]):
        return
    start = chunk_start(length, chunk_pads)
    spans = torch.full((q.shape[0], q.shape[1]), DENSE_SPAN, dtype=torch.int32, device=q.device)
    args = (q, k_new, v_new, keys, values, offsets, caps, spans, length, start, sink, window, scale, 0.0)
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    got = (chunk_attention_triton(*args, sinks=sinks, alibi=alibi, **scales) if q.device.type == "cuda"
           else chunk_attention_reference(*args, sinks=sinks, alibi=alibi, **scales))
    if up is not None:
        got = got @ up.to(got.dtype) + (0 if up_bias is None else up_bias.to(got.dtype))
    real = (start.view(-1, 1) + torch.arange(q.shape[2], device=q.device).view(1, -1)) >= 0
    if want.dim() == got.dim() and want.shape[2] < got.shape[2]:  # the model's queries: the chunk's last positions
        got, real = got[:, :, -want.shape[2]:], real[:, -want.shape[2]:]  # (padded in front by the prefill pass)
    check_close(got, want, real, layer, "moa_flex::chunk_prefill")


@verify_chunk.register_fake
def _(q, k_new, v_new, keys, values, length, chunk_pads, caps, offsets, sink, window, scale, layer, want,  # noqa: ANN001, ANN202
      sinks=None, k_scale=None, v_scale=None, up=None, up_bias=None, alibi=None):
    return None


# ------------------------------------------------------------------------------ linear layers
@torch.library.custom_op("moa_flex::grouped_linear", mutates_args=())
def grouped_linear_op(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[x @ w.T for w in weights]``, x [..., K] -> [..., N_i]. CUDA: Triton; CPU: the twin."""
    if x.device.type == "cuda":
        return grouped_linear(x, weights)
    if x.device.type == "cpu":
        return grouped_linear_reference(x, weights)
    raise _device_error("grouped_linear", x.device)


@grouped_linear_op.register_fake
def _(x, weights):  # noqa: ANN001, ANN202
    check_linear_inputs(x, weights)
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


@torch.library.custom_op("moa_flex::gated_mlp", mutates_args=())
def gated_mlp_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``silu(x @ w_gate.T) * (x @ w_up.T)``, x [..., K] -> [..., N]. CUDA: Triton; CPU: the twin."""
    if x.device.type == "cuda":
        return gated_mlp(x, w_gate, w_up)
    if x.device.type == "cpu":
        return gated_mlp_reference(x, w_gate, w_up)
    raise _device_error("gated_mlp", x.device)


@gated_mlp_op.register_fake
def _(x, w_gate, w_up):  # noqa: ANN001, ANN202
    check_gated_inputs(x, w_gate, w_up)
    return x.new_empty(*x.shape[:-1], w_gate.shape[0])


# ------------------------------------------------------------------------------ HF packed sequences
@torch.library.custom_op("moa_flex::unpacked_rows", mutates_args=())
def unpacked_rows(seq: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """HF's packed-sequence tensors [B, K] -> an all-true padding mask [B, K] (bool), after
    checking every row holds one sequence with consecutive positions (so HF's packed mask is
    exactly causal); ValueError otherwise. ``pos`` None: sequence ids only (transformers <
    5.24, whose packed mask is causal over token indices)."""
    ok = (seq == seq[:, :1]).all(-1)  # one sequence per row
    if pos is not None:
        ok = ok & (pos.diff(dim=-1) == 1).all(-1)  # with consecutive positions
    bad = (~ok).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"moa-flex: rows {bad} hold packed sequences (position_ids restart or jump inside the row); "
            "the plan runs one sequence per row: pass an attention_mask, or one sequence per row"
        )
    return torch.ones_like(seq, dtype=torch.bool)


@unpacked_rows.register_fake
def _(seq, pos):  # noqa: ANN001, ANN202
    return torch.empty_like(seq, dtype=torch.bool)


# ------------------------------------------------------------------------------ DBRX's experts
@torch.library.custom_op("moa_flex::dbrx_experts", mutates_args=())
def dbrx_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, w1: torch.Tensor,
                 v1: torch.Tensor, w2: torch.Tensor, ffn_hidden_size: int, num_experts: int,
                 activation: str) -> torch.Tensor:
    """DBRX's routed experts, one node in a traced graph: its loop over ``nonzero()`` experts
    has a data-dependent length (moa_flex.runtime.traceable)."""
    return run_dbrx_experts(hidden, top_k_index, top_k_weights, w1, v1, w2, ffn_hidden_size, num_experts, activation)


@dbrx_experts.register_fake
def _(hidden, top_k_index, top_k_weights, w1, v1, w2, ffn_hidden_size, num_experts, activation):  # noqa: ANN001, ANN202
    return torch.empty_like(hidden)
