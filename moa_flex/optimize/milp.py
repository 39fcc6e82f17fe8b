"""The optimizer's MILP in PuLP (CBC bundled, HiGHS when installed), built once and re-solved.

:class:`Model` holds the program of a :class:`~moa_flex.optimize.problem.Problem` with
normalized objectives (every loss divided by :attr:`Problem.scale`), so Pareto points are
solved by changing only the objective and the epsilon rows. :func:`run` solves it and reads
the relative gap back from CBC's log (its closing summary has too few digits).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from typing import Mapping

import numpy as np
import pulp

from .problem import Problem, Solution


def solver_name(solver: str) -> str:
    if solver not in ("auto", "cbc", "highs"):
        raise ValueError(f"solver must be 'auto', 'cbc' or 'highs', got {solver!r}")
    if solver == "auto":
        return "highs" if pulp.HiGHS().available() else "cbc"
    if solver == "highs" and not pulp.HiGHS().available():
        raise ValueError("solver 'highs' needs the optional package highspy (pip install highspy)")
    return solver


class Model:
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
        status, gap, name = run(self.lp, solver, time_limit, gap_rel, threads, warm)
        seconds = time.perf_counter() - t0
        if status == "infeasible":
            return None
        choice = self.choice()
        return Solution(choice, self.prob.objectives(choice), status, gap, seconds, name, self.prob.lengths[primary])


# CBC's feasibility pump dominates the run time on these models (about half, measured on the
# 8B per-head shape) while diving heuristics find equally good solutions: turn it off.
# CBC 2.10.3's preprocessing (Cgl) cuts off the optimum of some small models and still reports
# "Optimal" (test_cbc_preprocessing_keeps_the_optimum); off, at no measured cost on the 8B shapes.
CBC_OPTIONS = ("feas off", "preprocess off")
_CBC_RESULT = re.compile(r"Result - (.*)")
_CBC_OBJ = re.compile(r"Objective value:\s*(\S+)")
_CBC_INT_GAP = re.compile(r"Exiting as integer gap of (\S+)")
_CBC_PARTIAL = re.compile(r"Partial search - best objective (\S+) \(best possible (\S+)\)")


def run(
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
