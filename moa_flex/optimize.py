"""The MoA optimizer: one elastic rule per head group, chosen by a MILP under a KV budget.

Inputs are the profiler's histograms (``hist[N]``: ``[L, H, ceil(N / span_multiple)]`` per
query head, bin ``k`` = summed ``|E_ij|`` of pairs at distance ``d = i - j`` with
``k = d // span_multiple`` and ``j >= sink``) and a grid of candidate rules ``(alpha, beta)``.
The loss of a rule at length ``N`` is the suffix sum of the histogram from the first bin
the rule drops (see :func:`rule_losses`).

The program (DESIGN.md, "Optimizing"), for groups ``g`` (KV heads or query heads of every
layer) and rules ``r``:

- binary ``x[g, r]``, ``sum_r x[g, r] = 1``;
- a KV budget at every budget length (every profiled length for a density);
- optionally a lower bound (``min_density``) at every profiled length;
- optionally at most ``K`` distinct rules per layer (binary ``y[l, r] >= x[l, g, r]``);
- one objective per profiled length (the summed loss at that length), combined into a Pareto
  set by augmented epsilon-constraints (:func:`pareto`).

The KV budget measures what :meth:`Plan.kv_density` reports (``measure="memory"``, the
default): the cache slots of every KV head, i.e. the group's span for granularity
``kv_head`` and the largest span of the KV head's query heads for granularity ``head``
(modelled by one continuous variable per KV head and budget length, bounded below by each
of its query heads' spans). ``measure="span"`` budgets the mean query-head span instead
(attention compute, MoA's own budget); the plan's ``kv_density`` may then exceed it under
GQA. The lower bound is always on the mean head span, which never exceeds ``kv_density``.

Solving (:func:`solve`, :func:`pareto`): the layer decomposition of :mod:`moa_flex.lagrangian`
runs first where it has an exact layer oracle (``K <= 2`` distinct rules per layer, or no limit
with one group per cache); it returns its plan when its certified gap is within ``gap_rel``
(seconds at the 70B per-head shape), else its plan warm-starts the PuLP model (CBC or HiGHS),
and the reported gap uses the better of the two lower bounds. ``decompose=False`` skips it.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pulp
import torch

from . import lagrangian
from .plan import (
    DEFAULT_MIN_SPAN,
    DEFAULT_SINK,
    DEFAULT_SPAN_MULTIPLE,
    GRANULARITIES,
    ModelShape,
    Plan,
)

Rule = tuple[float, float]
MEASURES = ("memory", "span")
GB = 10**9  # bytes in the GB of absolute budgets

# ---------------------------------------------------------------------------- rules


def _check_lengths(lengths: Iterable[int], name: str = "lengths") -> tuple[int, ...]:
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


def _check_rules(rules: Sequence[Rule]) -> list[Rule]:
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
    rules = _check_rules(rules)
    lengths = _check_lengths(lengths)
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
    lengths = _check_lengths(lengths)
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


# ---------------------------------------------------------------------------- losses


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


# ---------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """A KV-cache budget: a density, or an absolute size in tokens or GB at a given length.

    - ``density``: KV slots <= density * (dense slots), at ``length`` if given, else at every
      profiled length. Measured as :meth:`Plan.kv_density` (``measure="memory"``).
    - ``tokens``: total KV slots per sequence, summed over layers and KV heads, at ``length``.
    - ``gb``: cache bytes (10**9 per GB) for ``batch_size`` sequences of ``length`` tokens:
      ``2 (K and V) * head_dim * dtype_bytes * batch_size * slots``.
    """

    density: float | None = None
    tokens: float | None = None
    gb: float | None = None
    length: int | None = None
    batch_size: int = 1
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        given = [k for k in ("density", "tokens", "gb") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of budget density, tokens, gb; got {given or 'none'}")
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"budget {given[0]} must be a finite number > 0, got {value!r}")
        if self.density is not None and self.density > 1:
            raise ValueError(f"budget density must be in (0, 1], got {self.density}")
        if self.length is not None and (isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1):
            raise ValueError(f"budget length must be an integer >= 1 (tokens), got {self.length!r}")
        if self.density is None and self.length is None:
            raise ValueError(f"budget {given[0]} needs a length (tokens) at which it holds")
        for k in ("batch_size", "dtype_bytes"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"budget {k} must be an integer >= 1, got {v!r}")

    def slot_limits(self, lengths: Sequence[int], model: ModelShape, cache_groups: int) -> dict[int, float]:
        """{length: max KV slots per sequence summed over layers and cache groups}."""
        if self.density is not None:
            at = [self.length] if self.length is not None else list(lengths)
            return {n: self.density * n * model.num_layers * cache_groups for n in at}
        if self.tokens is not None:
            return {self.length: float(self.tokens)}
        if model.head_dim is None:
            raise ValueError("a budget in GB needs model.head_dim")
        per_slot = 2 * model.head_dim * self.dtype_bytes * self.batch_size
        return {self.length: self.gb * GB / per_slot}

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# ---------------------------------------------------------------------------- problem


@dataclass
class Problem:
    """A built instance: losses and spans as arrays, everything the MILP needs.

    ``loss``: float64 [n, L, G, R] (profiled lengths x layers x groups x rules), raw units.
    ``spans``: int64 [R, n] at the profiled lengths; ``budget_spans``: {length: int64 [R]}.
    ``limits``: {length: max slots}; ``floor``: {profiled length: min summed group span}.
    ``candidates``: per (l, g) the rule indices left after pruning dominated rules.
    """

    model: ModelShape
    granularity: str
    sink: int
    span_multiple: int
    min_span: int
    rules: list[Rule]
    lengths: tuple[int, ...]
    loss: np.ndarray
    spans: np.ndarray
    budget_spans: dict[int, np.ndarray]
    limits: dict[int, float]
    floor: dict[int, float]
    max_rules_per_layer: int | None
    measure: str
    budget: Budget
    min_density: float | None
    candidates: list[list[np.ndarray]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, G, R)."""
        return self.loss.shape[1], self.loss.shape[2], self.loss.shape[3]

    @property
    def group_size(self) -> int:
        """Rule groups per KV head sharing one cache (1 unless per-head rules under GQA)."""
        if self.granularity == "head" and self.measure == "memory":
            return self.model.num_heads // self.model.num_kv_heads
        return 1

    @property
    def scale(self) -> np.ndarray:
        """Float64 [n]: the loss normalizer per profiled length (every group's worst rule summed)."""
        n = len(self.lengths)
        return np.maximum(self.loss.max(-1).reshape(n, -1).sum(1), 1e-300)

    def objectives(self, choice: np.ndarray) -> np.ndarray:
        """Float64 [n]: summed loss at every profiled length of an assignment [L, G] of rule indices."""
        L, G, _ = self.shape
        picked = np.take_along_axis(self.loss, choice[None, :, :, None], axis=3)[..., 0]
        return picked.reshape(len(self.lengths), -1).sum(1)

    def slots(self, choice: np.ndarray, length: int) -> float:
        """KV slots (summed over layers and cache groups) of an assignment at a budget length."""
        s = self.budget_spans[length][choice]
        k = self.group_size
        if k > 1:
            s = s.reshape(s.shape[0], -1, k).max(-1)
        return float(s.sum())


