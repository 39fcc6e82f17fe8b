"""Calibration data: samples, middle trimming, JSONL, chat/plain formats, synthetic lookups,
the dense model's own greedy answers, bucketing by length."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_flex.data.calibration import answer_samples, calibration_set, synthetic_samples
from moa_flex.data.samples import PLAIN_QUESTION, Sample, format_sample, load_jsonl
from moa_flex.data import synthetic as syn
from moa_flex.data.synthetic import Task, answer_ids, make_sample, task_for_vocab
from reference import greedy
from tiny_models import tiny_model
from word_tokenizers import make_tokenizer

def ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


CONTEXT = "the cat sat on a mat and the dog ran far away over the hill"
QUESTION = "where is the cat"


def test_plain_format_equals_joint_tokenization():
    tok = make_tokenizer(chat=False)
    s = format_sample(tok, CONTEXT, QUESTION)
    full = CONTEXT + PLAIN_QUESTION.format(question=QUESTION)
    assert s.prompt_ids.tolist() == ids(tok, full, special=True)
    assert s.head.tolist() == [tok.bos_token_id]
    assert s.context.tolist() == ids(tok, CONTEXT, special=False)
    assert tok.decode(s.question).split() == ["Question:", *QUESTION.split(), "Answer:"]
    assert s.answer.numel() == 0


def test_chat_format_equals_joint_tokenization():
    tok = make_tokenizer(chat=True)
    s = format_sample(tok, CONTEXT, QUESTION)
    rendered = tok.apply_chat_template([{"role": "user", "content": f"{CONTEXT}\n\n{QUESTION}"}], tokenize=False,
                                       add_generation_prompt=True)
    assert s.prompt_ids.tolist() == ids(tok, rendered, special=False)
    assert tok.convert_ids_to_tokens(s.head.tolist()) == ["<s>", "<|user|>"]
    assert s.context.tolist() == ids(tok, CONTEXT, special=False)
    assert tok.convert_ids_to_tokens(s.question.tolist())[-2:] == ["<|end|>", "<|assistant|>"]


def test_chat_template_that_drops_the_message_is_refused():
    tok = make_tokenizer(chat=True)
    tok.chat_template = "{{ bos_token }} hello"
    with pytest.raises(ValueError, match="chat template"):
        format_sample(tok, CONTEXT, QUESTION)


@settings(max_examples=60, deadline=None)
@given(head=st.integers(0, 4), ctx=st.integers(0, 40), question=st.integers(0, 5), answer=st.integers(0, 3),
       data=st.data())
def test_trimmed_keeps_start_and_end_of_context(head, ctx, question, answer, data):
    s = Sample(torch.arange(head) + 1000, torch.arange(ctx), torch.arange(question) + 2000, torch.arange(answer) + 3000)
    fixed = head + question
    P = data.draw(st.integers(fixed, s.prompt_len))
    t = s.trimmed(P)
    keep = P - fixed
    assert t.prompt_len == P and t.answer.numel() == 0
    assert torch.equal(t.head, s.head) and torch.equal(t.question, s.question)
    # brute force: the kept context positions are a prefix and a suffix, the prefix at most 1 longer
    kept = t.context.tolist()
    assert any(kept == list(range(f)) + list(range(ctx - (keep - f), ctx)) and f - (keep - f) in (0, 1)
               for f in range(keep + 1))
    with pytest.raises(ValueError, match="never padded"):
        s.trimmed(s.prompt_len + 1)
    if fixed > 0:
        with pytest.raises(ValueError, match="head \\+ question"):
            s.trimmed(fixed - 1)


def test_sample_rejects_non_token_input():
    with pytest.raises(ValueError, match="Sample.context"):
        Sample([1], torch.zeros(2, 2, dtype=torch.long), [2])
    with pytest.raises(ValueError, match="Sample.head"):
        Sample(torch.tensor([1.5]), [1], [2])


def test_load_jsonl(tmp_path):
    tok = make_tokenizer(chat=False)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"context": CONTEXT, "question": QUESTION, "id": 7}) + "\n\n"
                    + json.dumps({"context": "red blue", "question": "what"}) + "\n")
    samples = load_jsonl(path, tok)
    assert len(samples) == 2
    assert samples[0].prompt_ids.tolist() == format_sample(tok, CONTEXT, QUESTION).prompt_ids.tolist()
    assert samples[1].context.tolist() == ids(tok, "red blue", special=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "question": "y"}) + "\n" + json.dumps({"context": 3, "question": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'context' must be a string"):
        load_jsonl(bad, tok)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r":1: not valid JSON"):
        load_jsonl(bad, tok)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_jsonl(bad, tok)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no samples"):
        load_jsonl(bad, tok)


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(16, 300), records=st.integers(1, 8), seed=st.integers(0, 1000), extra=st.integers(0, 300))
def test_synthetic_samples_are_lookups(vocab, records, seed, extra):
    task = task_for_vocab(vocab, records)
    K, W = task.key_len, task.record_len
    length = 1 + task.question_len + records * W + extra
    samples = synthetic_samples(vocab, length, 3, seed, num_records=records)
    assert samples[0].prompt_ids.tolist() == synthetic_samples(vocab, length, 3, seed, num_records=records)[0].prompt_ids.tolist()
    assert samples[1].prompt_ids.tolist() == make_sample(task, length, (seed, 1), num_records=records).prompt_ids.tolist()
    for s in samples:
        assert s.prompt_len == length and s.head.tolist() == [syn.BOS]
        assert s.question[0] == syn.QUESTION and s.question.numel() == K + 1
        ctx = s.context.tolist()
        assert all(0 < t < min(vocab, task.vocab_size) for t in ctx)
        at = [p for p, t in enumerate(ctx) if t == syn.REC]
        assert len(at) == records and all(b - a >= W for a, b in zip(at, at[1:]))
        assert all(task.value_start <= ctx[p + K + 1] < task.filler_start for p in at)
        keys = [tuple(ctx[p + 1:p + 1 + K]) for p in at]
        asked = tuple(s.question[1:1 + K].tolist())
        assert len(set(keys)) == records and keys.count(asked) == 1
        p = at[keys.index(asked)]
        assert answer_ids(task, s).tolist() == ctx[p + K + 1:p + W]


def test_synthetic_samples_use_the_default_task_when_it_fits():
    task = Task()
    s = synthetic_samples(50_000, 300, 1, seed=4, num_records=5)[0]
    assert s.prompt_ids.tolist() == make_sample(task, 300, (4, 0), num_records=5).prompt_ids.tolist()
    other = Task(seed=3)
    s = synthetic_samples(50_000, 300, 1, seed=4, num_records=5, task=other)[0]
    assert s.prompt_ids.tolist() == make_sample(other, 300, (4, 0), num_records=5).prompt_ids.tolist()
    with pytest.raises(ValueError, match="more than vocab_size"):
        synthetic_samples(100, 300, 1, task=other)


def test_synthetic_samples_refuse_impossible_requests():
    with pytest.raises(ValueError, match="vocab_size"):
        synthetic_samples(8, 100, 1, num_records=8)
    with pytest.raises(ValueError, match="too short"):
        synthetic_samples(64, 20, 1, num_records=8)
    with pytest.raises(ValueError, match="n must be"):
        synthetic_samples(64, 200, 0)


def calibration_model() -> transformers.PreTrainedModel:
    """The tiny Llama with a 64-token vocabulary (the synthetic task's), EOS token 5."""
    return tiny_model(heads=2, kv_heads=1, vocab=64, intermediate=64, max_positions=512, bos_token_id=0, eos_token_id=5)


def test_answers_are_the_dense_models_greedy_continuation():
    model = calibration_model()
    prompts = synthetic_samples(64, 30, 4, seed=1, num_records=2)
    answered = answer_samples(model, prompts, max_new_tokens=7, progress=False)
    for p, a in zip(prompts, answered):
        assert torch.equal(a.prompt_ids, p.prompt_ids)
        assert a.answer.tolist() == greedy(model, p.prompt_ids, 7, eos=5)
        assert 1 <= a.answer.numel() <= 7
    model.moa_flex = object()
    with pytest.raises(ValueError, match="dense model"):
        answer_samples(model, prompts, max_new_tokens=3, progress=False)


def test_calibration_set_buckets_by_length():
    model = calibration_model()
    samples = [synthetic_samples(64, n, 1, seed=n, num_records=2)[0] for n in (30, 50, 80)]
    calib = calibration_set(model, samples, [64, 36], max_new_tokens=6, progress=False)
    assert sorted(calib) == [36, 64]
    assert [s.prompt_len for s in calib[36]] == [30, 30, 30]  # every sample reaches 36 - 6 = 30
    assert [s.prompt_len for s in calib[64]] == [58]          # only the 80-token one reaches 58
    assert torch.equal(calib[64][0].prompt_ids, samples[2].trimmed(58).prompt_ids)
    assert all(s.num_tokens <= N and s.answer.numel() >= 1 for N, b in calib.items() for s in b)
    assert len(calibration_set(model, samples, [36], max_new_tokens=6, max_per_length=2, progress=False)[36]) == 2
    with pytest.raises(ValueError, match="no sample reaches length 100"):
        calibration_set(model, samples, [100], max_new_tokens=6, progress=False)
