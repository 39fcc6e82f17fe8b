"""Solve time and gap of the MoA optimizer on Llama-3-8B and -70B shapes, random importance (CPU).

    python bench/optimize.py [--shapes 8b-kv 8b-head 70b-kv 70b-head] [--lengths 2048 4096 8192]
                             [--density 0.5] [--max-rules 2] [--time-limit 120] [--pareto] [--record]
                             [--no-decompose]

Random importance model: per query head h, the summed |E| at distance d (tokens) is
``w_h * exp(-d / tau_h) * (N - sink - d)`` (the last factor counts the pairs at that distance),
with ``tau_h`` log-uniform in [64, 16384] tokens and ``w_h`` uniform in [0.1, 1], seed 0;
binned by span_multiple as the profiler does. Default rules: ``rule_grid(lengths)``.

Without ``--pareto`` one MILP per shape: the loss at the longest length minimized under the
budget at every length (one anchor of the Pareto set); with it, the whole Pareto set.
Solves go through the layer decomposition first (moa_flex/optimize/decomposition.py), which
returns its plan when its certified gap is <= 0.1%, else warm-starts the MILP solver;
``--no-decompose`` solves the plain MILP. Columns: problem (losses, pruning), model (PuLP build, 0 when no MILP
was needed), solve (wall seconds of all solves, build included), gap (largest certified
relative gap). ``--record`` appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import pulp
import torch

from moa_flex.plan import ModelShape
from moa_flex.optimize import build_problem, pareto
from moa_flex.optimize.milp import solver_name as _solver_name
from moa_flex.optimize.solve import Solver as _Solver

SHAPES = {  # --shapes name: (model, granularity); the models' shapes are harness.LLAMA3_8B / LLAMA3_70B
    "8b-kv": ("8b", "kv_head"),
    "8b-head": ("8b", "head"),
    "70b-kv": ("70b", "kv_head"),
    "70b-head": ("70b", "head"),
}


def shape_of(name: str) -> tuple[ModelShape, str]:
    """(model shape, granularity) of a --shapes name."""
    # imported here, not at the top: tests/test_optimize.py loads this file by path, bench/ not on sys.path
    import harness

    model, granularity = SHAPES[name]
    return {"8b": harness.LLAMA3_8B, "70b": harness.LLAMA3_70B}[model], granularity


def random_hist(shape: ModelShape, lengths: list[int], sink: int = 64, mult: int = 64, seed: int = 0) -> dict:
    """{N: [L, H, ceil(N / mult)]} histograms of the random importance model (module doc)."""
    g = torch.Generator().manual_seed(seed)
    L, H = shape.num_layers, shape.num_heads
    tau = torch.exp(torch.empty(L, H, dtype=torch.float64).uniform_(math.log(64), math.log(16384), generator=g))
    w = torch.empty(L, H, dtype=torch.float64).uniform_(0.1, 1, generator=g)
    out = {}
    for N in lengths:
        d = torch.arange(N, dtype=torch.float64)
        pairs = (N - sink - d).clamp(min=0)
        bins = -(-N // mult)
        dens = w[..., None] * torch.exp(-d / tau[..., None]) * pairs
        out[N] = torch.nn.functional.pad(dens, (0, bins * mult - N)).view(L, H, bins, mult).sum(-1)
    return out


def run(name: str, args: argparse.Namespace) -> dict:
    """One shape; a solve that ends without any solution becomes a row saying so."""
    t = time.perf_counter()
    try:
        return _run(name, args)
    except RuntimeError as e:  # the solver stopped (time limit) before finding any solution
        shape, gran = shape_of(name)
        return {
            "shape": name, "groups": shape.num_layers * (shape.num_kv_heads if gran == "kv_head" else shape.num_heads),
            "rules": float("nan"), "x": float("nan"), "solves": 0, "problem": float("nan"), "model": float("nan"),
            "solve": time.perf_counter() - t, "gap": float("nan"), "status": f"none ({e})", "solver": "CBC",
            "loss": float("nan"),
        }


def _run(name: str, args: argparse.Namespace) -> dict:
    shape, gran = shape_of(name)
    hist = random_hist(shape, args.lengths)
    t = time.perf_counter()
    prob = build_problem(hist, shape, args.density, granularity=gran, max_rules_per_layer=args.max_rules)
    t_prob = time.perf_counter() - t
    cands = sum(len(c) for row in prob.candidates for c in row)
    if args.pareto:
        t = time.perf_counter()
        sols = pareto(
            prob, solver=args.solver, time_limit=args.time_limit, progress=False, decompose=not args.no_decompose
        )
        total = time.perf_counter() - t
        t_model, t_solve = float("nan"), total
    else:
        t = time.perf_counter()
        model = _Solver(prob, decompose=not args.no_decompose)
        sol = model.solve(
            len(prob.lengths) - 1, None, rho=0.0, solver=_solver_name(args.solver),
            time_limit=args.time_limit, gap_rel=1e-3, threads=1, warm=False,
        )
        t_model, t_solve = model.build_s, time.perf_counter() - t
        sols = [sol]
    gaps = [s.gap for s in sols if s.gap is not None]
    return {
        "shape": name, "groups": prob.shape[0] * prob.shape[1], "rules": len(prob.rules), "x": cands,
        "solves": len(sols), "problem": t_prob, "model": t_model, "solve": t_solve,
        "gap": max(gaps) if gaps else float("nan"), "status": ",".join(sorted({s.status for s in sols})),
        "solver": ", ".join(f"{k} x{v}" for k, v in sorted(_count(s.solver for s in sols).items())),
        "loss": float(sols[0].objectives[-1]),
    }


def _count(names) -> dict[str, int]:
    """{short solver name: solves}: the decomposition alone, or the MILP solver (started or not)."""
    out: dict[str, int] = {}
    for name in names:
        short = "decomposition" if name.startswith("layer decomposition") else name.split(" (")[0]
        short += " (warm)" if "started from" in name else ""
        out[short] = out.get(short, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--max-rules", type=int, default=2, help="distinct rules per layer (0: no limit)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per solve")
    ap.add_argument("--solver", default="cbc", choices=["auto", "cbc", "highs"])
    ap.add_argument("--pareto", action="store_true", help="solve the whole Pareto set")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--no-decompose", action="store_true", help="plain MILP, no layer decomposition")
    args = ap.parse_args()
    args.max_rules = args.max_rules or None
    rows = []
    for name in args.shapes:
        r = run(name, args)
        rows.append(r)
        print(r, flush=True)
    lines = [
        "| shape | groups | rules | x vars | solves | problem (s) | model (s) | solve (s) | max gap | status | solver |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *(
            f"| {r['shape']} | {r['groups']} | {r['rules']:.0f} | {r['x']:.0f} | {r['solves']} | {r['problem']:.1f} | "
            f"{r['model']:.1f} | {r['solve']:.1f} | {r['gap']:.2e} | {r['status']} | {r['solver']} |"
            for r in rows
        ),
    ]
    table = "\n".join(lines)
    print(table)
    if args.record:
        # imported here, not at the top: tests/test_optimize.py loads this file by path, bench/ not on sys.path
        from harness import record

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        record(
            f"Optimizer: {'Pareto set' if args.pareto else 'one MILP (loss at the longest length)'}, "
            f"density {args.density}, lengths {args.lengths}, K={args.max_rules}",
            table,
            device="cpu",
            details=f"Shared machine, 1-min load {load:.1f} at the end; pulp {pulp.__version__}, numpy {np.__version__}. "
            f"Solves single-threaded, gap target 0.1%, time limit {args.time_limit:g} s per solve, "
            f"{'plain MILP' if args.no_decompose else 'layer decomposition first (moa_flex/optimize/decomposition.py)'}.",
        )


if __name__ == "__main__":
    main()
