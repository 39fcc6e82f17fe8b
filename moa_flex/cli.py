"""The ``moa-flex`` command line.

    moa-flex list                          shipped plans
    moa-flex show PLAN [--lengths N ...] [--plot PNG]
                                           summary of a plan (shipped name or JSON path), and a picture
    moa-flex import-moa FILE -o OUT.json   convert an upstream MoA {"alphas", "betas"} file
    moa-flex compress MODEL_DIR --density D -o OUT.json
                                           the whole pipeline on a local transformers model:
                                           calibration -> profile -> optimize -> validate
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Sequence

import moa_flex.plans as shipped_plans
from .plan import DEFAULT_MIN_SPAN, DEFAULT_SINK, DEFAULT_SPAN_MULTIPLE, Plan


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
    plan = resolve_plan(args.plan)
    print(plan.summary(lengths=args.lengths))
    if plan.meta.get("validation"):
        print()
        print(validation_table(plan))
    if args.plot:
        N = plot_plan(plan, args.plot, length=args.plot_length)
        print(f"wrote {args.plot} (spans at {N} tokens, densities against length)")


PLOT_HINT = "pip install 'moa-flex[plot]'"


def plot_plan(plan: Plan, path: str | os.PathLike, *, length: int | None = None) -> int:
    """Write a PNG of the plan: its spans (tokens) at ``length`` as a layers x groups heatmap, and
    kv_density and attention_density against the planned length (log-x). ``length`` defaults
    to the plan's largest profiled length (``meta["lengths"]``), else 16384. Returns it."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ValueError(f"plotting needs matplotlib: {PLOT_HINT}") from e
    if length is None:
        profiled = plan.meta.get("lengths")
        length = max(int(n) for n in profiled) if isinstance(profiled, list) and profiled else 16384
    spans = plan.spans(length).numpy()
    lo = max(min(plan.sink + plan.span_multiple, 2 * plan.min_span), 16)
    hi = max(4 * length, 131072)
    xs = sorted({int(round(lo * 2 ** (k / 4))) for k in range(int(4 * math.log2(hi / lo)) + 1)} | {length})
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.1, 1])
    im = ax1.imshow(spans, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=length)
    ax1.set_xlabel("KV-head group" if plan.granularity == "kv_head" else "query head")
    ax1.set_ylabel("layer")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_title(f"span (tokens) at N={length}; kv_density {plan.kv_density(length):.3f}")
    fig.colorbar(im, ax=ax1, label="span (tokens)")
    ax2.plot(xs, [plan.kv_density(n) for n in xs], label="kv_density (memory)")
    ax2.plot(xs, [plan.attention_density(n) for n in xs], label="attention_density (compute)")
    for n in plan.meta.get("lengths") or []:
        ax2.axvline(int(n), color="0.8", lw=0.8, zorder=0)
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("planned length N (tokens)")
    ax2.set_ylabel("density")
    ax2.set_title("density against length (grey: profiled lengths)")
    ax2.legend(loc="best")
    fig.suptitle(f"moa-flex plan: {plan.model.name or '(unnamed)'}")
    fig.savefig(os.fspath(path), dpi=110)
    return length


def validation_table(plan: Plan) -> str:
    """The validation scores the plan's meta holds (written by moa_flex.validate.validate)."""
    v = plan.meta["validation"]
    lines = [f"validation at {v.get('length')} tokens on {v.get('samples')} samples: loss {v.get('loss', float('nan')):.4f} "
             f"nats/token (dense {v.get('dense_loss', float('nan')):.4f}), rank {v.get('rank')}"]
    for s in v.get("scores") or []:
        mark = " <- chosen" if s.get("rank") == 1 else ""
        lines.append(f"  plan {s['index']:>3}: loss {s['loss']:.4f}  kv_density {s['kv_density']:.3f}{mark}")
    return "\n".join(lines)


