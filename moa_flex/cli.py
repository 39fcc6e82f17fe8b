"""The ``moa-flex`` command line.

    moa-flex list                          shipped plans
    moa-flex show PLAN [--lengths N ...] [--plot PNG]
                                           summary of a plan (shipped name or JSON path), and a picture
    moa-flex import-moa FILE -o OUT.json   convert an upstream MoA {"alphas", "betas"} file
    moa-flex compress MODEL_DIR --density D [-o OUT.json]
    moa-flex compress MODEL_DIR --gb G --budget-length N [--batch-size B] [--kv-dtype fp8]
                                           the whole pipeline on a local transformers model
                                           (moa_flex.compress): calibration -> profile ->
                                           optimize -> validate; default output MODEL_DIR/moa_plan.json
    moa-flex demo                          the main job on the shipped needle model (moa_flex.demo)
    moa-flex eval MODEL_DIR [--plans P ...] [--uniform D ...]
                                           bits per byte, far-copy tokens and effective context on
                                           held-out text (moa_flex.zoo.text_eval)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import moa_flex.plans as shipped_plans

from .kernels.quant import KV_DTYPES
from .optimize.budget import Budget
from .plan import DEFAULT_MIN_SPAN, DEFAULT_SINK, DEFAULT_SPAN_MULTIPLE, PLAN_FILE, Plan
from .zoo.text_eval import DEFAULT_K, DEFAULT_WINDOW


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


def influence_shares(hist: Any) -> Any:
    """[heads, bins]: each head's cumulative share of its influence out to each distance bin
    (rows of a profile's ``hist[N]`` [L, H, bins] flattened layer-major; a head without
    influence is 0). Local heads reach 1 within a few bins, retrieval heads only far away."""
    h = hist.reshape(-1, hist.shape[-1]).clamp_min(0).cumsum(-1)
    total = h[:, -1:].clone()
    total[total == 0] = 1
    return h / total


def plot_profile(profile: Any, path: str | os.PathLike, *, length: int | None = None) -> int:
    """Write a PNG of a profile at ``length`` (default its longest): per query head (rows,
    layer by layer), the cumulative share of its influence out to each attention distance,
    and each head's share at a quarter of the length. Returns the length."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError(f"plotting needs matplotlib: {PLOT_HINT}") from e
    N = max(profile.lengths) if length is None else int(length)
    if N not in profile.hist:
        raise ValueError(f"length {N} was not profiled; profiled: {profile.lengths}")
    shares = influence_shares(profile.hist[N])
    L, H = profile.model.num_layers, profile.model.num_heads
    quarter = shares[:, min(shares.shape[1] - 1, max(0, (N // 4) // profile.span_multiple - 1))]
    fig = Figure(figsize=(11, 0.16 * L * H + 1.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[3, 1])
    extent = (0, shares.shape[1] * profile.span_multiple, L * H - 0.5, -0.5)
    im = ax1.imshow(shares.numpy(), aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1, extent=extent)
    ax1.set_yticks([l * H for l in range(L)], [f"layer {l}" for l in range(L)])
    ax1.set_xlabel("attention distance (tokens)")
    ax1.set_title(f"cumulative share of each head's influence, N={N}")
    fig.colorbar(im, ax=ax1, label="share within distance")
    ax2.barh(range(L * H), quarter.numpy(), color="0.3")
    ax2.set_ylim(L * H - 0.5, -0.5)
    ax2.set_yticks([l * H for l in range(L)], [])
    ax2.set_xlim(0, 1)
    ax2.set_xlabel(f"share within {N // 4} tokens")
    fig.suptitle(f"moa-flex profile: {profile.model.name or '(unnamed)'}")
    fig.savefig(os.fspath(path), dpi=110)
    return N


def _cmd_show_profile(args: argparse.Namespace) -> None:
    from .profile.store import Profile

    profile = Profile.load(args.profile)
    for N in profile.lengths:
        shares = influence_shares(profile.hist[N])
        local = int((shares[:, min(shares.shape[1] - 1, max(0, (N // 8) // profile.span_multiple - 1))] >= 0.9).sum())
        print(f"N={N}: {profile.num_samples[N]} samples; {local} of {shares.shape[0]} heads have 90% of their influence "
              f"within N/8 = {N // 8} tokens")
    if args.plot:
        N = plot_profile(profile, args.plot, length=args.length)
        print(f"wrote {args.plot} (influence by distance per head at {N} tokens)")


def validation_table(plan: Plan) -> str:
    """The validation scores the plan's meta holds (written by moa_flex.optimize.validate)."""
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


def _outputs(args: argparse.Namespace) -> tuple[str, str]:
    """(plan path, profile path): ``-o OUT.json`` and ``OUT.json.profile.safetensors``, or by
    default the model's folder (``moa_plan.json`` beside config.json, ``moa_profile.safetensors``)."""
    if args.output is None:
        return os.path.join(args.model_dir, PLAN_FILE), os.path.join(args.model_dir, "moa_profile.safetensors")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"the folder of -o {args.output!r} does not exist")
    return args.output, f"{args.output}.profile.safetensors"


def _cmd_compress(args: argparse.Namespace) -> None:
    """Load the folder's model, run moa_flex.compress, save the plan, print the table."""
    from transformers.utils import logging as hf_logging

    from .pipeline import compress

    budget = _budget(args)
    if args.sink % args.span_multiple:
        raise ValueError(f"--sink ({args.sink}) must be a multiple of --span-multiple ({args.span_multiple})")
    plan_path, profile_path = _outputs(args)
    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        t0 = time.time()
        model = _load_model(args.model_dir, args.device)
        data = args.data
        if args.code_data:
            if data is not None:
                raise ValueError("pass --data or --code-data, not both")
            data = _code_data(args)
        best = compress(
            model, density=budget, lengths=args.lengths, data=data, samples_per_length=args.samples,
            max_new_tokens=args.max_new_tokens, validation_length=args.validation_length,
            validation_samples=args.validation_samples, sink=args.sink, span_multiple=args.span_multiple,
            min_span=args.min_span, max_rules_per_layer=args.max_rules_per_layer, profile=profile_path,
            time_limit=args.time_limit, progress=not args.quiet, backend=args.backend,
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    best.meta["compress"]["model_dir"] = os.path.abspath(args.model_dir)
    best.save(plan_path)
    print(compress_table(best))
    print(f"wrote {plan_path} (plan {best.meta['compress']['index']}) and {profile_path} in {time.time() - t0:.0f} s")


def _budget(args: argparse.Namespace) -> Budget:
    """compress's KV budget from --density / --tokens / --gb, --budget-length, --batch-size and
    --kv-dtype; ValueError naming the flag at fault."""
    if args.density is not None and not 0 < args.density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    if args.density is None and args.budget_length is None:
        raise ValueError(f"--{'gb' if args.gb is not None else 'tokens'} needs --budget-length (tokens)")
    for flag, v in (("--tokens", args.tokens), ("--gb", args.gb)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{flag} must be a finite number > 0, got {v}")
    if args.budget_length is not None and args.budget_length < 1:
        raise ValueError(f"--budget-length must be >= 1 (tokens), got {args.budget_length}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return Budget(density=args.density, tokens=args.tokens, gb=args.gb, length=args.budget_length,
                  batch_size=args.batch_size, kv_dtype=args.kv_dtype)


def _code_data(args: argparse.Namespace) -> list:
    """``--code-data``: prompts of real Python from this machine's installed packages, as long as
    the validation length, enough for the calibration and the held-out samples."""
    from transformers import AutoTokenizer

    from .data import code_samples

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    longest = args.validation_length or 2 * max(args.lengths)
    return code_samples(tokenizer, longest - args.max_new_tokens, args.samples + args.validation_samples,
                        progress=not args.quiet)


def compress_table(best: Plan) -> str:
    """The closing table of ``moa-flex compress``, from the chosen plan's meta: per Pareto plan,
    kv_density and the profiled loss at every profiled length, kv_density and the validation
    loss at the validation length."""
    info = best.meta["compress"]
    lengths, val_len = info["lengths"], info.get("validation_length")
    head = f"{'plan':>4} " + "".join(f"{'kv@' + str(n):>10} {'loss@' + str(n):>11} " for n in lengths)
    if val_len:
        head += f"{'kv@' + str(val_len):>10} {'val_loss':>9}"
    lines = [head, "-" * len(head)]
    for row in info["plans"]:
        text = f"{row['index']:>4} "
        for n in lengths:
            loss = row["profiled_loss"].get(str(n))
            text += f"{row['kv_density'][str(n)]:>10.3f} {float('nan') if loss is None else loss:>11.4g} "
        if val_len:
            text += f"{row['validation_kv_density']:>10.3f} {row['validation_loss']:>9.4f}"
        lines.append(text + ("  <- chosen" if row["index"] == info["index"] else ""))
    lines.append("loss@N: the optimizer's loss (profiled influence units)"
                 + ("; val_loss: nats per answer token" if val_len else ""))
    if val_len:
        v = best.meta["validation"]
        lines.append(f"dense model: validation loss {v['dense_loss']:.4f} nats/token ({v['samples']} samples)")
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
    p = sub.add_parser("show-profile", help="summarize a profile file (how far each head's influence reaches)")
    p.add_argument("profile", help="a profile written by `moa-flex compress` (*.safetensors)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help=f"also write a picture: per head, the cumulative share of its influence by distance ({PLOT_HINT})")
    p.add_argument("--length", type=int, default=None, help="profiled length (tokens) to plot (default: the longest)")
    p.set_defaults(fn=_cmd_show_profile)
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
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--density", type=float, default=None,
                      help="KV-cache budget relative to dense, in (0, 1], at every profiled length (or at --budget-length)")
    size.add_argument("--tokens", type=float, default=None,
                      help="KV-cache budget in slots per sequence (tokens summed over layers and KV heads) at --budget-length")
    size.add_argument("--gb", type=float, default=None,
                      help="KV-cache budget in GB (10**9 bytes) for --batch-size sequences of --budget-length tokens, "
                           "K and V in --kv-dtype")
    p.add_argument("--budget-length", type=int, default=None, metavar="N",
                   help="length (tokens) at which the budget holds; needed by --tokens and --gb")
    p.add_argument("--batch-size", type=int, default=1, help="sequences the --gb budget holds (default 1)")
    p.add_argument("--kv-dtype", default=None, choices=list(KV_DTYPES),
                   help="the cache dtype the plan will run with (moa_flex.compile's kv_dtype): with --gb it sets the "
                        "bytes per slot (fp8: one byte per value plus a 4-byte scale per head vector, about twice "
                        "the slots of bf16); with --density or --tokens (slots, no bytes) it is only recorded in the "
                        "plan and does not change the solve. Default: 2 bytes per value, no scales")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="profiled lengths (tokens)")
    p.add_argument("--validation-length", type=int, default=None, help="held-out length (tokens; default 2 x the longest profiled)")
    p.add_argument("--data", default=None, metavar="JSONL",
                   help='{"context": str, "question": str} per line (needs the folder\'s tokenizer); default: synthetic lookups')
    p.add_argument("--code-data", action="store_true",
                   help="calibrate on this machine's installed Python sources (site-packages, not the standard "
                        "library; moa_flex.data.code_samples): the code model's training distribution")
    p.add_argument("--samples", type=int, default=8, help="calibration samples per length")
    p.add_argument("--validation-samples", type=int, default=4, help="held-out samples")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens of each answer the dense model writes")
    p.add_argument("--sink", type=int, default=DEFAULT_SINK, help="sink tokens of every rule")
    p.add_argument("--span-multiple", type=int, default=DEFAULT_SPAN_MULTIPLE, help="spans are multiples of this (tokens)")
    p.add_argument("--min-span", type=int, default=DEFAULT_MIN_SPAN, help="smallest span (tokens)")
    p.add_argument("--max-rules-per-layer", type=int, default=2, help="distinct rules per layer (MoA: 2)")
    p.add_argument("--device", default=None, help="torch device of the model (default: where it loads, the CPU)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per optimizer solve")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                   help="moa_flex.compile backend of the validation runs (eager: no compile, for short samples)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    p.add_argument("-o", "--output", default=None,
                   help="the plan JSON to write (also OUT.profile.safetensors); default: MODEL_DIR/moa_plan.json, where "
                        "moa_flex.compile(model) finds it (and MODEL_DIR/moa_profile.safetensors)")
    p.set_defaults(fn=_cmd_compress)
    from .code_demo import DEFAULT_LENGTHS as CODE_LENGTHS
    from .code_demo import DEFAULT_PROFILE_LENGTHS as CODE_PROFILE_LENGTHS
    from .demo import DEFAULT_DENSITIES, DEFAULT_DEPTHS, DEFAULT_LENGTHS, DEFAULT_PROFILE_LENGTHS, DemoConfig

    p = sub.add_parser("demo", help="the whole job on the shipped needle model: calibrate, profile, optimize, compile, "
                                    "measure retrieval (CPU, minutes)",
                       description="Calibrates, profiles and optimizes MoA plans for the shipped needle model (a small "
                                   "Llama trained on moa_flex.data.synthetic), then measures retrieval accuracy by length and "
                                   "needle depth for the dense model, the MoA plans and uniform plans of the same KV density.")
    p.add_argument("--model", choices=["needle", "code"], default="needle",
                   help="needle: the synthetic retrieval model (moa_flex.demo); code: the code model on real text, "
                        "calibrated on installed Python sources and scored on the standard library (moa_flex.code_demo)")
    p.add_argument("--model-dir", default=None, help="a folder written by `python -m moa_flex.zoo.train` (or "
                                                     "`train_code` with --model code; default: the shipped one)")
    p.add_argument("-o", "--out", default=None, help="output folder (plans, profile, results, demo.png; default "
                                                     "moa-flex-demo or moa-flex-demo-code)")
    p.add_argument("--densities", type=float, nargs="+", default=list(DEFAULT_DENSITIES), help="KV densities")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"evaluation lengths (tokens; default {list(DEFAULT_LENGTHS)}, code: {list(CODE_LENGTHS)})")
    p.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS), help="needle depths in [0, 1]")
    p.add_argument("--kv-dtype", default=None, choices=["fp8"],
                   help="also score every MoA plan with its answers read from a MoA cache of this dtype (needle model)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"evaluation sequences per length (each asks one question per depth; default {DemoConfig.samples}); "
                        "code: held-out documents per length (default 4)")
    p.add_argument("--profile-lengths", type=int, nargs="+", default=None,
                   help=f"profiled lengths (tokens; default {list(DEFAULT_PROFILE_LENGTHS)}, code: {list(CODE_PROFILE_LENGTHS)})")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help=f"calibration samples per profiled length (needle depths spread evenly; default "
                        f"{DemoConfig.calibration_samples}, code: 4)")
    p.add_argument("--sink", type=int, default=DemoConfig.sink, help="plans' sink tokens")
    p.add_argument("--span-multiple", type=int, default=DemoConfig.span_multiple, help="plans' span granularity (tokens)")
    p.add_argument("--min-span", type=int, default=DemoConfig.min_span, help="plans' smallest span (tokens)")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                   help="moa_flex.compile backend of the accuracy runs (eager: no compile, for short runs and debugging)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("eval", help="bits per byte, far-copy tokens and effective context of plans on held-out text",
                       description="Scores a local causal LM with its tokenizer on held-out text cut into documents of "
                                   "each length: the dense model, the given plans and uniform sink + window plans "
                                   "(moa_flex.zoo.text_eval). Held-out text: the Python standard library by default.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local transformers causal LM folder with its tokenizer")
    p.add_argument("--plans", nargs="*", default=[], metavar="PLAN", help="plan JSON files (named by file name)")
    p.add_argument("--uniform", type=float, nargs="*", default=[], metavar="D",
                   help="KV densities of uniform sink + window plans to compare")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="document lengths (tokens)")
    p.add_argument("--docs", type=int, default=8, help="documents per length")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="tokens of context a far copy must match")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="a far copy's source lies further back (tokens)")
    p.add_argument("--text-dir", default=None, help="held-out text: every file under this folder, sorted "
                                                    "(default: the standard library's .py files)")
    p.add_argument("--sink", type=int, default=DEFAULT_SINK, help="the uniform plans' sink tokens")
    p.add_argument("--device", default=None, help="torch device of the model (default: where it loads, the CPU)")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"], help="moa_flex.compile backend")
    p.add_argument("-o", "--out", default="moa-flex-eval", help="output folder (text_eval.json, text_eval.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_eval)
    return ap


def _cmd_eval(args: argparse.Namespace) -> None:
    """Score the dense model, the plans and the uniform plans; print the table, write JSON and PNG."""
    from transformers import AutoTokenizer

    from .zoo.text_eval import documents, evaluate, plot

    if args.docs < 1 or any(n < 2 for n in args.lengths):
        raise ValueError("--docs must be >= 1 and every --lengths >= 2 tokens")
    if any(not 0 < d <= 1 for d in args.uniform):
        raise ValueError(f"--uniform densities must be in (0, 1], got {args.uniform}")
    model = _load_model(args.model_dir, args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    plans = {Path(p).name: Plan.load(p) for p in args.plans}
    for d in args.uniform:
        plans[f"uniform d={d}"] = Plan.uniform(model.config, alpha=0.0, beta=d, sink=args.sink)
    docs = {n: documents(tokenizer, _texts(args.text_dir), n, args.docs) for n in args.lengths}
    short = [n for n, d in docs.items() if len(d) < args.docs]
    if short:
        raise ValueError(f"the held-out text gives fewer than {args.docs} documents at lengths {short} tokens")
    result = evaluate(model, tokenizer, plans, docs, k=args.k, window=args.window, backend=args.backend,
                      progress=not args.quiet)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "text_eval.json"), "w") as f:
        json.dump(result.to_dict(), f, indent=1)
    plot(result, os.path.join(args.out, "text_eval.png"))
    print(result.table())
    print(f"wrote {args.out}/text_eval.json and text_eval.png")


def _texts(folder: str | None) -> Iterator[str]:
    """Held-out texts: every file under ``folder`` (sorted; not UTF-8: skipped), or the standard library."""
    from .data.code_corpus import heldout_files

    paths = heldout_files() if folder is None else sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for path in paths:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def _given(value: Any, default: Any) -> Any:
    """A demo flag's value, or the chosen model's default when the flag was not given."""
    return default if value is None else value


def _cmd_demo(args: argparse.Namespace) -> None:
    if args.model == "code":
        if args.kv_dtype is not None:
            raise ValueError("--kv-dtype scores the needle model's retrieval; the code demo does not take it")
        from .code_demo import DEFAULT_LENGTHS, DEFAULT_PROFILE_LENGTHS, CodeDemoConfig, run_code_demo

        run_code_demo(CodeDemoConfig(
            model_dir=args.model_dir, out=args.out or "moa-flex-demo-code", densities=args.densities,
            lengths=_given(args.lengths, DEFAULT_LENGTHS), docs=_given(args.samples, CodeDemoConfig.docs),
            profile_lengths=_given(args.profile_lengths, DEFAULT_PROFILE_LENGTHS),
            calibration_samples=_given(args.calibration_samples, CodeDemoConfig.calibration_samples),
            progress=not args.quiet, backend=args.backend))
        return
    from .demo import DEFAULT_LENGTHS, DEFAULT_PROFILE_LENGTHS, DemoConfig, run_demo

    run_demo(DemoConfig(model_dir=args.model_dir, out=args.out or "moa-flex-demo", densities=args.densities,
                        lengths=_given(args.lengths, DEFAULT_LENGTHS),
                        depths=args.depths, samples=_given(args.samples, DemoConfig.samples),
                        profile_lengths=_given(args.profile_lengths, DEFAULT_PROFILE_LENGTHS),
                        calibration_samples=_given(args.calibration_samples, DemoConfig.calibration_samples),
                        sink=args.sink, span_multiple=args.span_multiple,
                        min_span=args.min_span, progress=not args.quiet, backend=args.backend,
                        kv_dtype=args.kv_dtype))


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
