"""The ``moa-flex`` command line.

    moa-flex list                          shipped plans
    moa-flex show PLAN [--lengths N ...]   summary of a plan (shipped name or JSON path)
    moa-flex import-moa FILE -o OUT.json   convert an upstream MoA {"alphas", "betas"} file
"""

from __future__ import annotations

import argparse
import os
import sys

import moa_flex.plans as shipped_plans
from .plan import Plan


def resolve_plan(ref: str) -> Plan:
    """A plan from a JSON path or the name of a shipped plan."""
    if os.path.exists(ref):
        return Plan.load(ref)
    if ref in shipped_plans.names():
        return shipped_plans.load(ref)
    raise ValueError(f"{ref!r} is neither a plan file nor a shipped plan; shipped: {', '.join(shipped_plans.names())}")


def _cmd_list(args: argparse.Namespace) -> None:
    for name in shipped_plans.names():
        plan = shipped_plans.load(name)
        print(f"{name:<42} {plan.model.name:<40} kv_density@16K {plan.kv_density(16384):.3f}")


def _cmd_show(args: argparse.Namespace) -> None:
    print(resolve_plan(args.plan).summary(lengths=args.lengths))


def _cmd_import(args: argparse.Namespace) -> None:
    plan = Plan.from_moa_json(args.file, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim, name=args.name or "")
    plan.save(args.output)
    print(f"wrote {args.output}: {plan!r}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moa-flex", description="MoA sparse attention plans on FlexAttention.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the shipped plans")
    p.set_defaults(fn=_cmd_list)
    p = sub.add_parser("show", help="print a plan's summary table")
    p.add_argument("plan", help="plan JSON file or shipped plan name (see `moa-flex list`)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536], help="lengths (tokens) to report")
    p.set_defaults(fn=_cmd_show)
    p = sub.add_parser("import-moa", help="convert an upstream MoA alpha/beta file to a moa-flex plan")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--num-kv-heads", type=int, default=None, help="the real model's KV heads (default: MHA)")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--name", default=None, help="model name recorded in the plan")
    p.set_defaults(fn=_cmd_import)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"moa-flex: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
