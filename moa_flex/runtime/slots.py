"""The slot map of the ragged MoA cache (docs/DESIGN.md, "The KV cache"), in plain torch.

Per layer, per batch row, per KV-head group ``g``: ``C_g`` slots. Logical position ``p``
(0 = first real token of the row) lives in slot

    slot(p) = p                                   if p < sink
            = sink + (p - sink) mod (C_g - sink)  otherwise

so each group keeps its sink and its last ``C_g - sink`` tokens, and the position a slot holds
follows from the row's newest position (:mod:`moa_flex.kernels.slot_map`). The flat layout
puts group ``g`` at slots ``offsets[g] .. offsets[g + 1] - 1``. The writes here are the torch
implementations of the cache ops (:mod:`moa_flex.runtime.ops`) and the oracles of their
Triton kernels.
"""

from __future__ import annotations

import torch

from moa_flex.kernels.slot_map import flat_group_index, slot_positions

__all__ = ["cache_append_reference", "cache_extend_reference", "flat_group_index", "slot_positions"]


def cache_extend_reference(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    start: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, sink: int,
) -> None:
    """Write a chunk's real tokens into the cache (the torch implementation of
    ``moa_flex::cache_extend``): ``k_new``/``v_new`` [B, G, C, D] (after RoPE), chunk index
    ``c`` of row ``b`` at logical position ``start[b] + c`` (negative: left padding, never
    written). The row held positions ``0 .. length[b] - 1``; it now holds, through the slot
    map, what positions ``0 .. start[b] + C - 1`` leave in each group (the sink and the newest
    ``C_g - sink``), and ``length`` advances by the chunk's real tokens. Other slots keep their
    contents."""
    B, G, C, _ = k_new.shape
    n = length.long()
    last = torch.maximum(start.long() + C - 1, n - 1)  # newest position per row after the write
    pos = slot_positions(caps, offsets, sink, last)  # [B, S]
    group = flat_group_index(offsets, keys.device)  # [S]
    fresh = (pos >= n.view(B, 1)).unsqueeze(-1)  # the slot now holds a token of this chunk
    src = (pos - start.long().view(B, 1)).clamp(0, C - 1)  # chunk index of that token
    for cache, new in ((keys, k_new), (values, v_new)):
        rows = new[torch.arange(B, device=new.device).view(B, 1), group.view(1, -1), src]  # [B, S, D]
        cache.copy_(torch.where(fresh, rows.to(cache.dtype), cache))
    length.copy_(last + 1)


def cache_append_reference(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    caps: torch.Tensor, offsets: torch.Tensor, sink: int,
) -> None:
    """The twin of ``moa_flex::cache_append`` in plain torch (the CPU implementation and the
    oracle of the Triton kernel, :mod:`moa_flex.kernels.append`)."""
    B, G = caps.shape
    p = length.long().view(B, 1)  # [B, 1]
    cap = caps.long()
    slot = torch.where(p < sink, p, sink + torch.remainder(p - sink, (cap - sink).clamp(min=1)))  # [B, G]
    flat = offsets[:-1].to(keys.device).long().view(1, G) + slot  # [B, G]
    rows = torch.arange(B, device=keys.device).view(B, 1).expand(B, G)
    keys[rows, flat] = k_new[:, :, 0].to(keys.dtype)
    values[rows, flat] = v_new[:, :, 0].to(values.dtype)
    length.add_(1)