def _cmd_import(args: argparse.Namespace) -> None:
    plan = Plan.from_moa_json(args.file, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim, name=args.name or "")
    plan.save(args.output)
    print(f"wrote {args.output}: {plan!r}")


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _load_model(model_dir: str, device: str | None) -> Any:
    """A local transformers causal LM folder, in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(model_dir):
        raise ValueError(f"MODEL_DIR {model_dir!r} is not a folder (a local transformers model; nothing is downloaded)")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir} has no config.json: not a transformers model folder")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    if device:
        model = model.to(device)
    return model.eval()


def _has_tokenizer(model_dir: str) -> bool:
    return any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _held_out(args: argparse.Namespace, model: Any, prompt_len: int) -> tuple[list, list]:
    """(calibration prompts, validation prompts) as unanswered Samples.

    Synthetic: calibration from seed 0 at the longest profiled length, validation from seed 1
    at the validation length. JSONL: the last ``--validation-samples`` samples whose prompt
    reaches the validation prompt length are held out; calibration uses the others."""
    from .calibration import load_jsonl, synthetic_samples

    val_n = args.validation_samples
    if args.data is None:
        vocab = int(model.config.vocab_size)
        calib = synthetic_samples(vocab, max(args.lengths) - args.max_new_tokens, args.samples, seed=0)
        val = synthetic_samples(vocab, prompt_len, val_n, seed=1)
        return calib, val
    from transformers import AutoTokenizer

    if not _has_tokenizer(args.model_dir):
        raise ValueError(f"--data needs a tokenizer, and {args.model_dir} has none")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    samples = load_jsonl(args.data, tokenizer)
    long_enough = [i for i, s in enumerate(samples) if s.prompt_len >= prompt_len]
    if len(long_enough) < val_n:
        longest = max(s.prompt_len for s in samples)
        raise ValueError(f"{args.data}: {len(long_enough)} samples reach the validation length {args.validation_length} "
                         f"(a prompt of {prompt_len} tokens; the longest has {longest}), {val_n} needed "
                         "(lower --validation-length or --validation-samples)")
    held = set(long_enough[len(long_enough) - val_n:])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def _check_compress_args(args: argparse.Namespace) -> None:
    if not (isinstance(args.density, float) and 0 < args.density <= 1):
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    for name in ("samples", "validation_samples", "max_new_tokens", "sink", "span_multiple", "min_span", "max_rules_per_layer"):
        v = getattr(args, name)
        if v is None or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if any(n < 1 for n in args.lengths):
        raise ValueError(f"--lengths must be >= 1 tokens, got {args.lengths}")
    args.lengths = sorted(set(args.lengths))
    if args.validation_length is None:
        args.validation_length = 2 * max(args.lengths)
    if args.validation_length <= args.max_new_tokens:
        raise ValueError(f"--validation-length {args.validation_length} leaves no prompt after --max-new-tokens {args.max_new_tokens}")
    if args.sink % args.span_multiple:
        raise ValueError(f"--sink ({args.sink}) must be a multiple of --span-multiple ({args.span_multiple})")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"the folder of -o {args.output!r} does not exist")


def _cmd_compress(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        _compress(args)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _compress(args: argparse.Namespace) -> None:
    """calibration -> profile -> optimize -> validate -> save the best plan, print the table."""
    import torch

    from .calibration import calibration_set
    from .optimize import Budget, build_problem, optimize, solve
    from .plan import ModelShape
    from .profile import profile_model
    from .validate import validate

    _check_compress_args(args)
    progress = not args.quiet
    t0 = time.time()
    model = _load_model(args.model_dir, args.device)
    shape = ModelShape.from_config(model.config)
    _say(args, f"moa-flex compress: {args.model_dir} ({shape.num_layers} layers, {shape.num_heads} heads, "
               f"{shape.num_kv_heads} KV heads), density {args.density}, lengths {args.lengths}, "
               f"validation at {args.validation_length}")
    budget = Budget(density=args.density)
    opt_kw = dict(sink=args.sink, span_multiple=args.span_multiple, min_span=args.min_span,
                  max_rules_per_layer=args.max_rules_per_layer)
    # the budget depends on spans only: check it before hours of profiling (zero losses)
    zeros = {N: torch.zeros(shape.num_layers, shape.num_heads, -(-N // args.span_multiple), dtype=torch.float64)
             for N in args.lengths}
    solve(build_problem(zeros, shape, budget, **opt_kw), args.lengths[0], time_limit=args.time_limit)

    calib_prompts, val_prompts = _held_out(args, model, args.validation_length - args.max_new_tokens)
    _say(args, "[1/4] calibration: the dense model answers its prompts")
    calib = calibration_set(model, calib_prompts, args.lengths, max_new_tokens=args.max_new_tokens,
                            max_per_length=args.samples, progress=progress)
    val = calibration_set(model, val_prompts, [args.validation_length], max_new_tokens=args.max_new_tokens,
                          max_per_length=args.validation_samples, progress=progress)[args.validation_length]

    _say(args, "[2/4] profile")
    partial = f"{args.output}.profile.partial"
    profile = profile_model(model, calib, sink=args.sink, span_multiple=args.span_multiple, progress=progress,
                            checkpoint_path=partial)
    profile.meta.update({"model_dir": os.path.abspath(args.model_dir), "data": args.data or "synthetic"})
    profile_path = f"{args.output}.profile.safetensors"
    profile.save(profile_path)

    _say(args, "[3/4] optimize")
    plans = optimize(profile.hist, model.config, budget, time_limit=args.time_limit, progress=progress, **opt_kw)

    _say(args, f"[4/4] validate {len(plans)} plan(s) on {len(val)} held-out samples of <= {args.validation_length} tokens")
    best, losses = validate(model, plans, val, length=args.validation_length, progress=progress)
    for p in plans:
        p.meta["compress"] = {
            "model_dir": os.path.abspath(args.model_dir), "data": args.data or "synthetic",
            "samples": {str(N): len(calib[N]) for N in args.lengths}, "max_new_tokens": args.max_new_tokens,
            "profile": os.path.abspath(profile_path), "seconds": round(time.time() - t0, 1),
        }
    best.save(args.output)
    if os.path.exists(partial):
        os.remove(partial)
    print(compress_table(plans, best, args.lengths, args.validation_length))
    print(f"wrote {args.output} (plan {plans.index(best)}) and {profile_path} in {time.time() - t0:.0f} s")


def compress_table(plans: Sequence[Plan], best: Plan, lengths: Sequence[int], validation_length: int) -> str:
    """The closing table of ``moa-flex compress``: per Pareto plan, kv_density and the profiled
    loss at every profiled length, kv_density and the validation loss at the validation length."""
    head = f"{'plan':>4} " + "".join(f"{'kv@' + str(n):>10} {'loss@' + str(n):>11} " for n in lengths) + \
        f"{'kv@' + str(validation_length):>10} {'val_loss':>9}"
    lines = [head, "-" * len(head)]
    for i, p in enumerate(plans):
        row = f"{i:>4} "
        for n in lengths:
            loss = p.meta.get("loss", {}).get(str(n), float("nan"))
            row += f"{p.kv_density(n):>10.3f} {loss:>11.4g} "
        row += f"{p.kv_density(validation_length):>10.3f} {p.meta['validation']['loss']:>9.4f}"
        lines.append(row + ("  <- chosen" if p is best else ""))
    lines.append("loss@N: the optimizer's loss (profiled influence units); val_loss: nats per answer token")
    lines.append(f"dense model: validation loss {best.meta['validation']['dense_loss']:.4f} nats/token "
                 f"({best.meta['validation']['samples']} samples)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moa-flex", description="MoA sparse attention plans on FlexAttention.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the shipped plans")
    p.set_defaults(fn=_cmd_list)
    p = sub.add_parser("show", help="print a plan's summary table")
    p.add_argument("plan", help="plan JSON file or shipped plan name (see `moa-flex list`)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536], help="lengths (tokens) to report")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help=f"also write a picture: spans as a layers x heads heatmap, density against length ({PLOT_HINT})")
    p.add_argument("--plot-length", type=int, default=None, metavar="N",
                   help="length (tokens) of the heatmap (default: the plan's largest profiled length, else 16384)")
    p.set_defaults(fn=_cmd_show)
    p = sub.add_parser("import-moa", help="convert an upstream MoA alpha/beta file to a moa-flex plan")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--num-kv-heads", type=int, default=None, help="the real model's KV heads (default: MHA)")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--name", default=None, help="model name recorded in the plan")
    p.set_defaults(fn=_cmd_import)
    p = sub.add_parser("compress", help="calibrate, profile, optimize and validate a plan for a local model",
                       description="The whole MoA pipeline on a local transformers model folder: the dense model "
                                   "answers calibration prompts, attention influence is profiled at every length, "
                                   "the optimizer finds the Pareto plans under the KV budget, and the plan with the "
                                   "lowest response loss on held-out samples at the validation length is saved.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local transformers causal LM folder (save_pretrained)")
    p.add_argument("--density", type=float, required=True, help="KV-cache budget relative to dense, in (0, 1], at every profiled length")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="profiled lengths (tokens)")
    p.add_argument("--validation-length", type=int, default=None, help="held-out length (tokens; default 2 x the longest profiled)")
    p.add_argument("--data", default=None, metavar="JSONL",
                   help='{"context": str, "question": str} per line (needs the folder\'s tokenizer); default: synthetic lookups')
    p.add_argument("--samples", type=int, default=8, help="calibration samples per length")
    p.add_argument("--validation-samples", type=int, default=4, help="held-out samples")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens of each answer the dense model writes")
    p.add_argument("--sink", type=int, default=DEFAULT_SINK, help="sink tokens of every rule")
    p.add_argument("--span-multiple", type=int, default=DEFAULT_SPAN_MULTIPLE, help="spans are multiples of this (tokens)")
    p.add_argument("--min-span", type=int, default=DEFAULT_MIN_SPAN, help="smallest span (tokens)")
    p.add_argument("--max-rules-per-layer", type=int, default=2, help="distinct rules per layer (MoA: 2)")
    p.add_argument("--device", default=None, help="torch device of the model (default: where it loads, the CPU)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per optimizer solve")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    p.add_argument("-o", "--output", required=True, help="the plan JSON to write (also OUT.profile.safetensors)")
    p.set_defaults(fn=_cmd_compress)
    from .demo import DEFAULT_DENSITIES, DEFAULT_DEPTHS, DEFAULT_LENGTHS, DEFAULT_PROFILE_LENGTHS, DemoConfig

    p = sub.add_parser("demo", help="the whole job on the shipped needle model: calibrate, profile, optimize, compile, "
                                    "measure retrieval (CPU, minutes)",
                       description="Calibrates, profiles and optimizes MoA plans for the shipped needle model (a small "
                                   "Llama trained on moa_flex.synthetic), then measures retrieval accuracy by length and "
                                   "needle depth for the dense model, the MoA plans and uniform plans of the same KV density.")
    p.add_argument("--model-dir", default=None, help="a folder written by `python -m moa_flex.zoo.train` (default: the shipped one)")
    p.add_argument("-o", "--out", default="moa-flex-demo", help="output folder (plans, profile, results, demo.png)")
    p.add_argument("--densities", type=float, nargs="+", default=list(DEFAULT_DENSITIES), help="KV densities")
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="evaluation lengths (tokens)")
    p.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS), help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=DemoConfig.samples,
                   help="evaluation sequences per length (each asks one question per depth)")
    p.add_argument("--profile-lengths", type=int, nargs="+", default=list(DEFAULT_PROFILE_LENGTHS), help="profiled lengths (tokens)")
    p.add_argument("--calibration-samples", type=int, default=DemoConfig.calibration_samples,
                   help="calibration samples per profiled length (needle depths spread evenly)")
    p.add_argument("--sink", type=int, default=DemoConfig.sink, help="plans' sink tokens")
    p.add_argument("--span-multiple", type=int, default=DemoConfig.span_multiple, help="plans' span granularity (tokens)")
    p.add_argument("--min-span", type=int, default=DemoConfig.min_span, help="plans' smallest span (tokens)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_demo)
    return ap


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(model_dir=args.model_dir, out=args.out, densities=args.densities, lengths=args.lengths,
                        depths=args.depths, samples=args.samples, profile_lengths=args.profile_lengths,
                        calibration_samples=args.calibration_samples, sink=args.sink, span_multiple=args.span_multiple,
                        min_span=args.min_span, progress=not args.quiet))


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
