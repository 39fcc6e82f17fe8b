"""Validation: score plans by the response loss on held-out samples, pick the best.

Each plan of a Pareto set (:func:`moa_flex.optimize.optimize`) is run through
``moa_flex.compile`` (compiled once; plans are switched with ``model.moa_flex.set_plan``) on
held-out answered samples, usually longer than the profiled lengths. The score is the
profiler's loss (:func:`moa_flex.profile.instrument.answer_loss`): the mean cross-entropy of the dense
model's own answer tokens, in nats per token, averaged over the samples. Every sample is one
forward without cache, planned for its own length (prompt + answer tokens).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from moa_flex.data.samples import Sample
from moa_flex.plan import Plan
from moa_flex.profile.instrument import answer_loss


@torch.no_grad()
def response_loss(model: torch.nn.Module, samples: Sequence[Sample], *, progress: bool = False, desc: str = "loss") -> float:
    """Mean over ``samples`` of each sample's mean answer-token cross-entropy (nats per token),
    from ``model`` as it is (dense or compiled by moa_flex); one forward per sample, no cache."""
    from tqdm import tqdm

    samples = _check_samples(samples)
    total = 0.0
    for s in tqdm(samples, desc=desc, leave=False, disable=not progress):
        total += float(answer_loss(model, s))
    return total / len(samples)


def _check_samples(samples: Sequence[Sample]) -> list[Sample]:
    samples = list(samples)
    if not samples:
        raise ValueError("validation needs at least one sample, got none")
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise TypeError(f"samples[{i}] must be a moa_flex.data.Sample, got {type(s).__name__}")
        if s.answer.numel() == 0:
            raise ValueError(f"samples[{i}] has no answer tokens: answer it first (moa_flex.data.calibration.answer_samples "
                             "or calibration_set)")
    return samples


def validate(
    model: torch.nn.Module,
    plans: Sequence[Plan],
    samples: Sequence[Sample],
    *,
    length: int | None = None,
    progress: bool = True,
    backend: str = "inductor",
) -> tuple[Plan, list[float]]:
    """Score every plan by :func:`response_loss` on ``samples`` and return ``(best, losses)``.

    ``best`` is the plan of lowest loss (the first one on ties); ``losses[i]`` is plan i's loss
    (nats per answer token). Each plan's meta gets ``validation = {"length", "samples", "loss",
    "dense_loss", "rank"}`` (rank 1 = best; ``length``: the recorded validation length in
    tokens, default the longest sample); the best plan's also ``"chosen": True`` and
    ``"scores"``: every plan's index, loss, rank and kv_density at that length. ``dense_loss``
    is the stock model's loss (for a model already compiled by moa_flex: a dense plan's).

    The model is compiled with ``moa_flex.compile(model, plans[0], backend=backend)`` unless it
    already is (then its compile is reused and its plan put back at the end); a model this call
    compiled is uncompiled at the end, also on error.
    """
    from tqdm import tqdm

    from moa_flex.runtime.compile import compile as moa_compile
    from moa_flex.runtime.compile import uncompile

    plans = list(plans)
    if not plans:
        raise ValueError("validate needs at least one plan, got none")
    for i, p in enumerate(plans):
        if not isinstance(p, Plan):
            raise TypeError(f"plans[{i}] must be a moa_flex.Plan, got {type(p).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; validate expects a transformers model")
    for i, p in enumerate(plans):
        try:
            p.check_model(config)
        except ValueError as e:
            raise ValueError(f"plans[{i}]: {e}") from None
    samples = _check_samples(samples)
    if length is None:
        length = max(s.num_tokens for s in samples)
    elif isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an integer >= 1 (tokens), got {length!r}")

    state = getattr(model, "moa_flex", None)
    ours = state is None
    if ours:
        dense = response_loss(model, samples, progress=progress, desc="dense")
        moa_compile(model, plans[0], backend=backend, progress=progress)
        before = None
    else:
        before = state.plan
    losses: list[float] = []
    try:
        if not ours:
            model.moa_flex.set_plan(Plan.dense(before.model, granularity=before.granularity))
            dense = response_loss(model, samples, progress=progress, desc="dense")
        for i, p in enumerate(tqdm(plans, desc="validate plans", disable=not progress)):
            model.moa_flex.set_plan(p)
            losses.append(response_loss(model, samples, progress=progress, desc=f"plan {i}"))
    finally:
        if ours:
            uncompile(model)
        else:
            model.moa_flex.set_plan(before)

    for i, v in enumerate(losses):
        if not math.isfinite(v):
            raise ValueError(f"plan {i} has a non-finite validation loss ({v}); the model or plan is broken")
    order = sorted(range(len(plans)), key=lambda i: (losses[i], i))
    rank = {i: r + 1 for r, i in enumerate(order)}
    best = order[0]
    for i, p in enumerate(plans):
        p.meta["validation"] = {"length": length, "samples": len(samples), "loss": losses[i], "dense_loss": dense,
                                "rank": rank[i]}
    plans[best].meta["validation"]["chosen"] = True
    plans[best].meta["validation"]["scores"] = [
        {"index": i, "loss": losses[i], "rank": rank[i], "kv_density": p.kv_density(length),
         "pareto": p.meta.get("pareto", {}).get("index") if isinstance(p.meta.get("pareto"), dict) else None}
        for i, p in enumerate(plans)
    ]
    return plans[best], losses
