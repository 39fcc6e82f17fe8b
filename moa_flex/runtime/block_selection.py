"""Query-aware sparse attention's block selection (Qwen4-Exp's ``QSAIndexer``), vectorized.

Qwen4-Exp's indexed layers let each query attend a budget of its visible keys that a small
indexer picks: the query's visible keys, in position order, are cut into blocks of
``block`` (the indexer's ``compress_ratio``); each complete block's raw indexer keys are
averaged (in float32), RMS-normalized, and rotated to the block's first position; the block
scores ``sum over index heads of relu(q . k) / sqrt(d)``; the query keeps the tokens of its
``budget // block`` best blocks and every token of its last, incomplete block (the tail).

transformers runs this as a Python loop over every (row, query) with ``nonzero``, which
Dynamo cannot trace. :func:`block_select` computes the same selection for any visible mask
(so also for the visible keys that a MoA rule keeps: the rule composes first, as for DeepSeek
Sparse Attention, passes/indexed.py), a chunk of queries at a time so that no tensor holds
more than about :data:`CHUNK_ELEMENTS` values. Ties between block scores go to the earlier
block (:func:`moa_flex.runtime.selection.earliest_topk`), as the reference breaks them.
"""

from __future__ import annotations

import math

import torch

from moa_flex.runtime.selection import earliest_topk

CHUNK_ELEMENTS = 1 << 24  # the gathered block keys of one chunk of queries, at most (elements)


def rms_norm_offset(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen4-Exp's RMSNorm: ``x / rms(x) * (1 + weight)`` in float32, back in ``x``'s dtype."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` features of ``x`` (rotate-half form, the
    rest passed through), ``cos``/``sin`` broadcast to ``x``."""
    r = cos.shape[-1]
    rope, rest = x[..., :r], x[..., r:]
    half = rope.shape[-1] // 2
    turned = torch.cat([-rope[..., half:], rope[..., :half]], dim=-1)
    return torch.cat([rope * cos + turned * sin, rest], dim=-1)


def block_select(q: torch.Tensor, keys: torch.Tensor, key_cos: torch.Tensor, key_sin: torch.Tensor,
                 visible: torch.Tensor, norm_weight: torch.Tensor, eps: float, block: int, budget: int,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """The keys each query attends, [B, Q, K] bool: ``q`` [B, Q, H, d] the index queries (normed
    and rotated), ``keys`` [B, K, d] the raw index keys of the K columns, ``key_cos``/``key_sin``
    [B, K, r] each column's rotary terms, ``visible`` [B, Q, K] what each query may see.

    ``positions`` [B, K] (default: the column order): each column's position, which orders a
    query's visible keys into blocks (a MoA cache's slots are in ring order)."""
    B, Q, K = visible.shape
    if block < 1 or budget < 0:
        raise ValueError(f"block_select needs block >= 1 and budget >= 0, got {block} and {budget}")
    if positions is None:
        positions = torch.arange(K, device=visible.device).expand(B, K)
    per_query = max(1, K * keys.shape[-1] + K * q.shape[-2])
    step = max(1, CHUNK_ELEMENTS // (B * per_query))
    parts = [_select_chunk(q[:, s:s + step], keys, key_cos, key_sin, visible[:, s:s + step], norm_weight, eps,
                           block, budget, positions) for s in range(0, Q, step)]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _select_chunk(q: torch.Tensor, keys: torch.Tensor, key_cos: torch.Tensor, key_sin: torch.Tensor,
                  visible: torch.Tensor, norm_weight: torch.Tensor, eps: float, block: int, budget: int,
                  positions: torch.Tensor) -> torch.Tensor:
    B, Q, K = visible.shape
    d = keys.shape[-1]
    J = K // block  # the most complete blocks any query can have
    n = visible.sum(-1)  # [B, Q] visible keys per query
    complete = n // block
    # each query's visible columns first, in position order (invisible ones last)
    last = torch.iinfo(torch.int64).max
    order = torch.sort(torch.where(visible, positions.unsqueeze(1).to(torch.int64), last), dim=-1, stable=True).indices
    ranks = torch.arange(K, device=visible.device).expand(B, Q, K)
    in_tail = (ranks >= (complete * block).unsqueeze(-1)) & (ranks < n.unsqueeze(-1))  # by rank
    tail = torch.zeros_like(visible).scatter(-1, order, in_tail)  # by column
    top = min(budget // block, J)
    if top == 0:
        return tail
    members = order[..., :J * block].reshape(B, Q, J, block)  # [B, Q, J, c] columns of each block
    flat = members.reshape(B, -1)
    gathered = keys.gather(1, flat.unsqueeze(-1).expand(-1, -1, d)).reshape(B, Q, J, block, d)
    pooled = gathered.float().mean(dim=3).to(keys.dtype)
    pooled = rms_norm_offset(pooled, norm_weight, eps)
    starts = members[..., 0].reshape(B, -1, 1)
    cos = key_cos.gather(1, starts.expand(-1, -1, key_cos.shape[-1])).reshape(B, Q, J, -1)
    sin = key_sin.gather(1, starts.expand(-1, -1, key_sin.shape[-1])).reshape(B, Q, J, -1)
    block_keys = rotate(pooled, cos, sin)
    scores = torch.matmul(q.float(), block_keys.float().transpose(-1, -2))  # [B, Q, H, J]
    scores = scores.relu().sum(dim=2) / math.sqrt(d)
    js = torch.arange(J, device=visible.device)
    scores = scores.masked_fill(js >= complete.unsqueeze(-1), float("-inf"))
    chosen = earliest_topk(scores, js, top)  # [B, Q, top]
    real = chosen < complete.unsqueeze(-1)  # fewer complete blocks than picks: the rest are not blocks
    columns = members.gather(2, chosen.unsqueeze(-1).expand(-1, -1, -1, block))  # [B, Q, top, c]
    columns = torch.where(real.unsqueeze(-1), columns, K).reshape(B, Q, -1)
    picked = torch.zeros(B, Q, K + 1, dtype=torch.bool, device=visible.device).scatter(-1, columns, True)
    return picked[..., :K] | tail
