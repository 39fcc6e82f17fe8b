"""Calibration sets: prompts at each profiled length, answered by the dense model itself.

Sources of prompts: :func:`moa_flex.data.samples.load_jsonl` (text, needs a tokenizer) or
:func:`synthetic_samples`, token-level key -> value lookups over Markov filler that need no
tokenizer (:mod:`moa_flex.data.synthetic` defines the format).

:func:`calibration_set` buckets samples by length: for each length N, every sample whose
prompt reaches ``N - max_new_tokens`` tokens is trimmed to that prompt length and answered
(greedy, at most ``max_new_tokens`` tokens), so each answered sample has at most N tokens.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from .samples import Sample
from .synthetic import Task, make_sample, task_for_vocab


# --------------------------------------------------------------------------------------------
# Built-in synthetic long-context lookups (token level, no tokenizer)


def synthetic_samples(vocab_size: int, length: int, n: int, seed: int = 0, *, num_records: int = 8,
                      task: Task | None = None) -> list[Sample]:
    """``n`` token-level lookup prompts of exactly ``length`` tokens each, from
    :mod:`moa_flex.data.synthetic` (Markov filler with ``num_records`` key -> value records; one
    question asking a record's key at a uniform depth): sample ``i`` is
    ``make_sample(task, length, seed=(seed, i), num_records=num_records)``.

    ``task`` defaults to :func:`moa_flex.data.synthetic.task_for_vocab` (the default task when it
    fits in ``vocab_size``, so a model trained on it is calibrated on its own task; a scaled-down
    one otherwise). ValueError if the vocabulary or the length is too small. Deterministic in ``seed``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if task is None:
        task = task_for_vocab(vocab_size, num_records)
    elif task.vocab_size > vocab_size:
        raise ValueError(f"the task uses {task.vocab_size} tokens, more than vocab_size {vocab_size}")
    return [make_sample(task, length, seed=(seed, i), num_records=num_records) for i in range(n)]


# --------------------------------------------------------------------------------------------
# The dense model's own answers


@torch.no_grad()
# --------------------------------------------------------------------------------------------
# Real code (the code model's training distribution)


def code_samples(tokenizer: Any, length: int, n: int, seed: int = 0, *,
                 roots: Sequence[str] | None = None, progress: bool = False) -> list[Sample]:
    """``n`` prompts of ``length`` tokens of real Python: the installed packages' sources
    (:func:`moa_flex.data.code_corpus.training_files` of ``roots``, default this interpreter's
    site-packages; the standard library excluded, filtered and deduplicated by
    :func:`~moa_flex.data.code_corpus.build_corpus`), in a seeded order, each file as
    ``bos tokens eos`` as the code model was trained, concatenated and cut into consecutive
    pieces. Each sample is all context (empty head and question): the dense model's answer
    is its own continuation of the code. ValueError if the files do not fill ``n`` prompts."""
    import numpy as np

    from .code_corpus import build_corpus, file_hashes, heldout_files, training_files

    if n < 1 or length < 2:
        raise ValueError(f"need n >= 1 and length >= 2 tokens, got n={n}, length={length}")
    corpus = build_corpus(training_files(roots), exclude_sha256=file_hashes(heldout_files()), roots=roots,
                          progress=progress)
    texts = list(corpus.documents())
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: list[Sample] = []
    buf: list[int] = []
    for i in np.random.default_rng([seed, 0xC0DE]).permutation(len(texts)).tolist():
        ids = _encode(tokenizer, texts[i])
        buf += ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        while len(buf) >= length and len(out) < n:
            out.append(Sample(torch.zeros(0, dtype=torch.long), torch.tensor(buf[:length]), torch.zeros(0, dtype=torch.long)))
            buf = buf[length:]
        if len(out) == n:
            return out
    raise ValueError(f"the installed Python sources ({len(texts)} files) fill only {len(out)} of {n} prompts of "
                     f"{length} tokens")


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a whole file (no special tokens), without transformers' warning about
    texts longer than the model's context: prompts are cut to length afterwards."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def answer_samples(model: Any, samples: Iterable[Sample], *, max_new_tokens: int = 64, progress: bool = True) -> list[Sample]:
    """Each sample with the dense model's own greedy answer (1 to ``max_new_tokens`` tokens, EOS
    included when generated), from the stock ``model.generate``, one sample at a time."""
    from tqdm import tqdm

    if getattr(model, "moa_flex", None) is not None:
        raise ValueError("answers must come from the dense model: call moa_flex.uncompile(model) first")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    out = []
    samples = list(samples)
    for s in tqdm(samples, desc="answers", leave=False, disable=not progress):
        ids = s.prompt_ids.to(device).unsqueeze(0)
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=1,
            do_sample=False, num_beams=1, pad_token_id=0 if pad is None else pad,
        )
        out.append(s.with_answer(gen[0, ids.shape[1]:].cpu()))
    return out


def calibration_set(
    model: Any, samples: Sequence[Sample], lengths: Sequence[int], *, max_new_tokens: int = 64,
    max_per_length: int | None = None, progress: bool = True,
) -> dict[int, list[Sample]]:
    """Length N (tokens) -> answered samples of at most N tokens: every sample whose prompt has
    at least ``N - max_new_tokens`` tokens, trimmed to that (middle of the context removed) and
    answered by the dense model (:func:`answer_samples`). At most ``max_per_length`` per length.
    ValueError naming the length if none reaches it."""
    result = {}
    for N in sorted(int(n) for n in lengths):
        P = N - max_new_tokens
        if P < 1:
            raise ValueError(f"length {N} leaves no prompt after max_new_tokens={max_new_tokens}")
        bucket = [s.trimmed(P) for s in samples if s.prompt_len >= P][:max_per_length]
        if not bucket:
            longest = max((s.prompt_len for s in samples), default=0)
            raise ValueError(f"no sample reaches length {N} (needs a prompt of {P} tokens; the longest has {longest})")
        result[N] = answer_samples(model, bucket, max_new_tokens=max_new_tokens, progress=progress)
    return result
