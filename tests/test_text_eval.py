"""Quality on real text (moa_flex.zoo.text_eval): far-copy positions against brute force, and
every plan's sums against independent computations from the stock model and the reference."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_flex.plan import Plan
from moa_flex.zoo.text_eval import Scores, TextEval, documents, evaluate, far_copy_positions
from reference import reference_logits
from tiny_models import sparse_plan, tiny_model
from word_tokenizers import numbered_tokenizer


def brute_far(ids: list[int], k: int, window: int) -> list[bool]:
    out = [False] * len(ids)
    for t in range(k, len(ids)):
        ends = [e for e in range(k, t) if ids[e - k:e] == ids[t - k:t]]
        near = any(t - e <= window for e in ends)
        out[t] = not near and any(ids[e] == ids[t] for e in ends if t - e > window)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=60), st.integers(1, 3), st.integers(0, 10))
def test_far_copy_positions_equal_brute_force(ids: list[int], k: int, window: int) -> None:
    assert far_copy_positions(ids, k, window).tolist() == brute_far(ids, k, window)


def test_effective_context_is_where_accuracy_stays_within_the_fraction() -> None:
    result = TextEval([256, 512, 1024], 4, 64)
    acc = {"dense": [0.8, 0.8, 0.8], "a": [0.8, 0.73, 0.7], "b": [0.5, 0.8, 0.8], "c": [0.8, 0.6, 0.8]}
    for name, values in acc.items():
        result.scores[name] = {n: Scores(far_tokens=100, far_correct=round(100 * v)) for n, v in zip(result.lengths, values)}
    # b falls short at the first length, c in the middle: neither stays past it
    assert [result.effective_context(n) for n in ("dense", "a", "b", "c")] == [1024, 512, 0, 256]
    assert "effective context" in result.table() and result.to_dict()["effective_context"]["a"] == 512
    for name in acc:  # a length with too few far-copy tokens to tell does not count
        result.scores[name][256] = Scores(far_tokens=20, far_correct=20 if name == "dense" else 5)
    assert [result.effective_context(n) for n in ("dense", "a", "b", "c")] == [1024, 512, 1024, 0]


def test_scores_equal_independent_sums_for_dense_and_sparse_plans() -> None:
    model = tiny_model()
    tok = numbered_tokenizer()
    gen = torch.Generator().manual_seed(3)
    # a text with repeats (far copies exist) in the numbered tokenizer's words
    base = torch.randint(1, 120, (60,), generator=gen).tolist()
    text = " ".join(f"w{i}" for i in base * 6)
    docs = {96: documents(tok, [text], 96, 2), 160: documents(tok, [text], 160, 1)}
    assert [len(d) for d in docs[96]] == [96, 96] and docs[96][0] == tok.encode(text, add_special_tokens=False)[:96]
    plan = sparse_plan(model.config, "kv_head", seed=4)
    result = evaluate(model, tok, {"sparse": plan}, docs, k=3, window=40, backend="eager", progress=False)
    assert getattr(model, "moa_flex", None) is None, "the model is left as it was"
    for name, p in (("dense", Plan.dense(model.config)), ("sparse", plan)):
        for n, ds in docs.items():
            s = result.scores[name][n]
            nats = far_nats = 0.0
            far_tokens = far_correct = nbytes = 0
            for d in ds:
                ids = torch.tensor([d])
                logits = reference_logits(model, p, input_ids=ids)[0, :-1].double()
                target = ids[0, 1:]
                nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
                far = torch.tensor(brute_far(d, 3, 40))[1:]
                nats += float(nll.sum())
                far_nats += float(nll[far].sum())
                far_tokens += int(far.sum())
                far_correct += int((logits.argmax(-1) == target)[far].sum())
                nbytes += len(tok.decode(d[1:]).encode())
            assert s.documents == len(ds) and s.bytes == nbytes and s.far_tokens == far_tokens > 0
            assert s.far_correct == far_correct
            assert math.isclose(s.nats, nats, rel_tol=1e-5) and math.isclose(s.far_nats, far_nats, rel_tol=1e-5)
            assert math.isclose(s.bits_per_byte, nats / math.log(2) / nbytes, rel_tol=1e-5)
    assert result.scores["sparse"][160].nats != result.scores["dense"][160].nats, "the plan really cuts"


def test_cli_eval_writes_the_table_json_and_png(tmp_path, capsys) -> None:  # noqa: ANN001
    import json

    from moa_flex.cli import main

    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    numbered_tokenizer().save_pretrained(folder)
    texts = tmp_path / "texts"
    texts.mkdir()
    gen = torch.Generator().manual_seed(5)
    for i in range(3):
        words = torch.randint(1, 120, (50,), generator=gen).tolist() * 3
        (texts / f"f{i}.txt").write_text(" ".join(f"w{w}" for w in words))
    plan = tmp_path / "sparse.json"
    sparse_plan(tiny_model().config, "kv_head", seed=1).save(plan)
    out = tmp_path / "out"
    assert main(["eval", str(folder), "--plans", str(plan), "--uniform", "0.5", "--lengths", "64", "128", "--docs",
                 "2", "--k", "3", "--window", "30", "--text-dir", str(texts), "--backend", "eager", "--quiet",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sparse.json" in printed and "uniform d=0.5" in printed and "effective context" in printed
    data = json.loads((out / "text_eval.json").read_text())
    assert set(data["plans"]) == {"dense", "sparse.json", "uniform d=0.5"} and data["lengths"] == [64, 128]
    assert data["plans"]["dense"]["128"]["documents"] == 2 and (out / "text_eval.png").stat().st_size > 0
    assert main(["eval", str(folder), "--lengths", "100000", "--text-dir", str(texts), "--docs", "1"]) == 2