def build_problem(
    hist: Mapping[int, torch.Tensor],
    model: ModelShape | Any,
    budget: Budget | float,
    *,
    rules: Sequence[Rule] | None = None,
    granularity: str | None = None,
    sink: int = DEFAULT_SINK,
    span_multiple: int = DEFAULT_SPAN_MULTIPLE,
    min_span: int = DEFAULT_MIN_SPAN,
    min_density: float | None = None,
    max_rules_per_layer: int | None = 2,
    measure: str = "memory",
    prune: bool = True,
) -> Problem:
    """Check the inputs, compute every rule's loss and span, prune dominated rules.

    ``hist``: {N (tokens): [L, H, ceil(N / span_multiple)]}; ``budget``: a :class:`Budget`
    or a density; ``rules``: default :func:`rule_grid` of the profiled lengths.
    """
    shape = model if isinstance(model, ModelShape) else ModelShape.from_config(model)
    if not isinstance(hist, Mapping) or not hist:
        raise ValueError("hist must be a non-empty mapping {length (tokens): histogram tensor}")
    lengths = _check_lengths(hist.keys(), "hist lengths")
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        budget = Budget(density=float(budget))
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget or a density (float), got {type(budget).__name__}")
    if granularity is None:
        granularity = "kv_head" if shape.num_kv_heads < shape.num_heads else "head"
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    if measure == "span" and budget.density is None:
        raise ValueError("measure 'span' (mean head span) takes a density budget, not tokens or GB")
    if max_rules_per_layer is not None and (
        isinstance(max_rules_per_layer, bool) or not isinstance(max_rules_per_layer, int) or max_rules_per_layer < 1
    ):
        raise ValueError(f"max_rules_per_layer must be an integer >= 1 or None, got {max_rules_per_layer!r}")
    if min_density is not None:
        if not (isinstance(min_density, (int, float)) and 0 <= min_density <= 1):
            raise ValueError(f"min_density must be in [0, 1], got {min_density!r}")
        if budget.density is not None and budget.length is None and min_density > budget.density:
            raise ValueError(f"min_density ({min_density}) must be <= the budget density ({budget.density})")
    rules = _check_rules(rule_grid(lengths, sink=sink, span_multiple=span_multiple, min_span=min_span) if rules is None else rules)
    for n, t in hist.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[:2]) != (shape.num_layers, shape.num_heads):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"hist[{n}] must have shape [L={shape.num_layers}, H={shape.num_heads}, bins], got {got}"
            )
    kw = dict(sink=sink, span_multiple=span_multiple, min_span=min_span)
    loss = np.stack([
        rule_losses(hist[n], n, rules, granularity=granularity, num_kv_heads=shape.num_kv_heads, **kw).numpy()
        for n in lengths
    ])
    spans = rule_spans(rules, lengths, **kw).numpy()
    groups = loss.shape[2]
    cache_groups = shape.num_kv_heads if measure == "memory" else groups
    limits = budget.slot_limits(lengths, shape, cache_groups)
    budget_spans = {n: rule_spans(rules, [n], **kw).numpy()[:, 0] for n in limits}
    floor = {n: min_density * n * shape.num_layers * groups for n in lengths} if min_density else {}
    prob = Problem(
        shape, granularity, sink, span_multiple, min_span, rules, lengths, loss, spans, budget_spans,
        limits, floor, max_rules_per_layer, measure, budget, min_density,
    )
    prob.candidates = _candidates(prob, prune and not floor)
    return prob


