"""``optimize()``: the optimizer stage in one call, from histograms to the Pareto set of plans."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from moa_flex.plan import DEFAULT_MIN_SPAN, DEFAULT_SINK, DEFAULT_SPAN_MULTIPLE, ModelShape, Plan

from .budget import Budget
from .pareto import pareto
from .problem import Problem, Solution, build_problem
from .rules import Rule


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
