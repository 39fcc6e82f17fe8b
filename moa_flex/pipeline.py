"""``moa_flex.compress``: the whole MoA pipeline in one call, from a dense model to a plan.

    calibration (the dense model answers its own prompts)      moa_flex.data
      -> profile (attention influence by distance, per head)     moa_flex.profile
      -> optimize (the Pareto plans under a KV budget)           moa_flex.optimize
      -> select (validation loss on held-out samples, or the lowest profiled loss)

``moa-flex compress`` and ``moa-flex demo`` both call :func:`compress`. The returned plan's
meta holds every Pareto plan's scores (``meta["compress"]["plans"]``), so a caller can print
the table the CLI prints.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .data.calibration import calibration_set, synthetic_samples
from .data.samples import Sample, load_jsonl
from .optimize.budget import Budget
from .optimize.optimizer import optimize
from .optimize.problem import build_problem
from .optimize.solve import solve
from .optimize.validate import validate
from .plan import DEFAULT_MIN_SPAN, DEFAULT_SINK, DEFAULT_SPAN_MULTIPLE, ModelShape, Plan
from .profile.instrument import profile_model
from .profile.store import Profile

SELECTIONS = ("validation", "profiled")
DEFAULT_LENGTHS = (2048, 4096, 8192)

Data = str | os.PathLike | Sequence[Sample] | Mapping[int, Sequence[Sample]] | None


def _check(density: float | Budget, lengths: Sequence[int], select: str, samples_per_length: int,
           validation_samples: int, max_new_tokens: int) -> tuple[Budget, list[int]]:
    budget = density if isinstance(density, Budget) else None
    if budget is None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1] (KV slots relative to dense) or a Budget, got {density!r}")
        budget = Budget(density=float(density))
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be tokens >= 1, got {list(lengths)}")
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    for name, v in (("samples_per_length", samples_per_length), ("validation_samples", validation_samples),
                    ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return budget, lengths


def _prompts(model: Any, data: Data, tokenizer: Any, lengths: list[int], n: int, max_new_tokens: int,
             validation_len: int | None, validation_n: int) -> tuple[list[Sample] | dict, list[Sample]]:
    """(calibration prompts, or an answered calibration set as given; held-out validation prompts)."""
    if isinstance(data, Mapping):
        return dict(data), []
    if data is None:
        vocab = int(model.config.vocab_size)
        calib = synthetic_samples(vocab, max(lengths) - max_new_tokens, n, seed=0)
        val = synthetic_samples(vocab, validation_len - max_new_tokens, validation_n, seed=1) if validation_len else []
        return calib, val
    if isinstance(data, (str, os.PathLike)):
        if tokenizer is None:
            tokenizer = _tokenizer_of(model, data)
        data = load_jsonl(data, tokenizer)
    samples = list(data)
    if not all(isinstance(s, Sample) for s in samples):
        raise TypeError("data must be a JSONL path, a list of moa_flex.data.Sample, or {length: answered samples}")
    if not validation_len:
        return samples, []
    prompt = validation_len - max_new_tokens
    long_enough = [i for i, s in enumerate(samples) if s.prompt_len >= prompt]
    if len(long_enough) < validation_n:
        longest = max((s.prompt_len for s in samples), default=0)
        raise ValueError(f"{len(long_enough)} samples reach the validation length {validation_len} (a prompt of {prompt} "
                         f"tokens; the longest has {longest}), {validation_n} needed: lower validation_length or "
                         "validation_samples")
    held = set(long_enough[len(long_enough) - validation_n:])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def _tokenizer_of(model: Any, data: Any) -> Any:
    folder = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"text data ({data}) needs a tokenizer: pass tokenizer=, or load the model from a local folder "
                         "that has one")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"text data ({data}) needs a tokenizer and {folder} has none ({e})") from e


def _profile(model: Any, calib: dict, lengths: list[int], sink: int, span_multiple: int, profile: Any,
             progress: bool) -> Profile:
    """The profile at ``lengths``: the given Profile, or the file at ``profile`` (a path) when it
    holds these lengths for this model and data (written there otherwise)."""
    if isinstance(profile, Profile):
        profile.check_model(model)
        missing = [n for n in lengths if n not in profile.hist]
        if missing or (profile.sink, profile.span_multiple) != (sink, span_multiple):
            raise ValueError(f"the given profile has lengths {profile.lengths}, sink {profile.sink}, span_multiple "
                             f"{profile.span_multiple}; compress needs lengths {lengths}, sink {sink}, span_multiple "
                             f"{span_multiple}")
        return profile
    path = None if profile is None else Path(profile)
    partial = None if path is None else path.with_name(path.name + ".partial")
    if path is not None and path.exists():
        partial = path  # a finished profile resumes with every length done (same data, checked)
    result = profile_model(model, calib, lengths, sink=sink, span_multiple=span_multiple, progress=progress,
                           checkpoint_path=partial)
    if path is not None:
        result.save(path)
        if partial != path and partial.exists():
            partial.unlink()
    return result


def _scores(plans: list[Plan], lengths: list[int], validation_len: int | None) -> list[dict]:
    """Per Pareto plan: KV density and the optimizer's loss at every profiled length, and the
    validation loss when validated."""
    rows = []
    for i, p in enumerate(plans):
        row = {"index": i, "kv_density": {str(n): p.kv_density(n) for n in lengths},
               "profiled_loss": {str(n): p.meta.get("loss", {}).get(str(n)) for n in lengths}}
        if validation_len:
            row["validation_kv_density"] = p.kv_density(validation_len)
            row["validation_loss"] = p.meta["validation"]["loss"]
        rows.append(row)
    return rows


def compress(
    model: torch.nn.Module,
    *,
    density: float | Budget,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    data: Data = None,
    tokenizer: Any = None,
    samples_per_length: int = 8,
    max_new_tokens: int = 64,
    select: str = "validation",
    validation_length: int | None = None,
    validation_samples: int = 4,
    validation_data: Sequence[Sample] | None = None,
    sink: int = DEFAULT_SINK,
    span_multiple: int = DEFAULT_SPAN_MULTIPLE,
    min_span: int = DEFAULT_MIN_SPAN,
    max_rules_per_layer: int | None = 2,
    granularity: str | None = None,
    profile: Profile | str | os.PathLike | None = None,
    time_limit: float = 60.0,
    progress: bool = True,
    backend: str = "inductor",
) -> Plan:
    """The MoA plan of a dense HF causal LM (eval mode) under a KV budget.

    ``density``: KV-cache slots relative to dense at every profiled length (or a
    :class:`~moa_flex.optimize.budget.Budget`); ``lengths``: the profiled lengths (tokens).

    ``data``: the calibration prompts. None: synthetic key -> value lookups that need no
    tokenizer (:func:`moa_flex.data.synthetic_samples`); a JSONL path (``{"context",
    "question"}`` per line, tokenized by ``tokenizer`` or the model folder's own); a list of
    :class:`~moa_flex.data.Sample`; or an answered calibration set ``{length: samples}``
    (:func:`moa_flex.data.calibration_set`), used as is. The dense model answers every prompt
    itself (``max_new_tokens``, greedy), ``samples_per_length`` per length.

    ``select``: how the plan is picked from the Pareto set. ``"validation"`` (default): the
    lowest response loss (nats per answer token) on held-out samples at ``validation_length``
    tokens (default twice the longest profiled length): ``validation_samples`` synthetic ones
    (seed 1) or the last prompts of ``data`` that reach that length, or ``validation_data``.
    ``"profiled"``: the lowest profiled loss at the longest profiled length (no validation run).

    ``sink``, ``span_multiple``, ``min_span``, ``max_rules_per_layer``, ``granularity``: the
    plans' rule grid (:func:`moa_flex.optimize.optimize`). A rule's loss is exact when ``sink``
    is a multiple of ``span_multiple`` (the profile's distance bins then split exactly where a
    window ends; ``moa-flex compress`` requires it); otherwise bins are split at the multiple
    below the window's end, counting up to ``span_multiple`` distances as dropped that are kept.

    ``profile``: a :class:`~moa_flex.profile.Profile` to reuse (no profiling), or a path: a
    profile there for this model, data and binning is reused, else the run profiles and
    writes it there (and resumes from ``<path>.partial`` after a crash). ``progress``: tqdm
    bars and stage lines on stderr. ``backend``: how validation runs the plans
    (``moa_flex.compile``'s backend; 'eager' skips inductor's compile, for short samples). The budget is checked in seconds, before any profiling: a
    density no plan meets raises ValueError naming the smallest feasible one.

    Returns the selected plan; ``meta["compress"]`` records the run and every Pareto plan's
    scores (``plans``), ``meta["validation"]`` the validation.
    """
    from tqdm import tqdm

    t0 = time.time()
    budget, lengths = _check(density, lengths, select, samples_per_length, validation_samples, max_new_tokens)
    if getattr(model, "moa_flex", None) is not None:
        raise ValueError("compress profiles the dense model: call moa_flex.uncompile(model) first")
    shape = ModelShape.from_config(model.config)
    validation_len = None
    if select == "validation":
        validation_len = int(validation_length or 2 * max(lengths))
        if validation_len <= max_new_tokens:
            raise ValueError(f"validation_length {validation_len} leaves no prompt after max_new_tokens {max_new_tokens}")
    say = (lambda text: tqdm.write(text, file=sys.stderr)) if progress else (lambda text: None)  # noqa: E731
    opt_kw = dict(sink=sink, span_multiple=span_multiple, min_span=min_span, max_rules_per_layer=max_rules_per_layer,
                  granularity=granularity)
    # the budget depends on spans only: check it before any profiling (with zero losses)
    zeros = {n: torch.zeros(shape.num_layers, shape.num_heads, -(-n // span_multiple), dtype=torch.float64)
             for n in lengths}
    solve(build_problem(zeros, shape, budget, **opt_kw), lengths[0], time_limit=time_limit)

    calib_prompts, val_prompts = _prompts(model, data, tokenizer, lengths, samples_per_length, max_new_tokens,
                                          validation_len if validation_data is None else None, validation_samples)
    if validation_data is not None:
        val_prompts = list(validation_data)
    if validation_len and not val_prompts:
        raise ValueError("select='validation' needs held-out samples: pass validation_data= (an answered calibration "
                         "set as data holds none), or select='profiled'")
    say(f"moa-flex compress: {shape.num_layers} layers, {shape.num_heads} heads, {shape.num_kv_heads} KV heads; "
        f"budget {budget.to_dict()}; lengths {lengths}")
    if isinstance(calib_prompts, dict):
        calib = calib_prompts
        missing = [n for n in lengths if not calib.get(n)]
        if missing:
            raise ValueError(f"the calibration set has no samples for lengths {missing}")
    else:
        say("compress [1/4] calibration: the dense model answers its prompts")
        calib = calibration_set(model, calib_prompts, lengths, max_new_tokens=max_new_tokens,
                                max_per_length=samples_per_length, progress=progress)
    val = []
    if validation_len:
        unanswered = [s for s in val_prompts if s.answer.numel() == 0]
        val = [s for s in val_prompts if s.answer.numel()]
        if unanswered:
            val += calibration_set(model, unanswered, [validation_len], max_new_tokens=max_new_tokens,
                                   max_per_length=validation_samples, progress=progress)[validation_len]

    say("compress [2/4] profile")
    prof = _profile(model, calib, lengths, sink, span_multiple, profile, progress)

    say("compress [3/4] optimize")
    plans = optimize({n: prof.hist[n] for n in lengths}, model.config, budget, time_limit=time_limit,
                     progress=progress, **opt_kw)

    if validation_len:
        say(f"compress [4/4] validate {len(plans)} plan(s) on {len(val)} held-out samples of <= {validation_len} tokens")
        best, _ = validate(model, plans, val, length=validation_len, progress=progress, backend=backend)
        chosen_by = f"lowest validation loss at {validation_len} tokens"
    else:
        longest = str(max(lengths))
        best = min(plans, key=lambda p: p.meta["loss"][longest])
        chosen_by = f"lowest profiled loss at {longest} tokens"
    best.meta["compress"] = {
        "selected_by": chosen_by, "budget": budget.to_dict(), "lengths": lengths,
        "data": os.fspath(data) if isinstance(data, (str, os.PathLike)) else ("synthetic" if data is None
                                                                              else type(data).__name__),
        "samples": {str(n): len(calib[n]) for n in lengths}, "max_new_tokens": max_new_tokens,
        "validation_length": validation_len, "profile": str(profile) if isinstance(profile, (str, os.PathLike)) else None,
        "index": plans.index(best), "plans": _scores(plans, lengths, validation_len),
        "seconds": round(time.time() - t0, 1),
    }
    return best