def _candidates(prob: Problem, prune: bool) -> list[list[np.ndarray]]:
    """Per (layer, group) the rule indices not dominated by another rule.

    Rule r' dominates r when its span is <= at every profiled and budget length and its loss
    is <= at every profiled length (spans differ, so one is strictly smaller somewhere):
    swapping r for r' never breaks a budget nor raises an objective. With a distinct-rules
    limit, r' must dominate r for every group of the layer (swap all of them at once).
    Not valid with a lower bound (smaller spans may break it), so then nothing is pruned.
    """
    L, G, R = prob.shape
    allr = np.arange(R)
    if not prune:
        return [[allr] * G for _ in range(L)]
    sp = np.concatenate([prob.spans, np.stack([prob.budget_spans[n] for n in sorted(prob.budget_spans)], 1)], 1)
    span_le = (sp[:, None, :] <= sp[None, :, :]).all(-1)  # [r', r]
    np.fill_diagonal(span_le, False)
    # identical span vectors: keep the lower index only
    same = (sp[:, None, :] == sp[None, :, :]).all(-1)
    tie_break = np.tril(same, -1).T  # r' < r with equal spans
    span_le &= ~same | tie_break
    out = []
    for l in range(L):
        lo = prob.loss[:, l]  # [n, G, R]
        loss_le = (lo[:, :, :, None] <= lo[:, :, None, :]).all(0)  # [G, r', r]
        dom = loss_le & span_le[None]
        if prob.max_rules_per_layer is not None and prob.max_rules_per_layer < G:
            keep_layer = ~dom.all(0).any(0)
            out.append([allr[keep_layer]] * G)
        else:
            keep = ~dom.any(1)  # [G, R]
            out.append([allr[keep[g]] for g in range(G)])
    return out


# ---------------------------------------------------------------------------- solving


@dataclass
class Solution:
    """One solve: the rule index per group, the objective per length, solver facts."""

    choice: np.ndarray  # int64 [L, G]
    objectives: np.ndarray  # float64 [n], raw loss units
    status: str  # "optimal", "gap" (stopped within the relative gap), "time_limit"
    gap: float | None  # relative gap of the solver's own objective, None when unknown
    seconds: float
    solver: str
    primary: int | None = None  # the length whose loss was minimized
    level: float | None = None  # epsilon level (fraction from ideal to nadir), None for an anchor


def _solver_name(solver: str) -> str:
    if solver not in ("auto", "cbc", "highs"):
        raise ValueError(f"solver must be 'auto', 'cbc' or 'highs', got {solver!r}")
    if solver == "auto":
        return "highs" if pulp.HiGHS().available() else "cbc"
    if solver == "highs" and not pulp.HiGHS().available():
        raise ValueError("solver 'highs' needs the optional package highspy (pip install highspy)")
    return solver


