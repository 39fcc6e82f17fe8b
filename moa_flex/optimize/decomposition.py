"""Layer decomposition of the MoA MILP: a certified lower bound and a near-optimal plan, fast.

The optimizer's MILP (:mod:`moa_flex.optimize.problem`) couples the layers only through a few rows:
the KV budget at every budget length, the loss bounds ``eps`` of Pareto points and the lower
bound ``min_density``. With multipliers ``pi >= 0`` on those rows (the Lagrangian relaxation)
the problem separates by layer, and each layer's subproblem -- one rule per group, at most
``K`` distinct rules in the layer, per-KV-head cache caps for per-head plans -- is solved
exactly here by enumeration (:meth:`Decomposition.oracle`):

- no distinct-rules limit and one group per cache (``group_size`` 1): every group alone;
- ``K <= 2`` (MoA's setting): every rule pair ``{a, b}`` (``a == b`` for ``K = 1``); per KV
  head the cheapest of "all heads a", "all heads b" and "each head its better of a, b,
  cache = the larger span" (exact, as a KV head's cache is the max of its heads' spans).

Other cases (``3 <= K <`` groups, or per-head caps without a limit) have no exact oracle:
:func:`supports` says no and the optimizer solves the plain MILP.

Dantzig-Wolfe column generation finds the best multipliers: a master LP over the layer
assignments found so far (scipy's HiGHS) prices the coupling rows, the oracle adds every
layer's best assignment at those prices. At any ``pi >= 0`` the Lagrangian value
``sum_l min_layer(cost + pi . rows) - pi . rhs`` is a valid lower bound on the MILP optimum
(weak duality), computed exactly by the oracle: the reported gap is certified. The integer
master (one generated assignment per layer, scipy's ``milp``) gives the plan. All
objectives here are the optimizer's normalized ones (``Problem.scale``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np
import scipy
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import csr_matrix, hstack, identity

if TYPE_CHECKING:  # pragma: no cover
    from .problem import Problem

PENALTY = 1e4  # cost of one unit of violation of a coupling row in the master LP (keeps it feasible)


def supports(prob: "Problem") -> bool:
    """Whether the layer subproblem of ``prob`` has an exact oracle here (module doc)."""
    return _mode(prob) is not None


def _mode(prob: "Problem") -> str | None:
    """'free' (groups independent), 'pairs' (enumerate rule pairs) or None (no exact oracle)."""
    _, G, _ = prob.shape
    K = G if prob.max_rules_per_layer is None else min(prob.max_rules_per_layer, G)
    if prob.group_size == 1 and K == G:
        return "free"
    if K <= 2:
        return "pairs"
    return None


@dataclass
class Result:
    """One decomposition solve: the best plan found (None if none) and a certified bound.

    ``upper``: normalized objective of ``choice`` (inf without one); ``lower``: a valid lower
    bound on the MILP optimum (normalized); ``iterations``: column-generation rounds;
    ``infeasible``: certified (the bound exceeds every assignment's objective, as each
    normalized loss is <= 1).
    """

    choice: np.ndarray | None
    upper: float
    lower: float
    iterations: int
    columns: int
    seconds: float
    infeasible: bool = False

    @property
    def gap(self) -> float:
        """Relative gap (upper - lower) / upper; inf without a plan (objectives are >= 0)."""
        if self.choice is None:
            return float("inf")
        if self.upper <= 0:
            return 0.0
        return max(self.upper - max(self.lower, 0.0), 0.0) / self.upper


class Decomposition:
    """The per-layer decomposition of one :class:`Problem`, with a pool of layer assignments
    (columns) kept across solves (the Pareto set re-solves with new objectives and bounds)."""

    def __init__(self, prob: "Problem") -> None:
        mode = _mode(prob)
        if mode is None:
            raise ValueError("max_rules_per_layer: no exact layer oracle for this problem (see supports())")
        self.prob, self.mode = prob, mode
        L, G, R = prob.shape
        self.k = prob.group_size
        self.loss = np.ascontiguousarray(prob.loss.transpose(1, 2, 3, 0))  # [L, G, R, n] raw
        self.scale = prob.scale
        self.budget_lengths = sorted(prob.limits)
        self.bspan = np.stack([prob.budget_spans[N] / N for N in self.budget_lengths], 1)  # [R, nb]
        self.floor_idx = [i for i, N in enumerate(prob.lengths) if N in prob.floor]
        self.hspan = prob.spans / np.asarray(prob.lengths, dtype=np.float64)  # [R, n]
        block = np.full((L, G, R), np.inf)
        for l in range(L):
            for g in range(G):
                block[l, g, prob.candidates[l][g]] = 0.0
        self.block = block
        self.pool: list[np.ndarray] = []  # assignments [G] per column
        self.pool_layer: list[int] = []
        self.pool_stats: list[np.ndarray] = []  # per column [n losses raw, nb slots/N, n head spans/N]
        self.seen: set[bytes] = set()

    # ------------------------------------------------------------------ columns

    def stats(self, choice: np.ndarray) -> np.ndarray:
        """Float64 [L, 2n + nb]: per layer of an assignment [L, G] its losses (raw, per
        profiled length), KV slots / N (per budget length) and summed group spans / N."""
        L, G, _ = self.prob.shape
        f = np.take_along_axis(self.loss, choice[:, :, None, None], axis=2)[:, :, 0].sum(1)  # [L, n]
        bs = self.bspan[choice]  # [L, G, nb]
        if self.k > 1:
            bs = bs.reshape(L, G // self.k, self.k, -1).max(2)
        return np.concatenate([f, bs.sum(1), self.hspan[choice].sum(1)], 1)

    def _add(self, choice: np.ndarray, layers: np.ndarray) -> int:
        """Add the given layers' rows of an assignment [L, G] to the pool; number added."""
        st = self.stats(choice)
        added = 0
        for l in layers.tolist():
            key = l.to_bytes(4, "little") + choice[l].tobytes()
            if key not in self.seen:
                self.seen.add(key)
                self.pool.append(choice[l].copy())
                self.pool_layer.append(l)
                self.pool_stats.append(st[l])
                added += 1
        return added

    # ------------------------------------------------------------------ oracle

    def oracle(self, w_loss: np.ndarray, w_span: np.ndarray, w_budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact layer subproblems: (value [L], assignment [L, G]) minimizing per layer

        ``sum_g loss[l, g, r_g] . w_loss - sum_g hspan[r_g] . w_span + slots(l) . w_budget``

        over assignments with at most K distinct rules (``w_*`` >= 0 except ``w_loss``, which
        holds the objective weights plus the eps multipliers; units as :meth:`stats`)."""
        L, G, R = self.prob.shape
        W = self.loss @ w_loss - self.hspan @ w_span + self.block  # [L, G, R]
        cap = self.bspan @ w_budget  # [R]
        if self.k == 1:
            W = W + cap
        if self.mode == "free":
            choice = W.argmin(-1)
            return np.take_along_axis(W, choice[..., None], -1)[..., 0].sum(1), choice
        if self.prob.max_rules_per_layer == 1:
            a_idx = b_idx = np.arange(R)
        else:
            a_idx, b_idx = np.triu_indices(R)
        Wa, Wb = W[:, :, a_idx], W[:, :, b_idx]  # [L, G, P]
        mix = np.minimum(Wa, Wb)
        if self.k == 1:
            cost = mix.sum(1)  # [L, P]
        else:
            C, k = G // self.k, self.k
            capmax = np.maximum(self.bspan[a_idx], self.bspan[b_idx]) @ w_budget  # [P]
            opts = np.stack([
                Wa.reshape(L, C, k, -1).sum(2) + cap[a_idx],
                Wb.reshape(L, C, k, -1).sum(2) + cap[b_idx],
                mix.reshape(L, C, k, -1).sum(2) + capmax,
            ])  # [3, L, C, P]
            best = opts.argmin(0)  # [L, C, P]
            cost = np.take_along_axis(opts, best[None], 0)[0].sum(1)  # [L, P]
        p = cost.argmin(1)  # [L]
        value = cost[np.arange(L), p]
        a, b = a_idx[p], b_idx[p]  # [L]
        la = np.take_along_axis(W, a[:, None, None], 2)[..., 0]  # [L, G]
        lb = np.take_along_axis(W, b[:, None, None], 2)[..., 0]
        choice = np.where(la <= lb, a[:, None], b[:, None])
        if self.k > 1:
            opt = np.repeat(best[np.arange(L), :, p], self.k, axis=1)  # [L, G]
            choice = np.where(opt == 0, a[:, None], np.where(opt == 1, b[:, None], choice))
        return value, choice

    # ------------------------------------------------------------------ solve

    def solve(
        self,
        weights: np.ndarray,
        eps: Mapping[int, float] | None,
        *,
        time_limit: float,
        gap_rel: float,
        max_rounds: int = 200,
    ) -> Result:
        """Minimize ``sum_i weights[i] * f_i`` (normalized losses) under the budget, the floor
        and ``f_j <= eps[j]`` (normalized, by length index): column generation, then the
        integer master. Deterministic (no randomness, HiGHS single-threaded)."""
        t0 = time.perf_counter()
        prob = self.prob
        n, L = len(prob.lengths), prob.shape[0]
        eps = dict(eps or {})
        rows = self._rows(eps)
        rhs = np.array([r[2] for r in rows])
        if not self.pool:
            # seed: each layer's smallest-KV assignment (loss as a tie-break)
            self._add(self.oracle(weights * 1e-6 / self.scale, np.zeros(n), np.ones(len(self.budget_lengths)))[1], np.arange(L))
        lower, rounds, pi = -np.inf, 0, np.zeros(len(rows))
        tol = min(gap_rel / 10, 1e-7)
        most = float(weights.sum()) * (1 + 1e-9) + 1e-12  # no assignment's objective exceeds this
        while rounds < max_rounds and time.perf_counter() - t0 < time_limit * 0.7:
            rounds += 1
            cost, A, layer = self._columns(weights, rows)
            pi, sigma, upper_lp = _master_lp(cost, A, rhs, layer, L)
            value, choice = self.oracle(*self._prices(weights, rows, pi))
            lower = max(lower, float(value.sum() - pi @ rhs))
            if lower > most:
                return Result(None, float("inf"), lower, rounds, len(self.pool), time.perf_counter() - t0, True)
            new = np.nonzero(value < sigma - 1e-12 * np.maximum(1.0, np.abs(sigma)))[0]
            if len(new) == 0 or self._add(choice, new) == 0:
                break
            if upper_lp - lower <= tol * max(abs(upper_lp), 1e-12):
                break
        if len(rows):  # more columns near the final prices, for the integer master to combine
            for t in (0.0, 0.5, 0.9, 0.99, 1.01, 1.1, 2.0, 10.0):
                self._add(self.oracle(*self._prices(weights, rows, pi * t))[1], np.arange(L))
        choice, upper = self._integer(weights, rows, rhs, L, time_limit - (time.perf_counter() - t0))
        return Result(choice, upper, lower, rounds, len(self.pool), time.perf_counter() - t0)

    def _integer(
        self, weights: np.ndarray, rows: list, rhs: np.ndarray, L: int, time_left: float
    ) -> tuple[np.ndarray | None, float]:
        """The integer master over the pool: (assignment [L, G] or None, its normalized objective)."""
        cost, A, layer = self._columns(weights, rows)
        pick = _master_ip(cost, A, rhs, layer, L, max(time_left, 1.0))
        if pick is None:
            return None, float("inf")
        return np.stack([self.pool[j] for j in pick]), float(cost[pick].sum())

    def _rows(self, eps: Mapping[int, float]) -> list[tuple[str, int, float]]:
        """Coupling rows, all as ``coef . stats <= rhs``: (kind, index, rhs)."""
        prob = self.prob
        rows = [("budget", b, prob.limits[N] / N) for b, N in enumerate(self.budget_lengths)]
        rows += [("eps", j, float(v)) for j, v in sorted(eps.items())]
        rows += [("floor", i, -prob.floor[prob.lengths[i]] / prob.lengths[i]) for i in self.floor_idx]
        return rows

    def _columns(self, weights: np.ndarray, rows: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cost [J], rows [m, J], layer [J]) of the pool for this objective and these rows."""
        n, nb = len(self.prob.lengths), len(self.budget_lengths)
        S = np.stack(self.pool_stats)  # [J, 2n + nb]
        f = S[:, :n] / self.scale
        A = np.zeros((len(rows), len(S)))
        for i, (kind, idx, _) in enumerate(rows):
            if kind == "budget":
                A[i] = S[:, n + idx]
            elif kind == "eps":
                A[i] = f[:, idx]
            else:
                A[i] = -S[:, n + nb + idx]
        return f @ weights, A, np.asarray(self.pool_layer)

    def _prices(self, weights: np.ndarray, rows: list, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Oracle weights (w_loss raw, w_span, w_budget) for the Lagrangian at prices pi."""
        n = len(self.prob.lengths)
        w_loss, w_span, w_budget = weights.astype(np.float64).copy(), np.zeros(n), np.zeros(len(self.budget_lengths))
        for p, (kind, idx, _) in zip(pi, rows):
            if kind == "budget":
                w_budget[idx] += p
            elif kind == "eps":
                w_loss[idx] += p
            else:
                w_span[idx] += p
        return w_loss / self.scale, w_span, w_budget


def _master_lp(
    cost: np.ndarray, A: np.ndarray, rhs: np.ndarray, layer: np.ndarray, L: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """The master LP over the pool (convex combination per layer, rows relaxed at PENALTY
    per unit): (row prices pi >= 0 [m], layer prices sigma [L], optimal value)."""
    m, J = A.shape
    conv = csr_matrix((np.ones(J), (layer, np.arange(J))), shape=(L, J))
    A_ub = hstack([csr_matrix(A), -identity(m, format="csr")]).tocsr()
    A_eq = hstack([conv, csr_matrix((L, m))]).tocsr()
    c = np.concatenate([cost, np.full(m, PENALTY)])
    res = linprog(c, A_ub=A_ub, b_ub=rhs, A_eq=A_eq, b_eq=np.ones(L), bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"master LP failed: {res.message}")
    pi = np.maximum(-res.ineqlin.marginals, 0.0)
    return pi, res.eqlin.marginals, float(res.fun)


def _master_ip(
    cost: np.ndarray, A: np.ndarray, rhs: np.ndarray, layer: np.ndarray, L: int, time_limit: float
) -> np.ndarray | None:
    """The integer master: one pool column per layer meeting the rows, least cost. Column
    indices [L] (layer order), or None if HiGHS finds no feasible pick within the time."""
    m, J = A.shape
    conv = csr_matrix((np.ones(J), (layer, np.arange(J))), shape=(L, J))
    cons = [LinearConstraint(conv, 1, 1)]
    if m:
        cons.append(LinearConstraint(csr_matrix(A), -np.inf, rhs))
    res = milp(
        cost, constraints=cons, integrality=np.ones(J), bounds=Bounds(0, 1),
        options={"time_limit": time_limit, "mip_rel_gap": 1e-6, "presolve": True},
    )
    if res.x is None:
        return None
    x = res.x > 0.5
    pick = np.full(L, -1)
    pick[layer[x]] = np.nonzero(x)[0]
    if (pick < 0).any() or x.sum() != L:
        return None
    if m and (A[:, pick].sum(1) > rhs + 1e-9 * np.maximum(1.0, np.abs(rhs))).any():
        return None
    return pick


SOLVER_NAME = f"layer decomposition + HiGHS (scipy {scipy.__version__})"
