"""The slot map of the ragged MoA cache (docs/DESIGN.md, "The KV cache"): which logical
position every flat slot holds. Shared by the kernels' twins and the runtime's cache writes.

Per batch row and KV group g with ``C_g`` slots, logical position ``p`` lives in slot
``p`` if ``p < sink``, else ``sink + (p - sink) mod (C_g - sink)``; group g owns the flat
slots ``offsets[g] .. offsets[g + 1] - 1``.
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