class _Model:
    """The PuLP model of a problem, built once and re-solved with new objectives/epsilons."""

    def __init__(self, prob: Problem) -> None:
        self.prob = prob
        L, G, R = prob.shape
        n = len(prob.lengths)
        self.lp = pulp.LpProblem("moa_flex", pulp.LpMinimize)
        self.x: list[list[dict[int, pulp.LpVariable]]] = []
        for l in range(L):
            row = []
            for g in range(G):
                row.append({int(r): pulp.LpVariable(f"x_{l}_{g}_{r}", cat=pulp.LpBinary) for r in prob.candidates[l][g]})
            self.x.append(row)
        for l in range(L):
            for g in range(G):
                self.lp += pulp.LpAffineExpression([(v, 1) for v in self.x[l][g].values()]) == 1, f"one_{l}_{g}"
        # normalized objectives: f_i in [0, 1] (0 = every group loses nothing)
        self.scale = prob.scale
        self.obj = []
        for i in range(n):
            terms = [
                (v, float(prob.loss[i, l, g, r] / self.scale[i]))
                for l in range(L) for g in range(G) for r, v in self.x[l][g].items()
                if prob.loss[i, l, g, r] != 0
            ]
            self.obj.append(pulp.LpAffineExpression(terms))
        # budgets, in units of slots / length (densities times cache groups)
        k = prob.group_size
        self.cap: dict[tuple[int, int, int], pulp.LpVariable] = {}
        self.y: dict[tuple[int, int], pulp.LpVariable] = {}
        for b, (N, limit) in enumerate(sorted(prob.limits.items())):
            s = prob.budget_spans[N] / N
            if k == 1:
                expr = pulp.LpAffineExpression([
                    (v, float(s[r])) for l in range(L) for g in range(G) for r, v in self.x[l][g].items()
                ])
            else:
                cap = []
                for l in range(L):
                    for c in range(G // k):
                        u = pulp.LpVariable(f"c_{b}_{l}_{c}", lowBound=0, upBound=1)
                        cap.append(u)
                        self.cap[b, l, c] = u
                        for g in range(c * k, (c + 1) * k):
                            terms = [(v, float(s[r])) for r, v in self.x[l][g].items()] + [(u, -1)]
                            self.lp += pulp.LpAffineExpression(terms) <= 0, f"cap_{b}_{l}_{g}"
                expr = pulp.LpAffineExpression([(u, 1) for u in cap])
            self.lp += expr <= limit / N, f"budget_{N}"
        for i, N in enumerate(prob.lengths):
            if N in prob.floor:
                s = prob.spans[:, i] / N
                expr = pulp.LpAffineExpression([
                    (v, float(s[r])) for l in range(L) for g in range(G) for r, v in self.x[l][g].items()
                ])
                self.lp += expr >= prob.floor[N] / N, f"floor_{N}"
        K = prob.max_rules_per_layer
        if K is not None and K < G:
            for l in range(L):
                used = sorted({r for g in range(G) for r in self.x[l][g]})
                if len(used) <= K:
                    continue
                y = {r: pulp.LpVariable(f"y_{l}_{r}", cat=pulp.LpBinary) for r in used}
                self.y.update({(l, r): v for r, v in y.items()})
                for g in range(G):
                    for r, v in self.x[l][g].items():
                        self.lp += v - y[r] <= 0, f"link_{l}_{g}_{r}"
                self.lp += pulp.LpAffineExpression([(v, 1) for v in y.values()]) <= K, f"distinct_{l}"
        self.lp.setObjective(self.obj[0])

    def set_start(self, choice: np.ndarray) -> None:
        """Give every variable the value of an assignment [L, G] (the solver's warm start)."""
        for l, row in enumerate(self.x):
            for g, xs in enumerate(row):
                for r, v in xs.items():
                    v.setInitialValue(1 if r == choice[l, g] else 0)
        for (l, r), v in self.y.items():
            v.setInitialValue(1 if (choice[l] == r).any() else 0)
        k, lengths = self.prob.group_size, sorted(self.prob.limits)
        for (b, l, c), v in self.cap.items():
            N = lengths[b]
            v.setInitialValue(float(self.prob.budget_spans[N][choice[l, c * k:(c + 1) * k]].max() / N))

    def choice(self) -> np.ndarray:
        L, G, _ = self.prob.shape
        out = np.zeros((L, G), dtype=np.int64)
        for l in range(L):
            for g in range(G):
                vals = [(v.varValue or 0.0, r) for r, v in self.x[l][g].items()]
                out[l, g] = max(vals)[1]
        return out

    def solve(
        self,
        primary: int,
        eps: Mapping[int, float] | None,
        *,
        rho: float,
        solver: str,
        time_limit: float,
        gap_rel: float,
        threads: int,
        warm: bool,
    ) -> Solution | None:
        """Minimize f_primary + rho * sum of the other f, s.t. f_j <= eps[j]; None if infeasible."""
        n = len(self.prob.lengths)
        for name in [c for c in self.lp.constraints if c.startswith("eps_")]:
            del self.lp.constraints[name]
        for j, bound in sorted((eps or {}).items()):
            self.lp += self.obj[j] <= bound, f"eps_{j}"
        objective = self.obj[primary].copy()
        if rho:
            for j in range(n):
                if j != primary:
                    objective += rho * self.obj[j]
        self.lp.setObjective(objective)
        t0 = time.perf_counter()
        status, gap, name = _run(self.lp, solver, time_limit, gap_rel, threads, warm)
        seconds = time.perf_counter() - t0
        if status == "infeasible":
            return None
        choice = self.choice()
        return Solution(choice, self.prob.objectives(choice), status, gap, seconds, name, self.prob.lengths[primary])


class _Solver:
    """Solves a problem's MILPs: the layer decomposition first (:mod:`moa_flex.lagrangian`),
    which returns when its certified gap meets ``gap_rel``; else the PuLP model (built on
    first need), warm-started with the decomposition's plan, and the better bound of the two."""

    def __init__(self, prob: Problem, decompose: bool = True) -> None:
        self.prob = prob
        self.dec = lagrangian.Decomposition(prob) if decompose and lagrangian.supports(prob) else None
        self._model: _Model | None = None
        self.build_s = 0.0

    @property
    def model(self) -> _Model:
        if self._model is None:
            t0 = time.perf_counter()
            self._model = _Model(self.prob)
            self.build_s = time.perf_counter() - t0
        return self._model

    def solve(
        self,
        primary: int,
        eps: Mapping[int, float] | None,
        *,
        rho: float,
        solver: str,
        time_limit: float,
        gap_rel: float,
        threads: int,
        warm: bool,
    ) -> Solution | None:
        """As :meth:`_Model.solve` (normalized ``eps`` by length index); None if infeasible."""
        prob, n = self.prob, len(self.prob.lengths)
        weights = np.full(n, float(rho))
        weights[primary] = 1.0
        t0 = time.perf_counter()
        res = None
        if self.dec is not None:
            try:
                res = self.dec.solve(weights, eps, time_limit=time_limit, gap_rel=gap_rel)
            except RuntimeError:  # HiGHS failed on a master problem: the MILP alone decides
                res = lagrangian.Result(None, float("inf"), -float("inf"), 0, 0, 0.0)
            if res.infeasible:
                return None
            if res.choice is not None and res.gap <= gap_rel + 1e-12:
                status = "optimal" if res.gap <= 1e-9 else "gap"
                return Solution(
                    res.choice, prob.objectives(res.choice), status, res.gap, time.perf_counter() - t0,
                    lagrangian.SOLVER_NAME, prob.lengths[primary],
                )
        model = self.model
        start = res is not None and res.choice is not None
        if start:
            model.set_start(res.choice)
        left = max(time_limit - (time.perf_counter() - t0), 1.0)
        sol = model.solve(
            primary, eps, rho=rho, solver=solver, time_limit=left, gap_rel=gap_rel, threads=threads,
            warm=warm or start,
        )
        if sol is None:
            return None
        sol.seconds = time.perf_counter() - t0
        if start:
            sol = self._combine(sol, res, weights)
        return sol

    def _combine(self, sol: Solution, res: "lagrangian.Result", weights: np.ndarray) -> Solution:
        """The better plan of the MILP and the decomposition, with the better lower bound."""
        scale = self.prob.scale
        ub = float(weights @ (sol.objectives / scale))
        lower = res.lower if sol.gap is None else max(res.lower, ub - sol.gap * abs(ub))
        if res.upper < ub:
            sol.choice, sol.objectives, ub = res.choice, self.prob.objectives(res.choice), res.upper
        gap = 0.0 if ub <= 0 else max(ub - max(lower, 0.0), 0.0) / ub
        sol.gap = gap
        if gap <= 1e-9:
            sol.status = "optimal"
        elif sol.status == "optimal":
            sol.status = "gap"
        sol.solver = f"{sol.solver} (started from the {lagrangian.SOLVER_NAME})"
        return sol


# CBC's feasibility pump dominates the run time on these models (about half, measured on the
# 8B per-head shape) while diving heuristics find equally good solutions: turn it off.
# CBC 2.10.3's preprocessing (Cgl) cuts off the optimum of some small models and still reports
# "Optimal" (test_cbc_preprocessing_keeps_the_optimum); off, at no measured cost on the 8B shapes.
CBC_OPTIONS = ("feas off", "preprocess off")
_CBC_RESULT = re.compile(r"Result - (.*)")
_CBC_OBJ = re.compile(r"Objective value:\s*(\S+)")
_CBC_INT_GAP = re.compile(r"Exiting as integer gap of (\S+)")
_CBC_PARTIAL = re.compile(r"Partial search - best objective (\S+) \(best possible (\S+)\)")


def _run(
    lp: pulp.LpProblem, solver: str, time_limit: float, gap_rel: float, threads: int, warm: bool
) -> tuple[str, float | None, str]:
    """Solve; return (status, relative gap or None, solver description)."""
    if solver == "highs":
        s = pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=threads, warmStart=warm)
        lp.solve(s)
        h = lp.solverModel
        ms = h.getModelStatus()
        text = h.modelStatusToString(ms).lower()
        if "infeasible" in text:
            return "infeasible", None, "HiGHS"
        if lp.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            raise RuntimeError(f"HiGHS stopped without a solution: {text}")
        info = h.getInfo()
        gap = float(info.mip_gap) if math.isfinite(info.mip_gap) else None
        status = "time_limit" if "time" in text else ("optimal" if (gap or 0) <= 1e-9 else "gap")
        return status, gap, f"HiGHS {h.version() if hasattr(h, 'version') else ''}".strip()
    fd, log_path = tempfile.mkstemp(suffix=".log", prefix="moa_flex_cbc_")
    os.close(fd)
    try:
        s = pulp.PULP_CBC_CMD(
            msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=threads, warmStart=warm, logPath=log_path,
            options=list(CBC_OPTIONS),
        )
        lp.solve(s)
        with open(log_path, encoding="utf-8", errors="replace") as f:
            log = f.read()
    finally:
        os.unlink(log_path)
    result = _CBC_RESULT.search(log)
    text = result.group(1).strip().lower() if result else ""
    if "infeasible" in text or lp.status == pulp.LpStatusInfeasible:
        return "infeasible", None, "CBC"
    if lp.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise RuntimeError(f"CBC stopped without a solution: {text or pulp.LpStatus[lp.status]}")
    # CBC's closing "Lower bound:"/"Gap:" lines have too few digits: read its search messages
    m_obj, m_int, m_part = _CBC_OBJ.search(log), _CBC_INT_GAP.search(log), _CBC_PARTIAL.search(log)
    obj = float(m_obj.group(1)) if m_obj else None
    if m_part:
        obj, bound = float(m_part.group(1)), float(m_part.group(2))
        gap = max(obj - bound, 0.0) / max(abs(obj), 1e-12)
    elif m_int and obj is not None:
        gap = float(m_int.group(1)) / max(abs(obj), 1e-12)
    elif "optimal" in text:
        gap = 0.0
    else:
        gap = None
    status = "time_limit" if "time" in text else ("optimal" if gap == 0.0 else "gap")
    version = re.search(r"Version:\s*(\S+)", log)
    return status, gap, f"CBC {version.group(1)}" if version else "CBC"


