"""Retrieval accuracy of a model on a synthetic task, by context length and needle depth."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from ..data.synthetic import Task, batch_correct, default_num_records, make_batch

EVAL_SEED_TAG = 1_000_003  # eval seeds are (seed, tag, length, depth index): never a training seed (seed, step)


def eval_records(task: Task, length: int, spacing: int, questions: int = 1) -> int:
    """Records in an evaluation sequence of ``length`` tokens ending with ``questions`` questions
    (each asking a record placed at a given depth): one per ``spacing`` context tokens."""
    C = length - 1 - questions * task.qa_len
    return default_num_records(task, C, questions, placed=questions, spacing=spacing)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> Any:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _correct(model: Any, batch: Any, rows: int, device: torch.device, amp_dtype: torch.dtype | None,
             kv_dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Float [B, n]: 1 where question q of row b is answered exactly (teacher forced), ``rows`` rows per forward;
    ``kv_dtype``: through a MoA cache of that dtype (:func:`_cache_logits`)."""
    out = []
    for lo in range(0, batch.input_ids.shape[0], rows):
        part = batch.rows(lo, lo + rows)
        ids = part.input_ids.to(device)
        with _autocast(device, amp_dtype):
            logits = (model(input_ids=ids, use_cache=False).logits if kv_dtype is None
                      else _cache_logits(model, ids, kv_dtype))
        out.append(batch_correct(logits, part).float().cpu())
    return torch.cat(out)


def _cache_logits(model: Any, ids: torch.Tensor, kv_dtype: torch.dtype | str) -> torch.Tensor:
    """Every position's logits of a prefill onto a fresh MoA cache stored in ``kv_dtype`` (a
    model compiled by moa_flex): each query reads keys and values as that cache holds them, as
    decoding would (an FP8 cache: dequantized), not the exact ones a cacheless forward uses."""
    from moa_flex.runtime.generate import new_cache

    state = getattr(model, "moa_flex", None)
    if state is None:
        raise ValueError("evaluating through a MoA cache (kv_dtype=...) needs a model compiled by moa_flex.compile")
    cache = new_cache(model, state, ids.shape[0], ids.shape[1], kv_dtype)
    return model(input_ids=ids, use_cache=True, logits_to_keep=0, **{state.cache_arg: cache}).logits


@torch.no_grad()
def retrieval_accuracy(
    model: Any, task: Task, lengths: Sequence[int], depths: Sequence[float], samples: int, *, seed: int = 0,
    record_spacing: int = 64, batch_tokens: int = 65536, amp_dtype: torch.dtype | None = None, progress: bool = True,
    per_sequence: bool = False, kv_dtype: torch.dtype | str | None = None,
) -> dict:
    """Exact-match retrieval accuracy by teacher forcing (one forward per batch): for each length
    (tokens, answer included) and depth, ``samples`` sequences with one question whose record
    sits at that depth, among one record per ``record_spacing`` context tokens.

    ``per_sequence``: instead, ``samples`` sequences per length, each ending with one question
    per depth (in the order of ``depths``, every answer teacher forced), so one forward scores
    every depth: ``len(depths)`` times less compute, each question seeing the earlier
    questions and answers (at most ``(len(depths) - 1) * (K + V + 2)`` tokens) before it.

    ``kv_dtype`` (a model compiled by moa_flex): every forward prefills a fresh MoA cache stored
    in that dtype and reads the logits of that prefill, so the answers see the cache's values
    (an FP8 cache's dequantized keys and values), as generation would.

    Returns ``{"lengths", "depths", "samples", "accuracy": [[per depth] per length],
    "by_length": [...], "by_depth": [...], "overall"}`` (fractions in [0, 1])."""
    from tqdm import tqdm

    if samples < 1 or not lengths or not depths:
        raise ValueError(f"need samples >= 1 and at least one length and depth, got {samples}, {list(lengths)}, {list(depths)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    table = []
    bar = tqdm(total=len(lengths) * len(depths), desc="eval", leave=False, disable=not progress)
    if per_sequence:
        bar.total = len(lengths)
    for L in lengths:
        rows = max(1, batch_tokens // L)
        if per_sequence:
            R = eval_records(task, L, record_spacing, len(depths))
            batch = make_batch(task, samples, L, (seed, EVAL_SEED_TAG, L, len(depths)), num_questions=len(depths),
                               num_records=R, depth=list(depths))
            table.append((_correct(model, batch, rows, device, amp_dtype, kv_dtype).sum(0) / samples).tolist())
            bar.update()
            continue
        R = eval_records(task, L, record_spacing)
        accs = []
        for di, d in enumerate(depths):
            batch = make_batch(task, samples, L, (seed, EVAL_SEED_TAG, L, di), num_questions=1, num_records=R, depth=d)
            accs.append(int(_correct(model, batch, rows, device, amp_dtype, kv_dtype).sum()) / samples)
            bar.update()
        table.append(accs)
    bar.close()
    model.train(was_training)
    return {
        "lengths": list(lengths), "depths": list(depths), "samples": samples, "record_spacing": record_spacing,
        "per_sequence": per_sequence,
        "accuracy": table,
        "by_length": [sum(r) / len(r) for r in table],
        "by_depth": [sum(r[i] for r in table) / len(table) for i in range(len(depths))],
        "overall": sum(map(sum, table)) / (len(lengths) * len(depths)),
    }
