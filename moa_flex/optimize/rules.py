"""Candidate rules of the optimizer: the (alpha, beta) grid, their spans and their losses.

A rule ``(alpha tokens, beta)`` has span ``min(N, max(min_span, ceil_to_multiple(alpha + beta *
N, span_multiple)))`` at length N (:meth:`moa_flex.Plan.spans` computes it, so optimizer and
plan never disagree). Its loss at N is the suffix sum of the profiler's histogram from the
first distance bin the rule drops (docs/DESIGN.md, "Optimizing").
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from moa_flex.plan import DEFAULT_MIN_SPAN, DEFAULT_SINK, DEFAULT_SPAN_MULTIPLE, GRANULARITIES, ModelShape, Plan

Rule = tuple[float, float]


def check_lengths(lengths: Iterable[int], name: str = "lengths") -> tuple[int, ...]:
    out = []
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be integers >= 1 (tokens), got {n!r}")
        out.append(int(n))
    if not out:
        raise ValueError(f"{name} must not be empty")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must be distinct, got {out}")
    return tuple(sorted(out))


def check_rules(rules: Sequence[Rule]) -> list[Rule]:
    out = []
    for i, rule in enumerate(rules):
        try:
            a, b = (float(v) for v in rule)
        except (TypeError, ValueError) as e:
            raise ValueError(f"rules[{i}] must be a pair (alpha tokens, beta), got {rule!r}") from e
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"rules[{i}] must be finite, got {rule!r}")
        if not 0 <= b <= 1:
            raise ValueError(f"rules[{i}] beta must be in [0, 1], got {b}")
        out.append((a, b))
    if not out:
        raise ValueError("rules must not be empty")
    if len(set(out)) != len(out):
        raise ValueError("rules must be distinct")
    return out


def rule_spans(
    rules: Sequence[Rule],
    lengths: Iterable[int],
    *,
    sink: int = DEFAULT_SINK,
    span_multiple: int = DEFAULT_SPAN_MULTIPLE,
    min_span: int = DEFAULT_MIN_SPAN,
) -> torch.Tensor:
    """LongTensor [R, len(lengths)]: span (tokens) of every rule at every length (sorted).

    Computed by :meth:`Plan.spans` itself (a one-layer plan with one group per rule), so the
    optimizer and the plans it writes can never disagree on a span.
    """
    rules = check_rules(rules)
    lengths = check_lengths(lengths)
    R = len(rules)
    plan = Plan(
        ModelShape(1, R, R), [[a for a, _ in rules]], [[b for _, b in rules]], granularity="head",
        sink=sink, span_multiple=span_multiple, min_span=min_span,
    )
    return torch.stack([plan.spans(n)[0] for n in lengths], dim=1)


def rule_grid(
    lengths: Iterable[int],
    *,
    alpha_step: float = 1024,
    beta_step: float = 1 / 8,
    alpha_min: float = 0,
    alpha_max: float | None = None,
    beta_max: float = 1.0,
    sink: int = DEFAULT_SINK,
    span_multiple: int = DEFAULT_SPAN_MULTIPLE,
    min_span: int = DEFAULT_MIN_SPAN,
) -> list[Rule]:
    """Candidate rules (alpha tokens, beta) on a grid, reduced to what the lengths can tell apart.

    The grid is ``alpha = alpha_min + k * alpha_step <= alpha_max`` (default: the longest
    length, beyond which every rule is dense at every profiled length) times
    ``beta = k * beta_step <= beta_max``. A rule is kept only if its spans at the profiled
    lengths differ from every other kept rule's: rules with equal spans at every length are
    indistinguishable to the optimizer (equal KV, equal loss) and the one with the smallest
    (beta, alpha) is kept (the slowest growth beyond the profiled lengths); rules whose span
    is N at every length collapse into the dense rule (0, 1), which is always in the result.
    Sorted by (beta, alpha).
    """
    lengths = check_lengths(lengths)
    for name, v in (("alpha_step", alpha_step), ("beta_step", beta_step)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if not 0 <= beta_max <= 1:
        raise ValueError(f"beta_max must be in [0, 1], got {beta_max!r}")
    if alpha_max is None:
        alpha_max = float(max(lengths))
    if not (math.isfinite(alpha_min) and math.isfinite(alpha_max)) or alpha_max < alpha_min:
        raise ValueError(f"alpha_max ({alpha_max}) must be finite and >= alpha_min ({alpha_min})")
    alphas = [alpha_min + k * alpha_step for k in range(int((alpha_max - alpha_min) / alpha_step + 1e-9) + 1)]
    betas = [k * beta_step for k in range(int(beta_max / beta_step + 1e-9) + 1)]
    dense: Rule = (0.0, 1.0)
    cands = sorted({(float(a), float(b)) for a in alphas for b in betas} - {dense}, key=lambda r: (r[1], r[0]))
    spans = rule_spans([dense, *cands], lengths, sink=sink, span_multiple=span_multiple, min_span=min_span)
    seen = {tuple(spans[0].tolist())}
    kept = [dense]
    for rule, s in zip(cands, spans[1:]):
        key = tuple(s.tolist())
        if key not in seen:
            seen.add(key)
            kept.append(rule)
    return sorted(kept, key=lambda r: (r[1], r[0]))


def rule_losses(
    hist: torch.Tensor,
    N: int,
    rules: Sequence[Rule],
    *,
    sink: int = DEFAULT_SINK,
    span_multiple: int = DEFAULT_SPAN_MULTIPLE,
    min_span: int = DEFAULT_MIN_SPAN,
    granularity: str = "kv_head",
    num_kv_heads: int | None = None,
) -> torch.Tensor:
    """Float64 [L, G, R]: loss of every rule for every group at length N (units of ``hist``).

    ``hist`` is the profiler's ``[L, H, ceil(N / span_multiple)]`` histogram per query head.
    A rule of span ``S < N`` drops the pairs with ``j >= sink`` and ``i - j >= S - sink``:
    its loss is the suffix sum from bin ``(S - sink) // span_multiple`` (exact when ``sink``
    and ``S`` are multiples of ``span_multiple``); a span of ``N`` drops nothing (loss 0).
    For granularity ``kv_head`` the query heads of each KV group are summed (G = KV heads).
    """
    if not isinstance(hist, torch.Tensor):
        raise TypeError(f"hist[{N}] must be a torch.Tensor, got {type(hist).__name__}")
    if hist.dim() != 3:
        raise ValueError(f"hist[{N}] must have shape [L, H, bins], got {tuple(hist.shape)}")
    bins = -(-N // span_multiple)
    if hist.shape[2] != bins:
        raise ValueError(
            f"hist[{N}] has {hist.shape[2]} bins, expected ceil(N / span_multiple) = {bins}"
        )
    h = hist.detach().to("cpu", torch.float64)
    if not torch.isfinite(h).all():
        raise ValueError(f"hist[{N}] has NaN or inf entries")
    if (h < 0).any():
        raise ValueError(f"hist[{N}] has negative entries (it holds summed |E|, expected >= 0)")
    L, H, _ = h.shape
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "kv_head":
        if num_kv_heads is None or H % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide hist[{N}]'s {H} heads, got {num_kv_heads!r}")
        h = h.view(L, num_kv_heads, H // num_kv_heads, bins).sum(2)
    suffix = torch.cat([h.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(h[..., :1])], dim=-1)
    spans = rule_spans(rules, [N], sink=sink, span_multiple=span_multiple, min_span=min_span)[:, 0]
    start = torch.where(spans >= N, torch.full_like(spans, bins), (spans - sink) // span_multiple)
    start = start.clamp(0, bins)
    return suffix[..., start]