def solve(
    prob: Problem,
    primary: int,
    eps: Mapping[int, float] | None = None,
    *,
    rho: float = 0.0,
    solver: str = "auto",
    time_limit: float = 60.0,
    gap_rel: float = 1e-3,
    threads: int = 1,
    decompose: bool = True,
) -> Solution:
    """One MILP: minimize the loss at profiled length ``primary`` (tokens).

    ``eps``: {length: max loss at that length (raw units)}; ``rho`` > 0 adds rho times the
    other lengths' normalized losses (then the optimum is Pareto-optimal, not only weakly).
    ``decompose``: try the layer decomposition first (:mod:`moa_flex.lagrangian`; used when
    it supports the problem): its plan is returned when its certified gap is <= ``gap_rel``,
    else it warm-starts ``solver``. ``gap`` is always certified by a valid lower bound.
    Raises ValueError naming the smallest feasible budget when the budget cannot be met.
    """
    model = _Solver(prob, decompose)
    scale = prob.scale
    index = {n: i for i, n in enumerate(prob.lengths)}
    if primary not in index:
        raise ValueError(f"primary must be a profiled length {list(prob.lengths)}, got {primary!r}")
    bounds = {}
    for n, v in (eps or {}).items():
        if n not in index:
            raise ValueError(f"eps keys must be profiled lengths {list(prob.lengths)}, got {n!r}")
        bounds[index[n]] = float(v) / scale[index[n]]
    name = _solver_name(solver)
    sol = model.solve(
        index[primary], bounds, rho=rho, solver=name, time_limit=time_limit, gap_rel=gap_rel,
        threads=threads, warm=False,
    )
    if sol is None:
        if eps:
            raise ValueError(f"no assignment meets the budget and the loss bounds eps={dict(eps)}")
        raise _infeasible(prob, name, time_limit, threads)
    return sol


