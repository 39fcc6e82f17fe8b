"""``model.moa_flex.warmup(batch_size, max_length)``: compile and capture before the first request.

A server should not make its first user wait for compilation. Warm-up runs one greedy
``generate`` of a short random prompt through the compiled model, planned for ``max_length``
tokens at ``batch_size`` rows: it traces and compiles the prefill graph over a MoaCache (the
graph every chunk of every later prompt runs, whatever its length: shapes are dynamic), the
decode-step graph, the Triton kernels, and (``mode="reduce-overhead"``) captures the decode
step's CUDA graph. Its cache stays in ``model.moa_flex.cache``; the next request of the same
layout (rows, planned length, padding) reuses it and its captured step graph.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moa_flex.architecture import layer_placement

WARMUP_PROMPT = 64  # tokens: long enough for a real prefill chunk, short enough to cost nothing
WARMUP_NEW = 5  # generated tokens: prefill + 4 decode steps (the step graph is captured at the third)


def warmup(model: torch.nn.Module, state: Any, batch_size: int = 1, max_length: int | None = None) -> float:
    """Run one warm-up request; returns its seconds. ``state``: the model's
    :class:`~moa_flex.runtime.state.CompiledState` (not imported here: it calls this).

    ``max_length``: compile's ``max_length`` (checked; None takes it). A model compiled
    without one plans each request for its own length and allocates its cache per request:
    warm-up then compiles the graphs (which serve every length) and keeps no cache to reuse.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (rows), got {batch_size!r}")
    planned = state.max_length
    if max_length is not None and planned is not None and max_length != planned:
        raise ValueError(f"warmup max_length={max_length} differs from compile's max_length={planned}: every request "
                         "is planned for compile's")
    if planned is not None and planned < WARMUP_NEW + 2:
        raise ValueError(f"compile's max_length={planned} leaves no room for a warm-up request "
                         f"(>= {WARMUP_NEW + 2} tokens)")
    prompt = WARMUP_PROMPT if planned is None else min(WARMUP_PROMPT, planned - WARMUP_NEW)
    devices, _ = layer_placement(model, state.plan.model)
    device = model.get_input_embeddings().weight.device if hasattr(model, "get_input_embeddings") else devices[0]
    vocab = int(model.config.vocab_size)
    ids = torch.randint(1, vocab, (batch_size, prompt), device=device, generator=torch.Generator(device).manual_seed(0))
    t0 = time.perf_counter()
    with state.log.phase(f"warm-up request ({batch_size} x {prompt} tokens, planned for {planned or prompt + WARMUP_NEW})"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=WARMUP_NEW,
                       min_new_tokens=WARMUP_NEW, do_sample=False, pad_token_id=0)
    state.save_compiled()
    return time.perf_counter() - t0
