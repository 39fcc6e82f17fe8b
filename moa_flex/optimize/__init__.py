"""The optimizer stage: one elastic rule per head group, chosen by a MILP under a KV budget.

Inputs are the profiler's histograms (``hist[N]``: ``[L, H, ceil(N / span_multiple)]`` per
query head) and a grid of candidate rules ``(alpha, beta)`` (:mod:`.rules`); a
:class:`Budget` bounds the cache (:mod:`.budget`); :func:`build_problem` computes every rule's
loss and span (:mod:`.problem`); :func:`solve` runs the layer decomposition
(:mod:`.decomposition`) and, where needed, the PuLP MILP (:mod:`.milp`); :func:`pareto` combines
the per-length objectives into a Pareto set (:mod:`.pareto`); :func:`optimize` does all of it
and returns Plans (:mod:`.optimizer`); :func:`validate` picks the plan with the lowest response
loss on held-out samples (:mod:`.validate`). docs/DESIGN.md, "Optimizing", fixes the program.
"""

from .budget import GB, Budget
from .optimizer import optimize, to_plan
from .pareto import pareto
from .problem import MEASURES, Problem, Solution, build_problem
from .rules import Rule, rule_grid, rule_losses, rule_spans
from .solve import smallest_feasible_scale, solve
from .validate import response_loss, validate

__all__ = [
    "GB", "MEASURES", "Budget", "Problem", "Rule", "Solution", "build_problem", "optimize", "pareto", "response_loss",
    "rule_grid", "rule_losses", "rule_spans", "smallest_feasible_scale", "solve", "to_plan", "validate",
]