def pareto(
    prob: Problem,
    *,
    levels: Sequence[float] = (0.25, 0.5, 0.75),
    rho: float = 1e-4,
    solver: str = "auto",
    time_limit: float = 60.0,
    gap_rel: float = 1e-3,
    threads: int = 1,
    progress: bool = True,
    decompose: bool = True,
) -> list[Solution]:
    """The Pareto set over the per-length losses, by augmented epsilon-constraints.

    First one anchor per profiled length (its loss minimized, the others weighted by ``rho``);
    the anchors give each loss its ideal (best) and nadir (worst among anchors) value. Then for
    every length as primary objective and every ``t`` in ``levels``, the other losses are
    bounded by ``ideal + t * (nadir - ideal)``. Infeasible points are skipped, duplicate and
    dominated solutions dropped; the result is sorted by the losses (shortest length first).
    With a single length the set is its one optimum. ``time_limit`` (seconds) and ``gap_rel``
    apply to every solve; with ``threads=1`` and no solve stopped by time, the result is
    deterministic. ``decompose``: as in :func:`solve` (the decomposition's columns are kept
    from solve to solve).
    """
    from tqdm.auto import tqdm

    for t in levels:
        if not (isinstance(t, (int, float)) and 0 <= t <= 1):
            raise ValueError(f"levels must be numbers in [0, 1], got {t!r}")
    if not (isinstance(rho, (int, float)) and 0 <= rho < 1):
        raise ValueError(f"rho must be in [0, 1), got {rho!r}")
    name = _solver_name(solver)
    n = len(prob.lengths)
    model = _Solver(prob, decompose)
    scale = prob.scale
    total = n + (n * len(levels) if n > 1 else 0)
    bar = tqdm(total=total, desc="moa-flex optimize", unit="solve", disable=not progress)
    kw = dict(rho=rho if n > 1 else 0.0, solver=name, time_limit=time_limit, gap_rel=gap_rel, threads=threads)
    sols: list[Solution] = []
    try:
        for i in range(n):
            sol = model.solve(i, None, warm=bool(sols), **kw)
            bar.update()
            if sol is None:
                bar.close()
                raise _infeasible(prob, name, time_limit, threads)
            sols.append(sol)
        f = np.array([s.objectives / scale for s in sols])  # [anchor, length], normalized
        ideal, nadir = f.diagonal().copy(), f.max(0)
        for p in range(n if n > 1 else 0):
            for t in levels:
                eps = {j: ideal[j] + t * (nadir[j] - ideal[j]) + 1e-9 for j in range(n) if j != p}
                sol = model.solve(p, eps, warm=True, **kw)
                bar.update()
                if sol is not None:
                    sol.level = float(t)
                    sols.append(sol)
    finally:
        bar.close()
    for s in sols[:n]:
        s.level = None
    for s in sols:
        s.seconds += model.build_s / len(sols)  # share the PuLP model build (if any) among the solves
    return _nondominated(sols, prob.lengths)


