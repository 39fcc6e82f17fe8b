"""The optimizer's problem: every rule's loss and span per group, the budget rows, pruning.

The program (docs/DESIGN.md, "Optimizing"), for groups ``g`` (KV heads or query heads of
every layer) and rules ``r``:

- binary ``x[g, r]``, ``sum_r x[g, r] = 1``;
- a KV budget at every budget length (every profiled length for a density);
- optionally a lower bound (``min_density``) at every profiled length;
- optionally at most ``K`` distinct rules per layer (binary ``y[l, r] >= x[l, g, r]``);
- one objective per profiled length (the summed loss at that length), combined into a Pareto
  set by augmented epsilon-constraints (:mod:`moa_flex.optimize.pareto`).

The KV budget measures what :meth:`Plan.kv_density` reports (``measure="memory"``, the
default): the cache slots of every KV head, i.e. the group's span for granularity
``kv_head`` and the largest span of the KV head's query heads for granularity ``head``
(modelled by one continuous variable per KV head and budget length, bounded below by each
of its query heads' spans). ``measure="span"`` budgets the mean query-head span instead
(attention compute, MoA's own budget); the plan's ``kv_density`` may then exceed it under
GQA. The lower bound is always on the mean head span, which never exceeds ``kv_density``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from moa_flex.plan import DEFAULT_MIN_SPAN, DEFAULT_SINK, DEFAULT_SPAN_MULTIPLE, GRANULARITIES, ModelShape

from .budget import Budget
from .rules import Rule, check_lengths, check_rules, rule_grid, rule_losses, rule_spans

MEASURES = ("memory", "span")


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
    lengths = check_lengths(hist.keys(), "hist lengths")
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
    rules = check_rules(rule_grid(lengths, sink=sink, span_multiple=span_multiple, min_span=min_span) if rules is None else rules)
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
