"""The first-call guard: moa-flex's attention, with dense spans, against the model's own call.

``moa_flex.compile(..., verify=True)`` (the default) checks, on the first call of every new
prefill graph, that each layer's rewritten attention reproduces the model's own attention
call when the plan keeps everything: the pass keeps the traced SDPA call beside its
replacement in a copy of the graph, that copy runs once, eagerly, on the call's real inputs,
and per layer :func:`check_close` compares moa-flex attention run with dense spans (the same
mask, scale and grouping as the rewrite; no soft-cap, since the traced SDPA call has none)
with the SDPA call's output, over the real (not padding) query rows. A difference beyond
the dtype's tolerance raises :class:`VerifyError` naming the layer: the rewrite does not
reproduce this model, and no result of it is returned.

What runs it: plain forwards (``moa_flex::attention``) and the first chunk of a prefill
onto an empty MoaCache (``moa_flex::chunk_prefill``; later chunks attend a cache the SDPA call
never saw). Decode steps attend one token in the traced graph: nothing to compare. Layers
whose check would hold more than :data:`MAX_SCORES` attention scores are skipped and said
(the eager dense run holds them all): warm up with a short call (``model.moa_flex.warmup``).
Cost: one eager run of the model with two extra attentions per layer, once per graph.
"""

from __future__ import annotations

import torch

MAX_SCORES = 2**27  # B * H * Q * K of one layer's check (512 MiB of fp32 scores)
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-8, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class VerifyError(ValueError):
    """moa-flex's rewritten attention does not reproduce the model's own attention call."""


class Outcome:
    """What the checks of one verified call found (filled by the ops, read by the backend)."""

    def __init__(self) -> None:
        self.checked: list[tuple[int, float]] = []  # (layer, max abs difference)
        self.skipped: list[tuple[int, str]] = []  # (layer, why)


CURRENT: list[Outcome] = []  # the outcome of the verified call in progress (a stack)


def record_skip(layer: int, why: str) -> None:
    if CURRENT:
        CURRENT[-1].skipped.append((layer, why))


def too_large(layer: int, *sizes: int) -> bool:
    """True (and the skip recorded) when a check over ``prod(sizes)`` scores exceeds :data:`MAX_SCORES`."""
    n = 1
    for s in sizes:
        n *= int(s)
    if n > MAX_SCORES:
        record_skip(layer, f"{n} scores > {MAX_SCORES}")
        return True
    return False


def check_close(got: torch.Tensor, want: torch.Tensor, real: torch.Tensor | None, layer: int, what: str) -> None:
    """Compare [B, H, Q, Dv] outputs over the real query rows ``real`` [B, Q] (None: all);
    VerifyError beyond the dtype's tolerance (absolute and relative)."""
    if want.dim() == 3 and got.dim() == 4 and want.shape == (got.shape[0] * got.shape[1], *got.shape[2:]):
        want = want.view(got.shape)  # a model's own bmm attention: [B * H, Q, Dv] (passes/eager_attention.py)
    tol = TOLERANCE.get(want.dtype, 3e-2)
    diff = (got.float() - want.float()).abs()
    bound = tol + tol * want.float().abs()
    bad = diff > bound
    if real is not None:
        keep = real.bool().view(real.shape[0], 1, real.shape[1], 1)
        bad = bad & keep
        diff = diff.masked_fill(~keep, 0.0)
    worst = float(diff.max()) if diff.numel() else 0.0
    if bool(bad.any()):
        raise VerifyError(
            f"moa-flex verify: layer {layer}'s rewritten attention ({what}) with dense spans differs from the model's "
            f"own attention call by up to {worst:.3g} (tolerance {tol:g} for {want.dtype}) on this call's inputs: "
            "moa-flex does not reproduce this model's attention, so none of its results is returned. Please report it "
            "with the model's config; moa_flex.compile(..., verify=False) skips this check."
        )
    if CURRENT:
        CURRENT[-1].checked.append((layer, worst))
