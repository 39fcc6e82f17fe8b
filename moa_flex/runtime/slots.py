"""The slot map of the ragged MoA cache (docs/DESIGN.md, "The KV cache"), in plain torch.

Per layer, per batch row, per KV-head group ``g``: ``C_g`` slots. Logical position ``p``
(0 = first real token of the row) lives in slot

    slot(p) = p                                   if p < sink
            = sink + (p - sink) mod (C_g - sink)  otherwise

so each group keeps its sink and its last ``C_g - sink`` tokens, and the position a slot holds
follows from the row's newest position. The flat layout puts group ``g`` at slots
``offsets[g] .. offsets[g + 1] - 1``. The writes here are the torch implementations of the
cache ops (:mod:`moa_flex.runtime.ops`) and the oracles of their Triton kernels.
"""

from __future__ import annotations

import torch


def slot_positions(caps: torch.Tensor, offsets: torch.Tensor, sink: int, last: torch.Tensor) -> torch.Tensor:
    """Logical position held by every slot once positions ``0 .. last[b]`` were written
    through the slot map: LongTensor ``[B, S]``, -1 for a slot that holds nothing.

    ``caps`` [B, G] slots used per row and group; ``offsets`` [G + 1] group starts in the flat
    slot axis (S = offsets[-1]); ``last`` [B] the newest position per row (-1: nothing yet).
    """
    B, G = caps.shape
    S = int(offsets[-1])
    dev = caps.device
    widths = (offsets[1:] - offsets[:-1]).to(dev)
    group = torch.repeat_interleave(torch.arange(G, device=dev), widths, output_size=S)  # [S]
    local = torch.arange(S, device=dev) - offsets[:-1].to(dev)[group]  # slot index inside its group
    cap = caps.long()[:, group]  # [B, S]
    i = last.long().view(B, 1)
    s = local.view(1, S).expand(B, S)
    ring = (cap - sink).clamp(min=1)
    pos = torch.where(s < sink, s, i - torch.remainder(i - s, ring))
    valid = (s < cap) & (s <= i)
    return torch.where(valid, pos, torch.full_like(pos, -1))


def flat_group_index(offsets: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Group of every flat slot: LongTensor [S]."""
    widths = (offsets[1:] - offsets[:-1]).to(device)
    return torch.repeat_interleave(torch.arange(len(widths), device=device), widths, output_size=int(offsets[-1]))


def cache_prefill_reference(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    pads: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, sink: int,
) -> None:
    """Write the kept tokens of a prompt into an empty layer cache (the torch implementation of
    ``moa_flex::cache_prefill``).

    ``k_new``/``v_new`` [B, G, Q, D] (after RoPE; row b's first ``pads[b]`` tokens are padding),
    ``keys``/``values`` [B, S, D] the layer's flat cache; ``length`` [B] becomes the real tokens
    per row. Slots that end up holding nothing are zeroed.
    """
    B, G, Q, _ = k_new.shape
    real = Q - pads.long()  # [B] real tokens per row
    pos = slot_positions(caps, offsets, sink, real - 1)  # [B, S]
    group = flat_group_index(offsets, keys.device)  # [S]
    src = (pads.long().view(B, 1) + pos.clamp(min=0)).clamp(max=Q - 1)  # padded index of each slot's token
    for cache, new in ((keys, k_new), (values, v_new)):
        rows = new[torch.arange(B, device=new.device).view(B, 1), group.view(1, -1), src]  # [B, S, D]
        cache.copy_(torch.where((pos >= 0).unsqueeze(-1), rows, torch.zeros_like(rows)))
    length.copy_(real)


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
