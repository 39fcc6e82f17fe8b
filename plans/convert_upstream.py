"""Convert the MoA authors' published plans into moa-flex plan files.

    python -m moa_flex.plans.convert_upstream SRC_DIR [-o OUT_DIR]

SRC_DIR holds upstream files named ``{org}--{model}__{kind}_alpha_beta.json`` with
``{"alphas", "betas"}`` per query head (tokens). MoA profiled each model converted to MHA, so
the rules stay per query head (granularity 'head'); the plan carries the real model's KV
head count, and each KV group's cache holds the largest span among its query heads.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from moa_flex.plan import Plan

# Real attention shapes of the models the upstream plans were made for:
# (num_layers, num_heads, num_kv_heads, head_dim), from each model's config.json.
UPSTREAM_MODELS: dict[str, tuple[int, int, int, int]] = {
    "gradientai/Llama-3-8B-Instruct-262k": (32, 32, 8, 128),
    "gradientai/Llama-3-70B-Instruct-262k": (80, 64, 8, 128),
    "lmsys/vicuna-7b-v1.5-16k": (32, 32, 32, 128),
    "lmsys/vicuna-13b-v1.5-16k": (40, 40, 40, 128),
    "meta-llama/Llama-3.2-1B-Instruct": (16, 32, 8, 64),
    "meta-llama/Llama-3.2-3B-Instruct": (28, 24, 8, 128),
}
_NAME = re.compile(r"^(?P<org>[^_]+?)--(?P<model>.+)__(?P<kind>moa|streamingllm)_alpha_beta\.json$")


def convert(src: Path) -> tuple[str, Plan]:
    """Convert one upstream file; returns (shipped plan name, plan)."""
    m = _NAME.match(src.name)
    if m is None:
        raise ValueError(f"{src.name}: expected a name like org--model__moa_alpha_beta.json")
    model = f"{m['org']}/{m['model']}"
    if model not in UPSTREAM_MODELS:
        raise ValueError(f"{src.name}: unknown model {model!r}; known: {sorted(UPSTREAM_MODELS)}")
    layers, heads, kv_heads, head_dim = UPSTREAM_MODELS[model]
    kind = m["kind"]
    meta = {
        "upstream_file": src.name,
        "upstream_kind": "MoA plan" if kind == "moa" else "uniform StreamingLLM-style baseline",
        "license": "MIT, Copyright (c) 2024 NICS-EFC Lab of Tsinghua University (see LICENSE-MoA)",
    }
    plan = Plan.from_moa_json(src, num_kv_heads=kv_heads, head_dim=head_dim, name=model, meta=meta)
    if (plan.num_layers, plan.num_heads) != (layers, heads):
        raise ValueError(
            f"{src.name}: plan has {plan.num_layers} layers x {plan.num_heads} heads, "
            f"but {model} has {layers} x {heads}"
        )
    return f"{m['model']}.{kind}", plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="folder of upstream *_alpha_beta.json files")
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).parent, help="output folder")
    args = parser.parse_args(argv)
    files = sorted(args.src.glob("*_alpha_beta.json"))
    if not files:
        raise SystemExit(f"no *_alpha_beta.json files in {args.src}")
    for src in files:
        name, plan = convert(src)
        plan.save(args.out / f"{name}.json")
        print(f"{src.name} -> {name}.json")


if __name__ == "__main__":
    main()
