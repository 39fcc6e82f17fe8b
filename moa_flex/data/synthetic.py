"""Synthetic long-context tasks at the token level (no tokenizer): Markov filler + key -> value lookups.

A :class:`Task` fixes the vocabulary, the record format and the filler's Markov chain; a sample
seed fixes one sequence. The same task (same fields, seed included) always gives the same
chain, so a model trained on a task and a demo that rebuilds it from ``task.json`` agree.

Vocabulary (token ids, K = ``key_len``, V = ``value_len``)::

    0 BOS   1 EOS   2 REC   3 QUESTION                              (4 special tokens)
    [4, 4 + num_keys)                               key tokens
    [key_end, key_end + num_values)                 value tokens
    [value_end, value_end + num_filler)             filler tokens      (vocab_size = filler_end)

Record (width ``W = K + V + 1`` tokens)::

    REC k_1 .. k_K v_1 .. v_V

Question (``K + 1`` tokens), and a question with its answer (``K + V + 2`` tokens)::

    QUESTION k_1 .. k_K                         QUESTION k_1 .. k_K v_1 .. v_V EOS

The value follows its key directly, in the record and in the answer, so answering is the
induction pattern (find the earlier occurrence of the key, copy what followed it) with no
marker token in between. Format 1 (``moa-flex.synthetic-task/1``) put ``SEP`` between key and
value and ``ANSWER`` after the question's key, so the answer needed two hops more.

A sequence is ``BOS``, then a context of ``C`` tokens, then ``n`` questions. The context is
filler with ``R`` records at non-overlapping places; the records' keys are distinct K-tuples
of key tokens, their values independent uniform V-tuples of value tokens. Each question asks
the key of a distinct record of the same sequence; in a training sequence (:func:`make_batch`)
every question is followed by its answer and EOS. A calibration :class:`~moa_flex.data.samples.Sample`
(:func:`make_sample`) is ``head = [BOS]``, ``context`` = the C context tokens, ``question`` =
the first ``n - 1`` questions with their answers and the last question without its answer;
its ``answer`` is empty (the profiled model writes its own).

Needle depth of a record: its first token's offset in the context over ``C - W``, so 0 is a
record at the very start of the context and 1 one that ends where the context ends.

The filler is one run of an order-2 Markov chain on the F = ``num_filler`` filler tokens
(local indices 0..F-1), read through the records (the record tokens are not part of it): the
first two filler tokens of a sequence are uniform, each later one depends on the previous two.
Pair ``(a, b)`` (index ``p = a * F + b``) has S = ``successors`` distinct successors, each with
probability ``c_i / 16`` (integers ``c_i >= 1``, summing to 16). Both are derived from the task
seed by a counter hash, so they never depend on a library's random number generator:

    mix(x_0, x_1, ..)  = h(.. h(h(x_0) ^ x_1) ..)   with h = splitmix64 on 64-bit words
    successors of p    : Floyd's sampling, for i = 0 .. S-1 with j = F - S + i:
                         t = mix(seed, 1, p, i) mod (j + 1); take t, or j if t was taken
    weights of p       : Floyd's sampling of S - 1 cut points from {1 .. 15}: for
                         i = 0 .. S-2 with j = 14 - (S - 2) + i: t = 1 + mix(seed, 2, p, i) mod (j + 1);
                         take t, or j + 1 if t was taken; c = gaps of sorted [0, cuts.., 16]
                         (c_i belongs to the i-th successor in drawing order)

Everything about a sample other than the chain (record places, keys, values, which records
are asked, the filler draws) comes from numpy's PCG64 seeded with the sample seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from .samples import Sample

BOS, EOS, REC, QUESTION = 0, 1, 2, 3
NUM_SPECIAL = 4
WEIGHT_SLOTS = 16  # successor probabilities are multiples of 1 / WEIGHT_SLOTS
MAX_FILLER = 1024  # the sampling table holds F * F * WEIGHT_SLOTS int32 entries (64 MiB at 1024)
TASK_FORMAT = "moa-flex.synthetic-task/2"
_MASK64 = (1 << 64) - 1
_TAG_SUCCESSOR, _TAG_WEIGHT = 1, 2


@dataclass(frozen=True)
class Task:
    """A synthetic lookup task: vocabulary sizes, record format and Markov chain (module docstring)."""

    key_len: int = 2        # K: tokens per key
    value_len: int = 2      # V: tokens per value
    num_keys: int = 64      # distinct key tokens
    num_values: int = 64    # distinct value tokens
    num_filler: int = 32    # F: filler tokens (chain states are pairs of them)
    successors: int = 3     # S: possible next filler tokens after each pair
    seed: int = 0           # task seed: fixes the chain

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"Task.{f.name} must be an integer, got {v!r}")
            object.__setattr__(self, f.name, int(v))
        for name in ("key_len", "value_len", "num_keys", "num_values", "successors"):
            if getattr(self, name) < 1:
                raise ValueError(f"Task.{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.num_filler <= MAX_FILLER:
            raise ValueError(f"Task.num_filler must be in [2, {MAX_FILLER}], got {self.num_filler}")
        if self.successors > min(self.num_filler, WEIGHT_SLOTS):
            raise ValueError(f"Task.successors must be <= min(num_filler, {WEIGHT_SLOTS}) = "
                             f"{min(self.num_filler, WEIGHT_SLOTS)}, got {self.successors}")
        if self.num_key_tuples >= 2 ** 62:
            raise ValueError(f"Task.num_keys ** Task.key_len must be < 2**62, got {self.num_keys} ** {self.key_len}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"Task.seed must be in [0, 2**63), got {self.seed}")

    # vocabulary layout (token ids)
    @property
    def key_start(self) -> int:
        """First key token id."""
        return NUM_SPECIAL

    @property
    def value_start(self) -> int:
        """First value token id."""
        return NUM_SPECIAL + self.num_keys

    @property
    def filler_start(self) -> int:
        """First filler token id."""
        return self.value_start + self.num_values

    @property
    def vocab_size(self) -> int:
        """Tokens used by the task: ids 0 .. vocab_size - 1."""
        return self.filler_start + self.num_filler

    # widths (tokens)
    @property
    def record_len(self) -> int:
        """W = K + V + 1: tokens of one record ``REC key value``."""
        return self.key_len + self.value_len + 1

    @property
    def question_len(self) -> int:
        """K + 1: tokens of ``QUESTION key``."""
        return self.key_len + 1

    @property
    def qa_len(self) -> int:
        """K + V + 2: tokens of ``QUESTION key value EOS``."""
        return self.key_len + self.value_len + 2

    @property
    def num_key_tuples(self) -> int:
        """Distinct keys: num_keys ** key_len."""
        return self.num_keys ** self.key_len

    def to_dict(self) -> dict:
        """JSON-ready dict with the format tag."""
        return {"format": TASK_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        """Inverse of :meth:`to_dict`; ValueError on another format or unknown fields."""
        if not isinstance(d, dict) or d.get("format") != TASK_FORMAT:
            raise ValueError(f"not a synthetic task: expected format {TASK_FORMAT!r}, got {d.get('format') if isinstance(d, dict) else d!r}")
        known = {f.name for f in fields(cls)}
        extra = set(d) - known - {"format"}
        if extra:
            raise ValueError(f"unknown synthetic task fields {sorted(extra)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        """Write the task as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Task":
        """Read a task written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# --------------------------------------------------------------------------------------------
# The Markov chain


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _mix(*words: int | np.ndarray) -> np.ndarray:
    """Counter hash of 64-bit words (module docstring), broadcast over arrays."""
    arrs = [np.asarray(w, dtype=np.uint64) for w in words]
    h = _splitmix64(arrs[0])
    for w in arrs[1:]:
        h = _splitmix64(h ^ w)
    return h


def _floyd(seed: int, tag: int, pairs: np.ndarray, k: int, n: int) -> np.ndarray:
    """k distinct draws from {0 .. n-1} per pair by Floyd's algorithm, in drawing order: [P, k]."""
    out = np.empty((pairs.size, k), dtype=np.int64)
    for i in range(k):
        j = n - k + i
        t = (_mix(seed, tag, pairs, i) % np.uint64(j + 1)).astype(np.int64)
        taken = (out[:, :i] == t[:, None]).any(axis=1) if i else np.zeros(pairs.size, bool)
        out[:, i] = np.where(taken, j, t)
    return out