def _nondominated(sols: list[Solution], lengths: Sequence[int]) -> list[Solution]:
    """Drop duplicate assignments and solutions dominated by another; sort by losses."""
    unique: dict[bytes, Solution] = {}
    for s in sols:
        unique.setdefault(s.choice.tobytes(), s)
    cand = list(unique.values())
    keep = []
    for s in cand:
        dominated = any(
            (o.objectives <= s.objectives).all() and (o.objectives < s.objectives).any() for o in cand if o is not s
        )
        if not dominated:
            keep.append(s)
    return sorted(keep, key=lambda s: (tuple(s.objectives.tolist()), s.choice.tobytes()))


def smallest_feasible_scale(prob: Problem, solver: str = "auto", time_limit: float = 60.0, threads: int = 1) -> float:
    """The smallest factor t such that every budget limit times t can be met (lower bound and
    distinct-rules limit included): t * density is the smallest feasible density."""
    name = _solver_name(solver)
    model = _Model(prob)
    t = pulp.LpVariable("budget_scale", lowBound=0)
    for N, limit in sorted(prob.limits.items()):
        c = model.lp.constraints[f"budget_{N}"]
        c.addInPlace(-(limit / N) * t)
        c.constant = 0.0
    model.lp.setObjective(pulp.LpAffineExpression([(t, 1)]))
    status, _, _ = _run(model.lp, name, time_limit, 0.0, threads, False)
    if status == "infeasible":
        raise ValueError("no assignment meets the lower bound (min_density) with these rules")
    return float(t.varValue)


