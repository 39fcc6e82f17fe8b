"""``moa-flex demo --model code``: the whole MoA job on the shipped code model, on real text.

The code model (``moa_flex/zoo/code``, :mod:`moa_flex.zoo.train_code`) was trained on the
Python sources of one machine's installed packages; the Python standard library is held out.
The demo:

1. calibration prompts: real Python from this machine's installed packages
   (:func:`moa_flex.data.code_samples`, the model's training distribution), answered by the
   dense model itself (its own greedy continuation of the code);
2. :func:`moa_flex.compress` per KV density with its defaults (profile once, reused; the
   Pareto plan with the lowest held-out response loss at twice the longest profiled length);
3. :func:`moa_flex.zoo.text_eval.evaluate` on held-out standard-library documents: bits per
   byte, far-copy tokens (natural retrieval) and effective context for the dense model, each
   MoA plan and a uniform sink + window plan of the same KV density;
4. prints the table and the quality bars, writes ``results.json``, ``results.md`` and
   ``demo.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .plan import Plan

DEFAULT_DENSITIES = (0.5, 0.25)
DEFAULT_PROFILE_LENGTHS = (1024, 2048)
DEFAULT_LENGTHS = (1024, 2048, 4096)


@dataclass
class CodeDemoConfig:
    """What a code-demo run depends on (tokens for lengths, fractions for densities)."""

    model_dir: str | None = None  # None: the shipped code model
    out: str = "moa-flex-demo-code"
    densities: Sequence[float] = DEFAULT_DENSITIES
    lengths: Sequence[int] = DEFAULT_LENGTHS  # held-out document lengths
    docs: int = 4  # held-out documents per length
    profile_lengths: Sequence[int] = DEFAULT_PROFILE_LENGTHS
    calibration_samples: int = 4  # per profiled length
    validation_samples: int = 2  # held-out prompts that choose among the Pareto plans
    max_new_tokens: int = 64  # tokens of each continuation the dense model writes
    roots: Sequence[str] | None = None  # site-packages folders of the calibration code (None: this interpreter's)
    spans: dict = field(default_factory=dict)  # sink / span_multiple / min_span for compress (empty: its defaults)
    backend: str = "inductor"
    progress: bool = True
    timings: dict = field(default_factory=dict)

    def check(self) -> None:
        if not self.densities or any(not 0 < d <= 1 for d in self.densities):
            raise ValueError(f"densities must be in (0, 1], got {list(self.densities)}")
        for name in ("lengths", "profile_lengths"):
            values = getattr(self, name)
            if not values or any(int(n) <= self.max_new_tokens for n in values):
                raise ValueError(f"{name} must be > max_new_tokens ({self.max_new_tokens}) tokens, got {list(values)}")
        for name in ("docs", "calibration_samples", "validation_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_code_model(path: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a code-model folder (the shipped one when ``path`` is None), in
    eval mode, fp32, sdpa attention. ValueError naming what is missing."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .zoo.train_code import CODE_DIR

    folder = Path(CODE_DIR if path is None else path)
    hint = f"train one with `python -m moa_flex.zoo.train_code --out {folder}` (on a GPU)"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} has no {name}: not a trained code-model folder; {hint}")
    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="sdpa")
    return model.float().eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def run_code_demo(cfg: CodeDemoConfig, bars_at: int | None = None) -> dict:
    """Run the code demo (module docstring); returns what ``results.json`` holds. ``bars_at``:
    the length (tokens) of the quality bars (default the longest evaluated)."""
    from .data import code_samples
    from .data.code_corpus import heldout_files
    from .pipeline import compress
    from .zoo.text_eval import documents, evaluate, plot

    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tokenizer = load_code_model(cfg.model_dir)
    c = model.config
    print(f"moa-flex demo (code): {c.num_hidden_layers} layers, {c.num_attention_heads} heads, {c.num_key_value_heads} KV "
          f"heads; densities {list(cfg.densities)}; held-out lengths {list(cfg.lengths)}")

    def lap(name: str) -> None:
        cfg.timings[name] = round(time.time() - t0 - sum(cfg.timings.values()), 1)

    longest = 2 * max(int(n) for n in cfg.profile_lengths)  # compress's default validation length
    print(f"[1/3] calibration: {cfg.calibration_samples} + {cfg.validation_samples} prompts of installed Python sources")
    prompts = code_samples(tokenizer, longest - cfg.max_new_tokens, cfg.calibration_samples + cfg.validation_samples,
                           roots=cfg.roots, progress=cfg.progress)
    lap("calibration prompts")

    print("[2/3] moa_flex.compress per density (one profile, reused)")
    plans: dict[str, Plan] = {}
    for d in cfg.densities:
        best = compress(model, density=d, lengths=[int(n) for n in cfg.profile_lengths], data=prompts,
                        samples_per_length=cfg.calibration_samples, validation_samples=cfg.validation_samples,
                        max_new_tokens=cfg.max_new_tokens, profile=out / "profile.safetensors", progress=cfg.progress,
                        backend=cfg.backend, **cfg.spans)
        best.save(out / f"plan-moa-{d}.json")
        plans[f"MoA d={d}"] = best
        plans[f"uniform d={d}"] = Plan.uniform(c, alpha=0.0, beta=d, granularity="kv_head", **cfg.spans)
    lap("compress")

    print(f"[3/3] held-out standard library: {cfg.docs} documents per length, dense and every plan")
    texts = (p.read_text(encoding="utf-8") for p in heldout_files())
    docs = {int(n): documents(tokenizer, texts, int(n), cfg.docs) for n in cfg.lengths}
    result = evaluate(model, tokenizer, plans, docs, backend=cfg.backend, progress=cfg.progress)
    lap("evaluate")

    bars = result.bars(cfg.densities, bars_at or max(docs))
    summary = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items() if k != "timings"},
               "results": result.to_dict(), "bars": bars, "timings_s": cfg.timings,
               "seconds": round(time.time() - t0, 1)}
    text = result.table()
    print(text)
    for line in bars:
        print("-", line)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(text + "\n\n" + "\n".join(f"- {b}" for b in bars) + "\n")
    try:
        plot(result, str(out / "demo.png"))
        print(f"wrote {out / 'demo.png'}")
    except ImportError:
        print("(no demo.png: plotting needs matplotlib: pip install 'moa-flex[plot]')")
    print(f"done in {summary['seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in cfg.timings.items())}); "
          f"results in {out}/")
    return summary
