"""``moa-flex demo``: the whole MoA job on the shipped needle model, on a CPU, in minutes.

The shipped model (:mod:`moa_flex.zoo`, trained on :mod:`moa_flex.data.synthetic`) continues an
order-2 Markov filler, which takes local attention, and answers key -> value questions whose
record can sit anywhere in 1K-4K tokens, which takes retrieval across the whole context. The
demo:

1. writes calibration samples: synthetic prompts at each profiled length, their asked record
   at evenly spread needle depths, answered by the dense model itself (greedy), saved as
   ``calibration.jsonl`` (token ids);
2. runs :func:`moa_flex.compress` on them per KV density: the attention influence is profiled
   once (``profile.safetensors``), and each density's plan (``plan-moa-<d>.json``) is, of the
   Pareto set, the plan with the lowest profiled loss at the longest profiled length;
4. measures exact-match retrieval accuracy by length and needle depth (teacher forcing; each
   sequence asks one question per depth, one forward per batch) for the dense model, each MoA
   plan through ``moa_flex.compile`` and a uniform StreamingLLM-style plan at the same KV
   density (every head: the sink plus a window, span = density x N, so both hold the same
   cache at every length);
5. prints the table, writes ``results.json``, ``results.md`` and ``demo.png`` (accuracy
   heatmaps by length and depth, and the MoA plan's spans).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .data.calibration import answer_samples
from .data.samples import Sample
from .data.synthetic import make_sample
from .pipeline import compress
from .plan import Plan
from .runtime.compile import compile as compile_model
from .runtime.compile import uncompile

DEMO_SEED = 7_013  # calibration prompts: (DEMO_SEED, N, i); evaluation: zoo.evaluate's own seeds
DEFAULT_DENSITIES = (0.5, 0.25)
DEFAULT_LENGTHS = (1024, 2048, 3072, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_PROFILE_LENGTHS = (1024, 2048, 4096)
# Finer spans than a plan's defaults (64 / 64 / 128, sized for 4K-128K contexts): at 1K tokens a
# 128-token minimum span is 1/8 of every head's cache, which would leave a KV density of 0.25
# no room for the few heads that must see the whole context.
DEMO_SINK, DEMO_SPAN_MULTIPLE, DEMO_MIN_SPAN = 16, 32, 32


@dataclass
class DemoConfig:
    """What a demo run depends on (tokens for lengths, fractions for densities and depths)."""

    model_dir: str | None = None  # None: the shipped needle model
    out: str = "moa-flex-demo"
    densities: Sequence[float] = DEFAULT_DENSITIES
    lengths: Sequence[int] = DEFAULT_LENGTHS
    depths: Sequence[float] = DEFAULT_DEPTHS
    samples: int = 8  # evaluation sequences per length (one question per depth in each)
    profile_lengths: Sequence[int] = DEFAULT_PROFILE_LENGTHS
    calibration_samples: int = 6  # per profiled length
    sink: int = DEMO_SINK
    span_multiple: int = DEMO_SPAN_MULTIPLE
    min_span: int = DEMO_MIN_SPAN
    progress: bool = True
    backend: str = "inductor"  # moa_flex.compile's backend for the accuracy runs ('eager': tests, debugging)
    kv_dtype: str | None = None  # also score each MoA plan through a cache of this dtype ("fp8"; None: no)
    timings: dict = field(default_factory=dict)

    def check(self) -> None:
        if not self.densities or any(not 0 < d <= 1 for d in self.densities):
            raise ValueError(f"densities must be in (0, 1], got {list(self.densities)}")
        if not self.lengths or any(int(n) < 256 for n in self.lengths):
            raise ValueError(f"lengths must be >= 256 tokens, got {list(self.lengths)}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {list(self.depths)}")
        if self.samples < 1 or self.calibration_samples < 1:
            raise ValueError(f"samples and calibration_samples must be >= 1, got {self.samples}, {self.calibration_samples}")
        if not self.profile_lengths or any(int(n) < 256 for n in self.profile_lengths):
            raise ValueError(f"profile_lengths must be >= 256 tokens, got {list(self.profile_lengths)}")


def calibration_depths(per_length: int) -> list[float]:
    """Needle depths of the calibration samples of one length: evenly spread, (i + 0.5) / n."""
    return [(i + 0.5) / per_length for i in range(per_length)]


def calibration(model: Any, task: Any, lengths: Sequence[int], per_length: int, progress: bool) -> dict[int, list[Sample]]:
    """N -> samples of N tokens: a synthetic prompt of ``N - (V + 1)`` tokens per sample, its
    asked record at depths spread over the context (:func:`calibration_depths`, so the profile
    sees retrieval at every distance), with the dense model's own greedy answer (V value tokens
    + EOS at most)."""
    m = task.value_len + 1
    return {int(N): answer_samples(model, [make_sample(task, int(N) - m, (DEMO_SEED, int(N), i), depth=d)
                                           for i, d in enumerate(calibration_depths(per_length))],
                                   max_new_tokens=m, progress=progress)
            for N in lengths}


def save_calibration(samples: dict[int, list[Sample]], path: Path) -> None:
    """One JSON object per sample: length, prompt token ids, the model's answer token ids."""
    with open(path, "w") as f:
        for N, bucket in samples.items():
            for s in bucket:
                f.write(json.dumps({"length": N, "prompt": s.prompt_ids.tolist(), "answer": s.answer.tolist()}) + "\n")


