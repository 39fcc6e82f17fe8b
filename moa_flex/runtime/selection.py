"""An indexer's top-k with ties broken by position: the same keys in a prefill and in a decode step.

DeepSeek Sparse Attention keeps each query's ``index_topk`` best-scored keys. Its scores tie
exactly more often than floats suggest: a key that every index head's ReLU scores 0 scores 0,
and a query whose every head scores every key at or below 0 ties all of them. ``torch.topk``
breaks ties in an order of its own, which depends on the tensor's length and layout, so
transformers' own model can select other keys in a prefill than in a decode step, and a decode
step over a MoA cache (slots in ring order) than a prefill (keys in position order). moa-flex
breaks ties by position, the earlier key first, wherever it selects (passes/indexed.py), and
the reference does too (moa_flex/reference.py, by a stable sort).
"""

from __future__ import annotations

import torch

_LOW = 0xFFFFFFFF  # the position field: 32 bits


def earliest_topk(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, [..., k]) of the ``k`` largest ``scores`` along the last dim, equal scores
    ordered by ``positions`` (int, broadcast to ``scores``; the smaller first). Exact: a float32
    score's bits as an order-preserving integer in the high 32 bits of an int64 key, the
    position's complement in the low 32; -0.0 counts as 0.0; NaN is not ordered (none expected)."""
    s = scores.to(torch.float32) + 0.0  # -0.0 -> +0.0
    bits = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: reverse their bit order
    key = ordered * (1 << 32) + (_LOW - positions.to(torch.int64))
    return key.topk(k, dim=-1).indices
