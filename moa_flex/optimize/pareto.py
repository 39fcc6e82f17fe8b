"""The Pareto set of plans over the per-length losses, by augmented epsilon-constraints."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .milp import solver_name
from .problem import Problem, Solution
from .solve import Solver, infeasible_error


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
    name = solver_name(solver)
    n = len(prob.lengths)
    model = Solver(prob, decompose)
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
                raise infeasible_error(prob, name, time_limit, threads)
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