def moa_plan(model: Any, calib: dict[int, list[Sample]], density: float, cfg: DemoConfig, profile_path: Path) -> Plan:
    """:func:`moa_flex.compress` at this KV density on the demo's calibration set: of the Pareto
    set, the plan with the lowest profiled loss at the longest profiled length. The profile is
    computed once (``profile_path``) and reused by the other densities."""
    best = compress(model, density=density, lengths=list(cfg.profile_lengths), data=calib, select="profiled",
                    sink=cfg.sink, span_multiple=cfg.span_multiple, min_span=cfg.min_span, profile=profile_path,
                    progress=cfg.progress)
    best.meta["demo"] = {"density": density, "chosen_by": best.meta["compress"]["selected_by"],
                         "pareto_size": len(best.meta["compress"]["plans"])}
    return best


def uniform_plan(config: Any, density: float, cfg: DemoConfig) -> Plan:
    """Every head the same rule: span = density x N (sink included), the StreamingLLM-style baseline."""
    return Plan.uniform(config, alpha=0.0, beta=density, granularity="kv_head", sink=cfg.sink,
                        span_multiple=cfg.span_multiple, min_span=cfg.min_span,
                        meta={"demo": {"density": density, "baseline": "uniform sink + window"}})


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo (module docstring); returns the results written to ``results.json``."""
    from .zoo import load_needle_model
    from .zoo.evaluate import retrieval_accuracy

    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, task = load_needle_model(cfg.model_dir)
    say = print
    say(f"moa-flex demo: {model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads, "
        f"{model.config.num_key_value_heads} KV heads; densities {list(cfg.densities)}; lengths {list(cfg.lengths)}")

    def lap(name: str) -> None:
        cfg.timings[name] = round(time.time() - t0 - sum(cfg.timings.values()), 1)

    say(f"[1/4] calibration: the dense model answers {cfg.calibration_samples} prompt(s) per length {list(cfg.profile_lengths)}")
    calib = calibration(model, task, cfg.profile_lengths, cfg.calibration_samples, cfg.progress)
    save_calibration(calib, out / "calibration.jsonl")
    lap("calibration")

    say("[2/4] profile and optimize (moa_flex.compress per density; one profile, reused)")
    plans: dict[str, Plan] = {}
    for d in cfg.densities:
        plans[f"MoA d={d}"] = moa_plan(model, calib, d, cfg, out / "profile.safetensors")
        plans[f"uniform d={d}"] = uniform_plan(model.config, d, cfg)
        plans[f"MoA d={d}"].save(out / f"plan-moa-{d}.json")
    lap("compress")

    acc_kw = dict(lengths=list(cfg.lengths), depths=list(cfg.depths), samples=cfg.samples, progress=cfg.progress,
                  per_sequence=True)
    say("[3/4] retrieval accuracy: dense model")
    results: dict[str, dict] = {"dense": retrieval_accuracy(model, task, **acc_kw)}
    lap("accuracy dense")

    say("[4/4] retrieval accuracy: MoA and uniform plans through moa_flex.compile")
    first = next(iter(plans.values()))
    compile_model(model, first, backend=cfg.backend, progress=cfg.progress)
    try:
        for name, plan in plans.items():
            model.moa_flex.set_plan(plan)
            results[name] = retrieval_accuracy(model, task, **acc_kw)
            results[name]["kv_density"] = [plan.kv_density(int(n)) for n in cfg.lengths]
            if cfg.kv_dtype is not None and name.startswith("MoA"):  # the same plan, answers read from the cache
                results[f"{name} {cfg.kv_dtype} cache"] = retrieval_accuracy(model, task, **acc_kw, kv_dtype=cfg.kv_dtype)
                results[f"{name} {cfg.kv_dtype} cache"]["kv_density"] = results[name]["kv_density"]
    finally:
        uncompile(model)
    lap("accuracy plans")
    results["dense"]["kv_density"] = [1.0] * len(cfg.lengths)

    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items() if k != "timings"},
        "results": results, "bars": bars(results, cfg), "timings_s": cfg.timings,
        "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
    }
    text = table(results, cfg)
    say(text)
    for line in summary["bars"]:
        say("-", line)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(text + "\n\n" + "\n".join(f"- {b}" for b in summary["bars"]) + "\n")
    try:
        plot(results, plans, cfg, out / "demo.png")
        say(f"wrote {out / 'demo.png'}")
    except ImportError:
        say("(no demo.png: plotting needs matplotlib: pip install 'moa-flex[plot]')")
    say(f"done in {summary['seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in cfg.timings.items())}); results in {out}/")
    return summary


def table(results: dict[str, dict], cfg: DemoConfig) -> str:
    """Markdown: per method, KV density at the longest length and accuracy by length and depth there."""
    L = list(cfg.lengths)
    head = ["method", f"KV density @{L[-1]}"] + [f"acc @{n}" for n in L] + [f"@{L[-1]} depth {d:g}" for d in cfg.depths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name, f"{r['kv_density'][-1]:.3f}"] + [f"{a:.0%}" for a in r["by_length"]] + [f"{a:.0%}" for a in r["accuracy"][-1]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bars(results: dict[str, dict], cfg: DemoConfig) -> list[str]:
    """Per density: MoA's accuracy at the longest length against the dense model's and the uniform plan's."""
    n = list(cfg.lengths)[-1]
    dense = results["dense"]["by_length"][-1]
    out = []
    for d in cfg.densities:
        moa, uni = results[f"MoA d={d}"]["by_length"][-1], results[f"uniform d={d}"]["by_length"][-1]
        keep = moa / dense if dense else float("nan")
        ratio = moa / uni if uni else float("inf")
        out.append(f"d={d} at {n} tokens: MoA {moa:.1%} = {keep:.0%} of dense ({dense:.1%}); uniform {uni:.1%}; "
                   f"MoA / uniform = {ratio:.2f}x" + (" (bars at d=0.25: >= 90% of dense, >= 1.5x uniform)" if d == 0.25 else ""))
        quant = results.get(f"MoA d={d} {cfg.kv_dtype} cache")
        if quant is not None:
            worse = [(n, dep) for n, a, b in zip(cfg.lengths, quant["accuracy"], results[f"MoA d={d}"]["accuracy"])
                     for dep, x, y in zip(cfg.depths, a, b) if x < y]
            out.append(f"d={d}, {cfg.kv_dtype} cache: {quant['overall']:.1%} overall against {results[f'MoA d={d}']['overall']:.1%}; "
                       + ("as accurate at every length and depth" if not worse else
                          f"lower at (length, depth) {worse}"))
    return out


