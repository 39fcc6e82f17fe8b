"""The slot map of the ragged MoA cache (docs/DESIGN.md, "The KV cache"), in plain torch.

Per layer, per batch row, per KV-head group ``g``: ``C_g`` slots. Logical position ``p``
(0 = first real token of the row) lives in slot

    slot(p) = p                                   if p < sink
            = sink + (p - sink) mod (C_g - sink)  otherwise

so each group keeps its sink and its last ``C_g - sink`` tokens, and the position a slot holds
follows from the row's newest position (:mod:`moa_flex.kernels.slot_map`). The flat layout
puts group ``g`` at slots ``offsets[g] .. offsets[g + 1] - 1``. The writes here are the torch
implementations of the cache ops (:mod:`moa_flex.runtime.ops`) and the oracles of their
Triton kernels. An FP8 cache (``keys.dtype`` float8_e4m3fn) is written through
:func:`~moa_flex.kernels.quant.quantize_fp8`: the values and each vector's scale
(``k_scale``/``v_scale`` [B, S]); other caches take the new values cast to their dtype.
"""

from __future__ import annotations

import torch

from moa_flex.kernels.quant import is_quantized, quantize_fp8
from moa_flex.kernels.slot_map import flat_group_index, slot_positions

__all__ = ["cache_append_reference", "cache_extend_reference", "flat_group_index", "ring_append", "ring_extend",
           "slot_positions"]