def _infeasible(prob: Problem, solver: str, time_limit: float, threads: int) -> ValueError:
    t = smallest_feasible_scale(prob, solver, time_limit, threads)
    b = prob.budget
    up = lambda v: round(v, 6) + (1e-6 if round(v, 6) < v * (1 - 1e-12) else 0)  # noqa: E731  (never below)
    if b.density is not None:
        at = f"at length {b.length}" if b.length is not None else f"at the lengths {list(prob.lengths)}"
        what = f"the smallest feasible density is {up(t * b.density):g} {at}"
    elif b.tokens is not None:
        what = f"the smallest feasible budget is {math.ceil(t * b.tokens * (1 - 1e-12))} tokens at length {b.length}"
    else:
        what = f"the smallest feasible budget is {up(t * b.gb):g} GB for batch {b.batch_size} at length {b.length}"
    extra = []
    if prob.min_density:
        extra.append(f"min_density {prob.min_density}")
    if prob.max_rules_per_layer is not None:
        extra.append(f"at most {prob.max_rules_per_layer} rules per layer")
    cond = f" (with {', '.join(extra)})" if extra else ""
    return ValueError(f"budget {b.to_dict()} cannot be met by these rules: {what}{cond}")


# ---------------------------------------------------------------------------- plans


def to_plan(prob: Problem, sol: Solution, meta: Mapping[str, Any] | None = None) -> Plan:
    """The plan of a solution; its meta records budget, lengths, losses, gap, solver, time."""
    alpha = [[prob.rules[r][0] for r in row] for row in sol.choice.tolist()]
    beta = [[prob.rules[r][1] for r in row] for row in sol.choice.tolist()]
    info = {
        "source": "moa_flex.optimize",
        "budget": prob.budget.to_dict(),
        "measure": prob.measure,
        "min_density": prob.min_density,
        "max_rules_per_layer": prob.max_rules_per_layer,
        "lengths": list(prob.lengths),
        "loss": {str(n): float(v) for n, v in zip(prob.lengths, sol.objectives)},
        "num_rules": len(prob.rules),
        "primary": sol.primary,
        "level": sol.level,
        "status": sol.status,
        "gap": sol.gap,
        "solver": sol.solver,
        "seconds": round(sol.seconds, 3),
        **(meta or {}),
    }
    plan = Plan(
        prob.model, alpha, beta, granularity=prob.granularity, sink=prob.sink,
        span_multiple=prob.span_multiple, min_span=prob.min_span, meta=info,
    )
    plan.meta["kv_density"] = {str(n): plan.kv_density(n) for n in sorted({*prob.lengths, *prob.limits})}
    return plan


def optimize(
    hist: Mapping[int, torch.Tensor],
    model: ModelShape | Any,
    budget: Budget | float,
    *,
    rules: Sequence[Rule] | None = None,
    granularity: str | None = None,
    sink: int = DEFAULT_SINK,
    span_multiple: int = DEFAULT_SPAN_MULTIPLE,
    min_span: int = DEFAULT_MIN_SPAN,
    min_density: float | None = None,
    max_rules_per_layer: int | None = 2,
    measure: str = "memory",
    levels: Sequence[float] = (0.25, 0.5, 0.75),
    solver: str = "auto",
    time_limit: float = 60.0,
    gap_rel: float = 1e-3,
    threads: int = 1,
    progress: bool = True,
    decompose: bool = True,
) -> list[Plan]:
    """The Pareto set of plans for the profiled histograms under a KV budget.

    ``hist``: {N (tokens): [L, H, ceil(N / span_multiple)] float}, the profiler's output;
    ``model``: a :class:`ModelShape` or transformers config; ``budget``: a :class:`Budget`
    or a density (KV slots relative to dense, at every profiled length). Each plan's meta
    holds its loss per length, the budget, gap, solver and time; ``meta["pareto"]`` its index
    in the set. Raises ValueError naming the smallest feasible budget when it cannot be met.
    """
    prob = build_problem(
        hist, model, budget, rules=rules, granularity=granularity, sink=sink,
        span_multiple=span_multiple, min_span=min_span, min_density=min_density,
        max_rules_per_layer=max_rules_per_layer, measure=measure,
    )
    sols = pareto(
        prob, levels=levels, solver=solver, time_limit=time_limit, gap_rel=gap_rel,
        threads=threads, progress=progress, decompose=decompose,
    )
    return [to_plan(prob, s, {"pareto": {"index": i, "size": len(sols)}}) for i, s in enumerate(sols)]