def plot(results: dict[str, dict], plans: dict[str, Plan], cfg: DemoConfig, path: Path) -> None:
    """Accuracy heatmaps (length x depth) per method, and the spans of the sparsest MoA plan."""
    from matplotlib.figure import Figure

    names = list(results)
    fig = Figure(figsize=(3.0 * (len(names) + 1), 3.4), layout="constrained")
    axes = fig.subplots(1, len(names) + 1)
    for ax, name in zip(axes, names):
        im = ax.imshow(torch.tensor(results[name]["accuracy"]).numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_yticks(range(len(cfg.lengths)), [str(n) for n in cfg.lengths])
        ax.set_xticks(range(len(cfg.depths)), [f"{d:g}" for d in cfg.depths])
        ax.set_xlabel("needle depth")
    axes[0].set_ylabel("length (tokens)")
    fig.colorbar(im, ax=axes[len(names) - 1], label="retrieval accuracy")
    d = min(cfg.densities)
    plan, n = plans[f"MoA d={d}"], int(list(cfg.lengths)[-1])
    im2 = axes[-1].imshow(plan.spans(n).numpy(), cmap="viridis", vmin=0, vmax=n, aspect="auto")
    axes[-1].set_title(f"MoA d={d}: span at {n}", fontsize=9)
    axes[-1].set_xlabel("KV-head group")
    axes[-1].set_ylabel("layer")
    fig.colorbar(im2, ax=axes[-1], label="span (tokens)")
    fig.savefig(os.fspath(path), dpi=100)
