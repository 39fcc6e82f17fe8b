"""Synthetic tasks: the chain against a pure-Python recomputation of its definition, the
sequence format parsed back by a brute-force reader, depth control, training targets against a
position-by-position recomputation, scoring, bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moa_flex.data.synthetic import (
    BOS, EOS, QUESTION, REC, Batch, Task, answer_ids, batch_correct, exact_match, generated_correct,
    make_batch, make_induction_batch, make_sample, min_context, predicted_values, task_for_vocab, transition_table,
)

M64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------------
# Independent reference of the chain: the module docstring's definition in plain Python integers


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def mix(*words: int) -> int:
    h = splitmix64(words[0])
    for w in words[1:]:
        h = splitmix64(h ^ w)
    return h


def reference_chain(task: Task) -> dict[tuple[int, int], dict[int, float]]:
    """(a, b) filler token ids -> {successor token id: probability}."""
    F, S, f0 = task.num_filler, task.successors, task.filler_start
    table = {}
    for a in range(F):
        for b in range(F):
            p = a * F + b
            succ = []
            for i in range(S):
                j = F - S + i
                t = mix(task.seed, 1, p, i) % (j + 1)
                succ.append(j if t in succ else t)
            cuts = []
            for i in range(S - 1):
                j = 14 - (S - 2) + i
                t = 1 + mix(task.seed, 2, p, i) % (j + 1)
                cuts.append(j + 1 if t in cuts else t)
            edges = [0, *sorted(cuts), 16]
            table[(f0 + a, f0 + b)] = {f0 + s: (edges[i + 1] - edges[i]) / 16 for i, s in enumerate(succ)}
    return table


# ------------------------------------------------------------------------------------------------
# Brute-force reader of the format


def kind(task: Task, t: int) -> str:
    if t < 4:
        return "special"
    if t < task.value_start:
        return "key"
    if t < task.filler_start:
        return "value"
    assert t < task.vocab_size, t
    return "filler"


def read_context(task: Task, ctx: list[int]) -> tuple[list[tuple[int, tuple, tuple]], list[int]]:
    """Records (start, key, value) and the filler tokens in order; asserts the record format."""
    K, V, W = task.key_len, task.value_len, task.record_len
    records, filler, p = [], [], 0
    while p < len(ctx):
        if ctx[p] == REC:
            rec = ctx[p:p + W]
            assert len(rec) == W == K + V + 1, rec
            assert all(kind(task, t) == "key" for t in rec[1:K + 1]) and all(kind(task, t) == "value" for t in rec[K + 1:])
            records.append((p, tuple(rec[1:K + 1]), tuple(rec[K + 1:])))
            p += W
        else:
            assert kind(task, ctx[p]) == "filler", (p, ctx[p])
            filler.append(ctx[p])
            p += 1
    return records, filler


def read_questions(task: Task, q: list[int], last_open: bool) -> list[tuple[tuple, tuple | None]]:
    """(key, value or None) per question; asserts the question format."""
    K, V = task.key_len, task.value_len
    out, p = [], 0
    while p < len(q):
        assert q[p] == QUESTION and all(kind(task, t) == "key" for t in q[p + 1:p + K + 1]), q[p:]
        key = tuple(q[p + 1:p + K + 1])
        if last_open and p + task.question_len == len(q):
            out.append((key, None))
            p += task.question_len
        else:
            value = tuple(q[p + K + 1:p + K + 1 + V])
            assert all(kind(task, t) == "value" for t in value) and q[p + K + 1 + V] == EOS
            out.append((key, value))
            p += task.qa_len
    return out


def check_filler(task: Task, filler: list[int], chain) -> None:
    for a, b, c in zip(filler, filler[1:], filler[2:]):
        assert chain[(a, b)].get(c, 0) > 0, (a, b, c)


@st.composite
def tasks(draw) -> Task:
    F = draw(st.integers(2, 9))
    return Task(key_len=draw(st.integers(1, 3)), value_len=draw(st.integers(1, 3)), num_keys=draw(st.integers(2, 6)),
                num_values=draw(st.integers(1, 6)), num_filler=F, successors=draw(st.integers(1, min(F, 4))),
                seed=draw(st.integers(0, 2 ** 40)))


@st.composite
def layouts(draw, with_depth: bool = False):
    """(task, length, num_questions, num_records) that fit (with the asked records at given depths)."""
    task = draw(tasks())
    n = draw(st.integers(1, 4))
    R = draw(st.integers(n, min(n + 5, task.num_key_tuples))) if task.num_key_tuples >= n else None
    assume(R is not None)
    fixed = 1 + (n - 1) * task.qa_len + task.question_len
    need = fixed + min_context(task, R, n if with_depth else 0)
    length = draw(st.integers(need, need + 150))
    return task, length, n, R


# ------------------------------------------------------------------------------------------------
# Task and chain


@settings(max_examples=30, deadline=None)
@given(task=tasks())
def test_chain_matches_its_definition(task):
    succ, prob = transition_table(task)
    F, S = task.num_filler, task.successors
    assert succ.shape == prob.shape == (F, F, S)
    ref = reference_chain(task)
    for a in range(F):
        for b in range(F):
            got = dict(zip(succ[a, b].tolist(), prob[a, b].tolist()))
            assert len(got) == S  # distinct successors
            assert got == ref[(task.filler_start + a, task.filler_start + b)]


def test_chain_is_a_fixed_part_of_the_task():
    a, b, c = Task(seed=1), Task(seed=1), Task(seed=2)
    assert torch.equal(transition_table(a)[0], transition_table(b)[0])
    assert not torch.equal(transition_table(a)[0], transition_table(c)[0])
    # probabilities are multiples of 1/16, at least 1/16, summing to 1
    p = transition_table(a)[1]
    assert torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype)) and (p >= 1 / 16).all() and ((p * 16) % 1 == 0).all()


def test_filler_frequencies_follow_the_chain():
    task = Task(num_filler=3, successors=2, seed=5)
    fill = make_batch(task, 4, 30000, seed=0, num_records=1).input_ids
    ref = reference_chain(task)
    seen: dict[tuple[int, int], Counter] = {}
    for row in fill.tolist():
        _, filler = read_context(task, row[1:-task.qa_len])
        for a, b, c in zip(filler, filler[1:], filler[2:]):
            seen.setdefault((a, b), Counter())[c] += 1
    checked = 0
    for pair, counts in seen.items():
        total = sum(counts.values())
        if total < 3000:
            continue
        checked += 1
        for c, p in ref[pair].items():
            assert abs(counts[c] / total - p) < 0.03, (pair, c, counts[c] / total, p)
    assert checked >= 4


def test_task_round_trip_and_bad_fields(tmp_path):
    task = Task(key_len=3, value_len=1, num_keys=10, num_values=7, num_filler=33, successors=4, seed=9)
    assert task.vocab_size == 4 + 10 + 7 + 33 and task.record_len == 5 and task.qa_len == 6 and task.question_len == 4
    task.save(tmp_path / "task.json")
    assert Task.load(tmp_path / "task.json") == task
    assert json.loads((tmp_path / "task.json").read_text())["format"] == "moa-flex.synthetic-task/2"
    with pytest.raises(ValueError, match="format"):
        Task.from_dict({"key_len": 1})
    with pytest.raises(ValueError, match="unknown"):
        Task.from_dict({**task.to_dict(), "colour": 1})
    for bad, match in [(dict(key_len=0), "key_len"), (dict(num_filler=1), "num_filler"), (dict(num_filler=2000), "num_filler"),
                       (dict(successors=5, num_filler=4), "successors"), (dict(successors=17, num_filler=100), "successors"),
                       (dict(seed=-1), "seed"), (dict(num_values=2.5), "num_values"), (dict(value_len=True), "value_len")]:
        with pytest.raises(ValueError, match=match):
            Task(**bad)


# ------------------------------------------------------------------------------------------------
# Samples


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), seed=st.integers(0, 2 ** 32))
def test_sample_format(layout, seed):
    task, length, n, R = layout
    s = make_sample(task, length, seed, num_questions=n, num_records=R)
    assert s.prompt_len == length and s.head.tolist() == [BOS] and s.answer.numel() == 0
    records, filler = read_context(task, s.context.tolist())
    assert len(records) == R
    keys = [k for _, k, _ in records]
    assert len(set(keys)) == R
    check_filler(task, filler, reference_chain(task))
    qs = read_questions(task, s.question.tolist(), last_open=True)
    assert len(qs) == n and qs[-1][1] is None
    asked = [k for k, _ in qs]
    assert len(set(asked)) == n
    by_key = {k: v for _, k, v in records}
    for key, value in qs:
        assert keys.count(key) == 1  # the asked key is exactly one record of the context
        if value is not None:
            assert value == by_key[key]
    assert tuple(answer_ids(task, s).tolist()) == by_key[qs[-1][0]]
    again = make_sample(task, length, seed, num_questions=n, num_records=R)
    assert torch.equal(again.prompt_ids, s.prompt_ids)


def test_samples_differ_between_seeds():
    task = Task()
    a, b = (make_sample(task, 512, seed).prompt_ids for seed in (1, 2))
    assert not torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(layout=layouts(with_depth=True), seed=st.integers(0, 2 ** 32), data=st.data())
def test_depth_puts_the_needle_where_asked(layout, seed, data):
    task, length, n, R = layout
    C = length - 1 - (n - 1) * task.qa_len - task.question_len
    W = task.record_len
    spread = n == 1 or data.draw(st.booleans())
    if n == 1:
        depths = [data.draw(st.floats(0, 1))]
    elif spread:  # asked records far enough apart not to collide: each lands at its depth
        slot = (C - W) / n
        assume(slot >= 2 * W + 2)
        at = [data.draw(st.floats(i * slot + W + 1, (i + 1) * slot - W - 1)) for i in range(n)]
        depths = [at[i] / (C - W) for i in data.draw(st.permutations(range(n)))]
    else:
        depths = data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    s = make_sample(task, length, seed, depth=depths, num_questions=n, num_records=R)
    records, _ = read_context(task, s.context.tolist())
    start = {k: p for p, k, _ in records}
    qs = read_questions(task, s.question.tolist(), last_open=True)
    for (key, _), d in zip(qs, depths):
        if spread:
            assert abs(start[key] - d * (C - W)) <= W, (start[key], d * (C - W))
        else:
            assert 0 <= start[key] <= C - W


def test_depth_extremes():
    task = Task()
    W = task.record_len
    for d, want in [(0.0, 0), (1.0, None)]:
        s = make_sample(task, 1000, 0, depth=d)
        records, _ = read_context(task, s.context.tolist())
        key = tuple(s.question[1:1 + task.key_len].tolist())
        at = [p for p, k, _ in records if k == key][0]
        assert at == (want if want is not None else s.context.numel() - W)


# ------------------------------------------------------------------------------------------------
# Training batches


def reference_targets(task: Task, row: list[int], C: int) -> tuple[list[int], list[bool], list[bool]]:
    """Position by position: the token it must predict (or -100), is it filler, is it answer."""
    T = len(row)
    targets, fill, ans = [-100] * T, [False] * T, [False] * T
    filler_seen = 0
    for t in range(T - 1):
        nxt, p = row[t + 1], t + 1
        if 1 <= p <= C and kind(task, nxt) == "filler":  # ranges are disjoint: never inside a record
            filler_seen += 1
            if filler_seen > 2:
                targets[t], fill[t] = nxt, True
        elif p > C:
            off = (p - 1 - C) % task.qa_len
            if off >= task.question_len:
                targets[t], ans[t] = nxt, True
    return targets, fill, ans


@settings(max_examples=40, deadline=None)
@given(layout=layouts(with_depth=True), B=st.integers(1, 3), seed=st.integers(0, 2 ** 32), with_depth=st.booleans(),
       data=st.data())
def test_batch_targets_line_up(layout, B, seed, with_depth, data):
    task, prompt_len, n, R = layout
    length = prompt_len + task.value_len + 1  # the same context with the last answer and its EOS
    C = length - 1 - n * task.qa_len
    depth = data.draw(st.floats(0, 1)) if with_depth else None
    b = make_batch(task, B, length, seed, num_questions=n, num_records=R, depth=depth)
    assert isinstance(b, Batch)
    assert b.input_ids.shape == b.targets.shape == b.filler_mask.shape == b.answer_mask.shape == (B, length)
    assert b.value_positions.shape == (B, n, task.value_len) and b.values.shape == (B, n, task.value_len)
    assert b.depths.shape == (B, n)
    chain = reference_chain(task)
    for i, row in enumerate(b.input_ids.tolist()):
        assert row[0] == BOS
        records, filler = read_context(task, row[1:1 + C])
        assert len(records) == R and len({k for _, k, _ in records}) == R
        check_filler(task, filler, chain)
        qs = read_questions(task, row[1 + C:], last_open=False)
        assert len(qs) == n and len({k for k, _ in qs}) == n
        by_key = {k: (p, v) for p, k, v in records}
        for q, (key, value) in enumerate(qs):
            assert value == by_key[key][1]
            assert tuple(b.values[i, q].tolist()) == value
            assert [row[p + 1] for p in b.value_positions[i, q].tolist()] == list(value)
            assert b.depths[i, q].item() == pytest.approx(by_key[key][0] / (C - task.record_len), abs=1e-6)
            if with_depth and n == 1:
                assert abs(by_key[key][0] - depth * (C - task.record_len)) <= task.record_len
        targets, fill, ans = reference_targets(task, row, C)
        assert b.targets[i].tolist() == targets
        assert b.filler_mask[i].tolist() == fill and b.answer_mask[i].tolist() == ans
    again = make_batch(task, B, length, seed, num_questions=n, num_records=R, depth=depth)
    assert torch.equal(again.input_ids, b.input_ids) and torch.equal(again.targets, b.targets)


def test_batch_counts():
    task = Task()
    b = make_batch(task, 2, 1024, 0, num_questions=5, num_records=20)
    assert int(b.answer_mask[0].sum()) == 5 * (task.value_len + 1)
    C = 1024 - 1 - 5 * task.qa_len
    assert int(b.filler_mask[0].sum()) == C - 20 * task.record_len - 2


# ------------------------------------------------------------------------------------------------
# Induction warm-up rows


@settings(max_examples=40, deadline=None)
@given(length=st.integers(9, 140), B=st.integers(1, 4), seed=st.integers(0, 2**32))
def test_induction_rows_copy_what_followed(length, B, seed):
    task = Task(key_len=1, value_len=1, num_keys=200, num_values=200, num_filler=200)  # repeats are rare
    b = make_induction_batch(task, B, length, seed)
    ids, h = b.input_ids, (length - 1) // 2
    assert ids.shape == (B, length) and (ids[:, 0] == BOS).all()
    assert ((ids[:, 1:] >= 4) & (ids[:, 1:] < task.vocab_size)).all()
    assert not b.filler_mask.any() and b.depths.shape == (B, h - 2)
    for row in range(B):
        x = ids[row].tolist()
        first, copy = x[1:1 + h], x[1 + h:1 + 2 * h]
        assert sorted(first) == sorted(copy)  # the copy is a permutation (a rotation) of the first half
        want = set()
        for p in range(1 + h, 2 * h):  # copy positions with a next copy token
            # brute force: an occurrence of x[p] in the first half whose successor there is x[p + 1]
            if any(x[j] == x[p] and j + 1 <= h and x[j + 1] == x[p + 1] for j in range(1, h + 1)):
                want.add(p)
        got = set(b.answer_mask[row].nonzero().flatten().tolist())
        assert got <= want and len(got) == h - 2
        if len(set(first)) == h:  # no repeated token: exactly one copy position lacks a first-half successor
            assert got == want
        assert b.value_positions[row, :, 0].tolist() == sorted(got)
        for p in got:
            assert int(b.targets[row, p]) == x[p + 1]
        assert (b.targets[row][~b.answer_mask[row]] == -100).all()
    logits = torch.nn.functional.one_hot(b.targets.clamp(min=0), task.vocab_size).float()
    assert batch_correct(logits, b).all()
    assert torch.equal(make_induction_batch(task, B, length, seed).input_ids, ids)


def test_induction_rows_rotate_by_different_amounts():
    task = Task(key_len=1, value_len=1, num_keys=200, num_values=200, num_filler=200)
    b = make_induction_batch(task, 64, 65, 3)
    # offset from a copy token back to its first occurrence, per row
    offsets = {int(b.value_positions[r, 0, 0]) - b.input_ids[r, 1:33].tolist().index(int(b.input_ids[r, b.value_positions[r, 0, 0]])) - 1
               for r in range(64)}
    assert len(offsets) > 10
    with pytest.raises(ValueError, match="length >= 9"):
        make_induction_batch(task, 2, 8, 0)
    with pytest.raises(ValueError, match="batch_size"):
        make_induction_batch(task, 0, 32, 0)


# ------------------------------------------------------------------------------------------------
# Scoring


def test_teacher_forced_scoring():
    task = Task()
    b = make_batch(task, 3, 300, 1, num_questions=4, num_records=6)
    logits = torch.nn.functional.one_hot(b.targets.clamp(min=0), task.vocab_size).float()
    assert torch.equal(predicted_values(logits, b.value_positions), b.values)
    assert batch_correct(logits, b).all()
    # one wrong token of one value: that question (only) fails
    pos = int(b.value_positions[1, 2, 1])
    logits[1, pos] = torch.nn.functional.one_hot(torch.tensor(task.value_start + (int(b.values[1, 2, 1]) + 1 - task.value_start) % task.num_values), task.vocab_size)
    ok = batch_correct(logits, b)
    assert not ok[1, 2] and ok.sum() == ok.numel() - 1


def test_sample_teacher_forcing_and_generation_scoring():
    task = Task()
    s = make_sample(task, 400, 7, num_questions=3)
    value = answer_ids(task, s)
    ids = torch.cat([s.prompt_ids, value])
    logits = torch.nn.functional.one_hot(torch.cat([ids[1:], torch.tensor([EOS])]), task.vocab_size).float()[None]
    P = s.prompt_len
    positions = torch.arange(P - 1, P - 1 + task.value_len).view(1, 1, -1)
    assert exact_match(predicted_values(logits, positions), value.view(1, 1, -1)).item()
    assert generated_correct(value, torch.cat([value, torch.tensor([EOS])]))
    assert not generated_correct(value, value[:1])
    assert not generated_correct(value, value.flip(0) if value[0] != value[1] else value + 1)
    with pytest.raises(ValueError, match="shape"):
        exact_match(value.view(1, -1), value)


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors():
    task = Task()
    with pytest.raises(ValueError, match="too short"):
        make_sample(task, 50, 0, num_records=10)
    fixed = 1 + task.question_len
    make_sample(task, fixed + min_context(task, 10), 0, num_records=10)
    with pytest.raises(ValueError, match=r"10 records \(1 at given depths\) need >= 58"):
        make_sample(task, fixed + min_context(task, 10), 0, num_records=10, depth=0.5)
    make_sample(task, fixed + min_context(task, 10, 1), 0, num_records=10, depth=0.5)
    with pytest.raises(ValueError, match="num_questions"):
        make_sample(task, 500, 0, num_questions=0)
    with pytest.raises(ValueError, match="num_records"):
        make_sample(task, 500, 0, num_questions=3, num_records=2)
    with pytest.raises(ValueError, match="distinct keys"):
        make_sample(Task(key_len=1, num_keys=4), 500, 0, num_records=5)
    with pytest.raises(ValueError, match="depth must be in"):
        make_sample(task, 500, 0, depth=1.5)
    with pytest.raises(ValueError, match="one per question"):
        make_sample(task, 500, 0, depth=[0.1, 0.2], num_questions=3)
    with pytest.raises(ValueError, match="length"):
        make_sample(task, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        make_sample(task, 500, -3)
    with pytest.raises(ValueError, match="batch_size"):
        make_batch(task, 0, 500, 0)
    with pytest.raises(ValueError, match="too short"):
        make_batch(task, 2, 60, 0, num_questions=8)
    other = make_sample(task, 300, 0)
    broken = type(other)(other.head, other.context, other.question[:-1])
    with pytest.raises(ValueError, match="QUESTION"):
        answer_ids(task, broken)
    missing = type(other)(other.head, torch.full_like(other.context, task.filler_start), other.question)
    with pytest.raises(ValueError, match="0 records"):
        answer_ids(task, missing)


def test_task_for_vocab():
    assert task_for_vocab(100_000) == Task() and task_for_vocab(Task().vocab_size) == Task()
    small = task_for_vocab(40, num_records=8)
    assert small.vocab_size <= 40 and small.num_key_tuples >= 8
    with pytest.raises(ValueError, match="vocab_size must be >= 10"):
        task_for_vocab(9, num_records=8)
    assert task_for_vocab(10, num_records=8).vocab_size == 10
