"""Solving the optimizer's program: the layer decomposition first, the MILP where it must.

The layer decomposition of :mod:`moa_flex.optimize.decomposition` runs first where it has an
exact layer oracle (``K <= 2`` distinct rules per layer, or no limit with one group per
cache); it returns its plan when its certified gap is within ``gap_rel`` (seconds at the 70B
per-head shape), else its plan warm-starts the PuLP model (:mod:`moa_flex.optimize.milp`),
and the reported gap uses the better of the two lower bounds. ``decompose=False`` skips it.
"""

from __future__ import annotations

import math
import time
from typing import Mapping

import numpy as np
import pulp

from . import decomposition
from .milp import Model, run, solver_name
from .problem import Problem, Solution


class Solver:
    """Solves a problem's MILPs: the layer decomposition first (:mod:`moa_flex.optimize.decomposition`),
    which returns when its certified gap meets ``gap_rel``; else the PuLP model (built on
    first need), warm-started with the decomposition's plan, and the better bound of the two."""

    def __init__(self, prob: Problem, decompose: bool = True) -> None:
        self.prob = prob
        self.dec = decomposition.Decomposition(prob) if decompose and decomposition.supports(prob) else None
        self._model: Model | None = None
        self.build_s = 0.0

    @property
    def model(self) -> Model:
        if self._model is None:
            t0 = time.perf_counter()
            self._model = Model(self.prob)
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
        """As :meth:`Model.solve` (normalized ``eps`` by length index); None if infeasible."""
        prob, n = self.prob, len(self.prob.lengths)
        weights = np.full(n, float(rho))
        weights[primary] = 1.0
        t0 = time.perf_counter()
        res = None
        if self.dec is not None:
            try:
                res = self.dec.solve(weights, eps, time_limit=time_limit, gap_rel=gap_rel)
            except RuntimeError:  # HiGHS failed on a master problem: the MILP alone decides
                res = decomposition.Result(None, float("inf"), -float("inf"), 0, 0, 0.0)
            if res.infeasible:
                return None
            if res.choice is not None and res.gap <= gap_rel + 1e-12:
                status = "optimal" if res.gap <= 1e-9 else "gap"
                return Solution(
                    res.choice, prob.objectives(res.choice), status, res.gap, time.perf_counter() - t0,
                    decomposition.SOLVER_NAME, prob.lengths[primary],
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

    def _combine(self, sol: Solution, res: "decomposition.Result", weights: np.ndarray) -> Solution:
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
        sol.solver = f"{sol.solver} (started from the {decomposition.SOLVER_NAME})"
        return sol


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
    ``decompose``: try the layer decomposition first (:mod:`moa_flex.optimize.decomposition`; used when
    it supports the problem): its plan is returned when its certified gap is <= ``gap_rel``,
    else it warm-starts ``solver``. ``gap`` is always certified by a valid lower bound.
    Raises ValueError naming the smallest feasible budget when the budget cannot be met.
    """
    model = Solver(prob, decompose)
    scale = prob.scale
    index = {n: i for i, n in enumerate(prob.lengths)}
    if primary not in index:
        raise ValueError(f"primary must be a profiled length {list(prob.lengths)}, got {primary!r}")
    bounds = {}
    for n, v in (eps or {}).items():
        if n not in index:
            raise ValueError(f"eps keys must be profiled lengths {list(prob.lengths)}, got {n!r}")
        bounds[index[n]] = float(v) / scale[index[n]]
    name = solver_name(solver)
    sol = model.solve(
        index[primary], bounds, rho=rho, solver=name, time_limit=time_limit, gap_rel=gap_rel,
        threads=threads, warm=False,
    )
    if sol is None:
        if eps:
            raise ValueError(f"no assignment meets the budget and the loss bounds eps={dict(eps)}")
        raise infeasible_error(prob, name, time_limit, threads)
    return sol


def smallest_feasible_scale(prob: Problem, solver: str = "auto", time_limit: float = 60.0, threads: int = 1) -> float:
    """The smallest factor t such that every budget limit times t can be met (lower bound and
    distinct-rules limit included): t * density is the smallest feasible density."""
    name = solver_name(solver)
    model = Model(prob)
    t = pulp.LpVariable("budget_scale", lowBound=0)
    for N, limit in sorted(prob.limits.items()):
        c = model.lp.constraints[f"budget_{N}"]
        c.addInPlace(-(limit / N) * t)
        c.constant = 0.0
    model.lp.setObjective(pulp.LpAffineExpression([(t, 1)]))
    status, _, _ = run(model.lp, name, time_limit, 0.0, threads, False)
    if status == "infeasible":
        raise ValueError("no assignment meets the lower bound (min_density) with these rules")
    return float(t.varValue)


def infeasible_error(prob: Problem, solver: str, time_limit: float, threads: int) -> ValueError:
    t = smallest_feasible_scale(prob, solver, time_limit, threads)
    b = prob.budget
    up = lambda v: round(v, 6) + (1e-6 if round(v, 6) < v * (1 - 1e-12) else 0)  # noqa: E731  (never below)
    if b.density is not None:
        at = f"at length {b.length}" if b.length is not None else f"at the lengths {list(prob.lengths)}"
        what = f"the smallest feasible density is {up(t * b.density):g} {at}"
    elif b.tokens is not None:
        what = f"the smallest feasible budget is {math.ceil(t * b.tokens * (1 - 1e-12))} tokens at length {b.length}"
    else:
        cache = f" with kv_dtype {b.to_dict()['kv_dtype']}" if b.kv_dtype is not None else ""
        what = f"the smallest feasible budget is {up(t * b.gb):g} GB for batch {b.batch_size} at length {b.length}{cache}"
    extra = []
    if prob.min_density:
        extra.append(f"min_density {prob.min_density}")
    if prob.max_rules_per_layer is not None:
        extra.append(f"at most {prob.max_rules_per_layer} rules per layer")
    cond = f" (with {', '.join(extra)})" if extra else ""
    return ValueError(f"budget {b.to_dict()} cannot be met by these rules: {what}{cond}")
