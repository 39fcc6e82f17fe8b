"""MoA's quality on real text: the code model's plans from `moa_flex.compress` with its defaults.

    python bench/code_quality.py [--densities 0.5 0.25] [--lengths 2048 4096 8192 16384] [--docs 4] [--record]

The code model (moa_flex/zoo/code) is compressed at each KV density the way a user would run
`moa-flex compress MODEL --density D --code-data`: calibration on real Python from this
machine's installed packages continued by the dense model itself, profiled at 2048 / 4096 /
8192 tokens (8 prompts each), the Pareto plan with the lowest response loss on 4 held-out
prompts at 16384 tokens; the spans' defaults (sink 64, multiples of 64, at least 128). Then
the dense model, each MoA plan and a uniform sink + window plan of the same KV density are
scored on held-out standard-library documents (`moa_flex.zoo.text_eval`): bits per byte,
far-copy accuracy and loss, effective context, and the issue's quality bars at the longest
length that the plans were profiled for (8192). One profile serves every density.
"""

from __future__ import annotations

import argparse
import sys

from moa_flex.code_demo import CodeDemoConfig, run_code_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384], help="held-out document lengths")
    ap.add_argument("--docs", type=int, default=4, help="held-out documents per length")
    ap.add_argument("--bars-at", type=int, default=8192, help="the length (tokens) of the quality bars")
    ap.add_argument("-o", "--out", default="code-quality")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    cfg = CodeDemoConfig(out=args.out, densities=tuple(args.densities), lengths=tuple(args.lengths), docs=args.docs,
                         profile_lengths=(2048, 4096, 8192), calibration_samples=8, validation_samples=4,
                         progress=sys.stderr.isatty())
    summary = run_code_demo(cfg, bars_at=args.bars_at)
    if args.record:
        from harness import record

        r = summary["results"]
        lines = ["| plan | length | docs | bits/byte | far-copy tokens | far-copy accuracy | far-copy loss (nats) |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for name, by in r["plans"].items():
            for n, s in by.items():
                lines.append(f"| {name} | {n} | {s['documents']} | {s['bits_per_byte']:.4f} | {s['far_tokens']} | "
                             f"{s['far_accuracy']:.3f} | {s['far_loss']:.3f} |")
        notes = ["effective context (far-copy accuracy >= 90% of dense): "
                 + ", ".join(f"{k} {v}" for k, v in r["effective_context"].items())]
        notes += summary["bars"]
        notes.append("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items()))
        record("Code model: MoA plans from compress's defaults vs uniform plans on held-out text",
               "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes), device="cpu",
               details=f"far copies: k={r['k']}, more than {r['window']} tokens back. Plans: {args.out}/plan-moa-*.json.")


if __name__ == "__main__":
    main()