@lru_cache(maxsize=8)
def _chain(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """(successors [F*F, S] local filler indices, weights [F*F, S] in 1/16) of every pair."""
    F, S = task.num_filler, task.successors
    pairs = np.arange(F * F, dtype=np.int64)
    succ = _floyd(task.seed, _TAG_SUCCESSOR, pairs, S, F)
    cuts = np.sort(_floyd(task.seed, _TAG_WEIGHT, pairs, S - 1, WEIGHT_SLOTS - 1) + 1, axis=1)
    edges = np.concatenate([np.zeros((F * F, 1), np.int64), cuts, np.full((F * F, 1), WEIGHT_SLOTS)], axis=1)
    return succ, np.diff(edges, axis=1)


def transition_table(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain as tensors: successors [F, F, S] (filler token ids) and their probabilities
    [F, F, S] (multiples of 1/16) for each pair (a, b) of local filler indices."""
    succ, w = _chain(task)
    F, S = task.num_filler, task.successors
    return (torch.from_numpy(succ + task.filler_start).view(F, F, S),
            torch.from_numpy(w / WEIGHT_SLOTS).view(F, F, S))


@lru_cache(maxsize=8)
def _step_table(task: Task) -> np.ndarray:
    """Sampling table: entry ``p * 16 + r`` (pair p, uniform slot r < 16) is ``q * 16`` for the
    next pair q = (b, successor); one gather per generated token."""
    succ, w = _chain(task)
    F, S = task.num_filler, task.successors
    slot_owner = np.repeat(np.tile(np.arange(S), F * F), w.reshape(-1)).reshape(F * F, WEIGHT_SLOTS)
    nxt = np.take_along_axis(succ, slot_owner, axis=1)                       # [F*F, 16] successor
    b = (np.arange(F * F) % F)[:, None]
    return ((b * F + nxt) * WEIGHT_SLOTS).reshape(-1).astype(np.int64)


def _filler(task: Task, rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """rows independent chain runs of n tokens each (local filler indices): [rows, n]."""
    F = task.num_filler
    out = np.empty((n, rows), dtype=np.int64)
    start = rng.integers(0, F, size=(2, rows))
    out[:min(n, 2)] = start[:min(n, 2)]
    if n > 2:
        table = _step_table(task)
        slots = rng.integers(0, WEIGHT_SLOTS, size=(n - 2, rows))
        state = (start[0] * F + start[1]) * WEIGHT_SLOTS
        for t in range(2, n):
            state = table[state + slots[t - 2]]
            out[t] = state
        out[2:] = (out[2:] // WEIGHT_SLOTS) % F
    return out.T


# --------------------------------------------------------------------------------------------
# Layout: where the records go


def min_context(task: Task, num_records: int, placed: int = 0) -> int:
    """Smallest context (tokens) that holds ``num_records`` records: ``R * W``, or, when
    ``placed`` of them go at given depths, ``R * W + (placed + 1) * (W - 1)`` (the placed
    records may split the rest into ``placed + 1`` gaps that each waste up to W - 1 tokens)."""
    W = task.record_len
    return num_records * W + ((placed + 1) * (W - 1) if placed else 0)


def default_num_records(task: Task, context_len: int, num_questions: int = 1, placed: int = 0, spacing: int = 64) -> int:
    """Records for a context of ``context_len`` tokens when none are given: one per ``spacing``
    tokens, at least ``num_questions``, at most what fits (:func:`min_context`) and the distinct keys."""
    if spacing < 1:
        raise ValueError(f"spacing must be >= 1 token, got {spacing}")
    W = task.record_len
    fit = (context_len - ((placed + 1) * (W - 1) if placed else 0)) // W
    return max(num_questions, min(context_len // spacing, fit, task.num_key_tuples))


def _check_counts(task: Task, context_len: int, num_records: int, num_questions: int, placed: int, what: str) -> None:
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    if num_records < num_questions:
        raise ValueError(f"num_records ({num_records}) must be >= num_questions ({num_questions}): each question asks its own record")
    if num_records > task.num_key_tuples:
        raise ValueError(f"num_records {num_records} exceeds the task's {task.num_key_tuples} distinct keys "
                         f"(num_keys ** key_len = {task.num_keys} ** {task.key_len})")
    need = min_context(task, num_records, placed)
    if context_len < need:
        at = f" ({placed} at given depths)" if placed else ""
        raise ValueError(f"{what} is too short: its context has {context_len} tokens, {num_records} records{at} "
                         f"need >= {need}")


def _depth_starts(rng: np.random.Generator, C: int, W: int, R: int, depths: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """One row: record starts [R] (sorted) and the record index of each asked depth [n].

    The asked records start at round(depth * (C - W)) (moved apart when they would overlap);
    the others go into the gaps left, each gap chosen in proportion to its room."""
    n = len(depths)
    target = np.rint(np.asarray(depths, dtype=np.float64) * (C - W)).astype(np.int64)
    order = np.argsort(target, kind="stable")
    asked = target[order].copy()
    for i in range(1, n):  # push right past the previous one, then left inside the context
        asked[i] = max(asked[i], asked[i - 1] + W)
    asked[-1] = min(asked[-1], C - W)
    for i in range(n - 2, -1, -1):
        asked[i] = min(asked[i], asked[i + 1] - W)
    bounds = np.concatenate([[0], asked + W]), np.concatenate([asked, [C]])
    room = bounds[1] - bounds[0]                       # free tokens per gap
    count = np.zeros(n + 1, np.int64)
    for _ in range(R - n):
        fits = np.maximum(room - count * W - W + 1, 0).astype(np.float64)
        count[rng.choice(n + 1, p=fits / fits.sum())] += 1
    starts = [asked]
    for g in range(n + 1):
        filler = room[g] - count[g] * W
        at = np.sort(rng.integers(0, filler + 1, size=count[g]))
        starts.append(bounds[0][g] + at + np.arange(count[g]) * W)
    starts = np.concatenate(starts)
    rank = np.argsort(starts, kind="stable")
    where = np.empty(R, np.int64)
    where[rank] = np.arange(R)
    asked_idx = np.empty(n, np.int64)
    asked_idx[order] = where[:n]                       # record index of each question, in question order
    return starts[rank], asked_idx


def _uniform_starts(rng: np.random.Generator, B: int, C: int, W: int, R: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """B rows: record starts [B, R] uniform over arrangements, n distinct asked records [B, n]."""
    gaps = np.sort(rng.integers(0, C - R * W + 1, size=(B, R)), axis=1)
    starts = gaps + np.arange(R) * W
    asked = np.argsort(rng.random((B, R)), axis=1)[:, :n]
    return starts, asked


# --------------------------------------------------------------------------------------------
# Sequences


@dataclass(frozen=True, eq=False)
class Batch:
    """Training sequences (all tensors on the CPU; B rows of T tokens, n questions each).

    ``targets[b, t]`` is the token position t must predict (``input_ids[b, t + 1]``) where t is
    trained, -100 elsewhere (last position included). Trained positions: those predicting a
    chain-determined filler token (``filler_mask``: every filler token but the first two of the
    row) and those predicting an answer's value token or its closing EOS (``answer_mask``).
    ``value_positions[b, q, i]`` is the position whose next token is value token i of question q,
    ``values`` [B, n, V] the expected values, ``depths`` [B, n] the asked records' depths."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    filler_mask: torch.Tensor
    answer_mask: torch.Tensor
    value_positions: torch.Tensor
    values: torch.Tensor
    depths: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The same batch on ``device``."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def rows(self, start: int, stop: int) -> "Batch":
        """Rows ``start .. stop - 1`` of the batch."""
        return Batch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


def _build(task: Task, rng: np.random.Generator, C: int, starts: np.ndarray, asked: np.ndarray) -> dict[str, np.ndarray]:
    """Token arrays of B sequences from record starts [B, R] and asked record indices [B, n]."""
    B, R = starts.shape
    n = asked.shape[1]
    K, V, W = task.key_len, task.value_len, task.record_len
    key_idx = np.stack([rng.choice(task.num_key_tuples, size=R, replace=False) for _ in range(B)])
    digits = task.num_keys ** np.arange(K - 1, -1, -1)
    keys = task.key_start + (key_idx[..., None] // digits) % task.num_keys         # [B, R, K]
    values = task.value_start + rng.integers(0, task.num_values, size=(B, R, V))  # [B, R, V]
    records = np.concatenate([np.full((B, R, 1), REC), keys, values], axis=2)
    ctx = np.empty((B, C), np.int64)
    in_record = np.zeros((B, C), bool)
    pos = (starts[..., None] + np.arange(W)).reshape(B, -1)
    np.put_along_axis(ctx, pos, records.reshape(B, -1), axis=1)
    np.put_along_axis(in_record, pos, True, axis=1)
    ctx[~in_record] = (task.filler_start + _filler(task, rng, B, C - R * W)).reshape(-1)
    ak = np.take_along_axis(keys, asked[..., None], axis=1)                         # [B, n, K]
    av = np.take_along_axis(values, asked[..., None], axis=1)                       # [B, n, V]
    qa = np.concatenate([np.full((B, n, 1), QUESTION), ak, av, np.full((B, n, 1), EOS)], axis=2)
    depths = np.take_along_axis(starts, asked, axis=1) / max(C - W, 1)
    return {"ctx": ctx, "in_record": in_record, "qa": qa, "values": av, "depths": depths}


def _check_length(length: int, what: str) -> None:
    if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
        raise ValueError(f"{what} must be a positive number of tokens, got {length!r}")


def _check_depths(depth: float | Sequence[float] | None, n: int) -> list[float] | None:
    if depth is None:
        return None
    ds = [depth] * n if isinstance(depth, (int, float, np.floating)) else list(depth)
    if len(ds) != n:
        raise ValueError(f"depth must be one float or one per question ({n}), got {len(ds)} values")
    for d in ds:
        if not isinstance(d, (int, float, np.floating)) or not 0.0 <= float(d) <= 1.0:
            raise ValueError(f"depth must be in [0, 1] (fraction of the context), got {d!r}")
    return [float(d) for d in ds]


def _rng(seed: int | Sequence[int]) -> np.random.Generator:
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"seed must be a non-negative integer (or a sequence of them), got {seed!r}") from e


def make_sample(task: Task, length: int, seed: int | Sequence[int], depth: float | Sequence[float] | None = None,
                num_questions: int = 1, num_records: int | None = None) -> Sample:
    """A calibration sample of exactly ``length`` prompt tokens (module docstring for the format).

    ``depth``: where the asked record sits, as a fraction 0..1 of the context (module
    docstring), one float or one per question (question order); the needle starts within half
    a token of ``depth * (C - W)`` unless two asked records would overlap (then they are moved
    apart). When None, the records are placed uniformly at random and the asked ones chosen at
    random. ``num_records``: records in the context, default :func:`default_num_records`.
    ValueError if the context cannot hold them (:func:`min_context`). Deterministic in
    ``seed`` (an int or a sequence of ints)."""
    _check_length(length, "length")
    n = int(num_questions)
    fixed = 1 + (n - 1) * task.qa_len + task.question_len
    C = length - fixed
    depths = _check_depths(depth, n)
    placed = 0 if depths is None else n
    R = default_num_records(task, C, n, placed) if num_records is None else int(num_records)
    _check_counts(task, C, R, n, placed, f"length {length}")
    rng = _rng(seed)
    if depths is None:
        starts, asked = _uniform_starts(rng, 1, C, task.record_len, R, n)
    else:
        starts, asked = (a[None] for a in _depth_starts(rng, C, task.record_len, R, depths))
    parts = _build(task, rng, C, starts, asked)
    qa = parts["qa"][0]
    question = np.concatenate([qa[:-1].reshape(-1), qa[-1, :task.question_len]])
    return Sample(torch.tensor([BOS]), torch.from_numpy(parts["ctx"][0]), torch.from_numpy(question))


def make_batch(task: Task, batch_size: int, length: int, seed: int | Sequence[int], num_questions: int = 1,
               num_records: int | None = None, depth: float | Sequence[float] | None = None) -> Batch:
    """``batch_size`` training sequences of exactly ``length`` tokens each, every one ending with
    ``num_questions`` questions and their answers (see :class:`Batch` for the targets).

    Records are placed uniformly at random and the asked ones chosen at random, unless ``depth``
    (as in :func:`make_sample`, the same for every row) is given. Deterministic in ``seed``."""
    _check_length(length, "length")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    n = int(num_questions)
    C = length - 1 - n * task.qa_len
    depths = _check_depths(depth, n)
    placed = 0 if depths is None else n
    R = default_num_records(task, C, n, placed) if num_records is None else int(num_records)
    _check_counts(task, C, R, n, placed, f"length {length}")
    rng = _rng(seed)
    W = task.record_len
    if depths is None:
        starts, asked = _uniform_starts(rng, batch_size, C, W, R, n)
    else:
        rows = [_depth_starts(rng, C, W, R, depths) for _ in range(batch_size)]
        starts, asked = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    p = _build(task, rng, C, starts, asked)
    B = batch_size
    ids = np.concatenate([np.full((B, 1), BOS), p["ctx"], p["qa"].reshape(B, -1)], axis=1)
    is_filler = np.zeros(ids.shape, bool)
    is_filler[:, 1:1 + C] = ~p["in_record"]
    is_filler &= np.cumsum(is_filler, axis=1) > 2            # the first two filler tokens are uniform
    qa_offset = np.arange(task.qa_len)
    is_answer_tok = (qa_offset >= task.question_len)         # value tokens and EOS of each QA pair
    is_answer = np.zeros(ids.shape, bool)
    is_answer[:, 1 + C:] = np.tile(is_answer_tok, n)
    filler_mask, answer_mask = is_filler[:, 1:], is_answer[:, 1:]   # position t predicts token t + 1
    targets = np.where(filler_mask | answer_mask, ids[:, 1:], -100)
    pad = np.zeros((B, 1), bool)
    value_pos = (1 + C + np.arange(n)[:, None] * task.qa_len + task.question_len - 1
                 + np.arange(task.value_len)[None, :])
    return Batch(
        input_ids=torch.from_numpy(ids),
        targets=torch.from_numpy(np.concatenate([targets, np.full((B, 1), -100)], axis=1)),
        filler_mask=torch.from_numpy(np.concatenate([filler_mask, pad], axis=1)),
        answer_mask=torch.from_numpy(np.concatenate([answer_mask, pad], axis=1)),
        value_positions=torch.from_numpy(np.broadcast_to(value_pos, (B, n, task.value_len)).copy()),
        values=torch.from_numpy(p["values"]),
        depths=torch.from_numpy(p["depths"]).float(),
    )


def make_induction_batch(task: Task, batch_size: int, length: int, seed: int | Sequence[int]) -> Batch:
    """``batch_size`` warm-up rows of ``length`` tokens that teach content induction (copy what
    followed the earlier occurrence of the current token), the mechanism the lookups need.

    A row is ``BOS``, h = (length - 1) // 2 tokens drawn uniformly from the key, value and
    filler tokens, the same h tokens rotated left by a random r in [1, h - 1] (so the distance
    to the earlier copy differs between rows and position alone cannot predict it), and one
    more uniform token when length - 1 is odd. Position ``1 + h + i`` (copy token i) predicts
    copy token i + 1 for every i in [0, h - 2] except the one whose earlier occurrence is the
    last token of the first half (there the continuation is the copy's first token, not its
    rotation): h - 2 targets per row, all in ``answer_mask``; ``filler_mask`` is empty. As
    "questions" of one token each, ``value_positions`` [B, h - 2, 1] holds those positions,
    ``values`` their targets, ``depths`` zeros. Deterministic in ``seed``; needs length >= 9."""
    _check_length(length, "length")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if length < 9:
        raise ValueError(f"an induction row needs length >= 9 tokens, got {length}")
    rng = _rng(seed)
    B, h = int(batch_size), (length - 1) // 2
    first = rng.integers(NUM_SPECIAL, task.vocab_size, size=(B, h))
    r = rng.integers(1, h, size=(B, 1))
    copy = np.take_along_axis(first, (np.arange(h)[None] + r) % h, axis=1)   # copy[i] = first[(i + r) % h]
    extra = rng.integers(NUM_SPECIAL, task.vocab_size, size=(B, (length - 1) % 2))
    ids = np.concatenate([np.full((B, 1), BOS), first, copy, extra], axis=1)
    i = np.arange(h - 1)[None]                                               # copy token i predicts i + 1
    keep = (i + r) % h != h - 1                                               # not the wrap of the rotation
    pos = np.where(keep, 1 + h + i, -1)
    pos = np.sort(pos, axis=1)[:, 1:]                                         # drop the one wrap position
    answer_mask = np.zeros((B, length), bool)
    np.put_along_axis(answer_mask, pos, True, axis=1)
    targets = np.full((B, length), -100)
    targets[:, :-1] = np.where(answer_mask[:, :-1], ids[:, 1:], -100)
    values = np.take_along_axis(ids, pos + 1, axis=1)
    return Batch(
        input_ids=torch.from_numpy(ids),
        targets=torch.from_numpy(targets),
        filler_mask=torch.zeros(B, length, dtype=torch.bool),
        answer_mask=torch.from_numpy(answer_mask),
        value_positions=torch.from_numpy(pos[..., None].copy()),
        values=torch.from_numpy(values[..., None].copy()),
        depths=torch.zeros(B, h - 2),
    )


# --------------------------------------------------------------------------------------------
# Answers and scoring


def answer_ids(task: Task, sample: Sample) -> torch.Tensor:
    """The value tokens [V] that answer a :func:`make_sample` sample's last question: the value
    of the context record whose key the question asks. ValueError if the question is not a
    question of this task or no record (or more than one) has its key."""
    K, V = task.key_len, task.value_len
    q = sample.question
    if q.numel() < task.question_len or int(q[-K - 1]) != QUESTION or not all(task.key_start <= int(t) < task.value_start for t in q[-K:]):
        raise ValueError(f"the sample's question must end with QUESTION key({K} key tokens), got {q.tolist()[-K - 1:]}")
    key = q[-K:]
    ctx = sample.context
    at = [p for p in (ctx == REC).nonzero().flatten().tolist()
          if p + task.record_len <= ctx.numel() and torch.equal(ctx[p + 1:p + 1 + K], key)]
    if len(at) != 1:
        raise ValueError(f"the asked key {key.tolist()} is in {len(at)} records of the context, expected exactly 1")
    return ctx[at[0] + K + 1:at[0] + K + 1 + V].clone()


def exact_match(predicted: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Bool [...]: the whole value is right (all of the last dim equal). Shapes must agree."""
    if predicted.shape != expected.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and expected {tuple(expected.shape)} values differ in shape")
    return (predicted == expected).all(dim=-1)


def predicted_values(logits: torch.Tensor, value_positions: torch.Tensor) -> torch.Tensor:
    """Teacher-forced greedy values [B, n, V]: argmax of ``logits`` [B, T, vocab] at ``value_positions`` [B, n, V]."""
    if logits.dim() != 3 or value_positions.dim() != 3 or logits.shape[0] != value_positions.shape[0]:
        raise ValueError(f"expected logits [B, T, vocab] and value_positions [B, n, V], got {tuple(logits.shape)} and {tuple(value_positions.shape)}")
    B, n, V = value_positions.shape
    idx = value_positions.reshape(B, n * V).to(logits.device)
    return logits.argmax(-1).gather(1, idx).view(B, n, V)


def batch_correct(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Bool [B, n]: each question answered exactly, by teacher forcing (one forward of the batch)."""
    return exact_match(predicted_values(logits, batch.value_positions), batch.values.to(logits.device))


def generated_correct(expected: torch.Tensor, generated: torch.Tensor) -> bool:
    """True when the first V generated tokens (after the prompt) are exactly the value [V]."""
    V = expected.numel()
    return generated.numel() >= V and bool(torch.equal(generated.reshape(-1)[:V].cpu(), expected.reshape(-1).cpu()))


# --------------------------------------------------------------------------------------------
# Calibration source


def task_for_vocab(vocab_size: int, num_records: int = 8) -> Task:
    """The default :class:`Task` when it fits in ``vocab_size`` (so a model trained on it is
    calibrated on its own task), else one scaled down to the vocabulary: a quarter of the
    non-special tokens for keys (at least sqrt(num_records) so keys stay distinct), a quarter for
    values, the rest filler. ValueError if the vocabulary cannot hold one."""
    default = Task()
    if vocab_size >= default.vocab_size and num_records <= default.num_key_tuples:
        return default
    K = default.key_len
    room = vocab_size - NUM_SPECIAL
    fewest = 1
    while fewest ** K < num_records:  # fewest key tokens whose K-tuples tell num_records records apart
        fewest += 1
    keys = max(fewest, room // 4)
    values = max(1, room // 4)
    filler = min(room - keys - values, MAX_FILLER)
    if filler < 2 or keys ** K < num_records:
        need = NUM_SPECIAL + fewest + 1 + 2
        raise ValueError(f"vocab_size must be >= {need} for {num_records} records, got {vocab_size}")
    return Task(key_len=K, value_len=default.value_len, num_keys=keys, num_values=values, num_filler=filler,
                successors=min(default.successors, filler), seed=default.seed)