def _quantized_pair(cache: torch.Tensor, new: torch.Tensor, scale: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a cache stored like ``cache`` holds of ``new`` [..., D]: (fp8 values, scales [...])
    for an FP8 cache (``new`` quantized unless it is FP8 already, with its ``scale``), else
    (``new`` in the cache's dtype, None)."""
    if not is_quantized(cache.dtype):
        return new.to(cache.dtype), None
    if is_quantized(new.dtype):
        if scale is None:
            raise ValueError("FP8 values written into the cache need their scales")
        return new, scale
    return quantize_fp8(new)


def _check_scales(keys: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    if is_quantized(keys.dtype) and (k_scale is None or v_scale is None or k_scale.shape != keys.shape[:2]
                                     or v_scale.shape != keys.shape[:2]):
        raise ValueError(f"an FP8 cache needs k_scale and v_scale [B, S] = {list(keys.shape[:2])}, got "
                         f"{getattr(k_scale, 'shape', None)} and {getattr(v_scale, 'shape', None)}")


def cache_extend_reference(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    start: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, sink: int,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    kn_scale: torch.Tensor | None = None, vn_scale: torch.Tensor | None = None,
) -> None:
    """Write a chunk's real tokens into the cache (the torch implementation of
    ``moa_flex::cache_extend``): ``k_new``/``v_new`` [B, G, C, D] (after RoPE), chunk index
    ``c`` of row ``b`` at logical position ``start[b] + c`` (negative: left padding, never
    written). The row held positions ``0 .. length[b] - 1``; it now holds, through the slot
    map, what positions ``0 .. start[b] + C - 1`` leave in each group (the sink and the newest
    ``C_g - sink``), and ``length`` advances by the chunk's real tokens. Other slots keep their
    contents. FP8 cache: ``k_scale``/``v_scale`` [B, S] are written too; ``k_new``/``v_new``
    may be FP8 already, with ``kn_scale``/``vn_scale`` [B, G, C]."""
    _check_scales(keys, k_scale, v_scale)
    B, G, C, _ = k_new.shape
    last, fresh, src = _extend_map(length, start, C, caps, offsets, sink)
    group = flat_group_index(offsets, keys.device)  # [S]
    b = torch.arange(B, device=keys.device).view(B, 1)
    for cache, scales, new, new_scale in ((keys, k_scale, k_new, kn_scale), (values, v_scale, v_new, vn_scale)):
        stored, stored_scale = _quantized_pair(cache, new, new_scale)
        rows = stored[b, group.view(1, -1), src]  # [B, S, D]
        _select_into(cache, fresh, rows)
        if stored_scale is not None:
            scales.copy_(torch.where(fresh[..., 0], stored_scale[b, group.view(1, -1), src], scales))
    length.copy_(last + 1)


def _extend_map(length: torch.Tensor, start: torch.Tensor, C: int, caps: torch.Tensor, offsets: torch.Tensor,
                sink: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a chunk of ``C`` tokens at ``start`` [B] lands in a cache holding ``length`` [B]:
    (the newest position per row after the write [B], whether each slot now holds a token of
    the chunk [B, S, 1], the chunk index of that token [B, S])."""
    n = length.long()
    last = torch.maximum(start.long() + C - 1, n - 1)
    pos = slot_positions(caps, offsets, sink, last)  # [B, S]
    fresh = (pos >= n.view(-1, 1)).unsqueeze(-1)
    src = (pos - start.long().view(-1, 1)).clamp(0, C - 1)
    return last, fresh, src


def _append_slots(length: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, sink: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where one token per row at position ``length`` [B] lands in each group: (rows [B, G],
    flat slots [B, G]), the indices of a write."""
    B, G = caps.shape
    p = length.long().view(B, 1)
    slot = torch.where(p < sink, p, sink + torch.remainder(p - sink, (caps.long() - sink).clamp(min=1)))  # [B, G]
    flat = offsets[:-1].to(caps.device).long().view(1, G) + slot
    return torch.arange(B, device=caps.device).view(B, 1).expand(B, G), flat


def _select_into(cache: torch.Tensor, fresh: torch.Tensor, rows: torch.Tensor) -> None:
    """``cache = where(fresh, rows, cache)``; FP8 selected as bytes (not every torch build has
    FP8 kernels for ``where``)."""
    if is_quantized(cache.dtype):
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    cache.copy_(torch.where(fresh, rows, cache))


def cache_append_reference(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    caps: torch.Tensor, offsets: torch.Tensor, sink: int,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """The twin of ``moa_flex::cache_append`` in plain torch (the CPU implementation and the
    oracle of the Triton kernel, :mod:`moa_flex.kernels.append`); an FP8 cache quantizes the
    token and writes its scales into ``k_scale``/``v_scale`` [B, S]."""
    _check_scales(keys, k_scale, v_scale)
    rows, flat = _append_slots(length, caps, offsets, sink)
    for cache, scales, new in ((keys, k_scale, k_new), (values, v_scale, v_new)):
        stored, stored_scale = _quantized_pair(cache, new[:, :, 0], None)
        cache[rows, flat] = stored
        if stored_scale is not None:
            scales[rows, flat] = stored_scale
    length.add_(1)


def ring_extend(ring: torch.Tensor, length: torch.Tensor, new: torch.Tensor, start: torch.Tensor, caps: torch.Tensor,
                offsets: torch.Tensor, sink: int) -> None:
    """Write a chunk of one tensor per token (``new`` [B, C, D], chunk index ``c`` of row ``b``
    at logical position ``start[b] + c``) into ``ring`` [B, S, D] through the cache's slot map,
    as :func:`cache_extend_reference` writes keys: an indexer's keys beside a layer's cache
    (DeepSeek Sparse Attention), in the ring's dtype; ``length`` advances likewise."""
    B, C, _ = new.shape
    last, fresh, src = _extend_map(length, start, C, caps, offsets, sink)
    rows = new.to(ring.dtype)[torch.arange(B, device=ring.device).view(B, 1), src]  # [B, S, D]
    ring.copy_(torch.where(fresh, rows, ring))
    length.copy_(last + 1)


def ring_append(ring: torch.Tensor, length: torch.Tensor, new: torch.Tensor, caps: torch.Tensor,
                offsets: torch.Tensor, sink: int) -> None:
    """Write one token per row (``new`` [B, 1, D], logical position ``length[b]``) into its slot
    of every group of ``ring`` [B, S, D], as :func:`cache_append_reference` does; ``length += 1``."""
    B, G = caps.shape
    rows, flat = _append_slots(length, caps, offsets, sink)
    ring[rows, flat] = new[:, 0].to(ring.dtype).unsqueeze(1).expand(B, G, new.shape[-1])
    length.add_(1)
