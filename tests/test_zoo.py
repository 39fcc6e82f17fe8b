"""The model zoo: a tiny training run on CPU (the loss falls, one seed gives bit-identical
weights, save + load round trip), the loader's errors, the schedules and the data workers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from moa_flex.data.synthetic import Task, make_batch
from moa_flex.zoo import load_needle_model
from moa_flex.zoo.train import Batches, TrainConfig, length_schedule, lr_at, parse_args, step_batch, train
from tiny_models import tiny_train_config as tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("needle")
    model, task, log = train(tiny(out), argv=["--steps", "40"])
    return out, model, task, log


def test_training_lowers_the_loss_and_writes_the_folder(run):
    out, model, task, log = run
    rows = log["log"]
    assert len(rows) == 8 and rows[-1]["step"] == 40 and log["steps_done"] == 40 and log["stopped_by"] == "steps"
    assert [r["phase"] for r in rows] == ["induction"] * 2 + ["task"] * 6 and rows[1]["step"] == 10
    assert rows[0]["filler_loss"] == 0 and rows[1]["length"] == 33
    first, last = rows[2], rows[-1]
    assert last["filler_loss"] < first["filler_loss"] - 0.1
    assert last["answer_loss"] < first["answer_loss"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "task.json", "train_log.json", "README.md"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["eval"]["lengths"] == [64, 96] and len(saved["eval"]["accuracy"][0]) == 2
    assert saved["command"] == "python -m moa_flex.zoo.train --steps 40"
    card = (out / "README.md").read_text()
    assert "python -m moa_flex.zoo.train --steps 40" in card and "| 96 |" in card
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert "lm_head.weight" not in weights  # tied to the embedding
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 1 and gen["bos_token_id"] == 0


def test_same_seed_gives_bit_identical_weights(run, tmp_path):
    out, *_ = run
    train(tiny(tmp_path / "again"))
    train(tiny(tmp_path / "other", seed=1))
    a, b, c = (load_file(p / "model.safetensors") for p in (out, tmp_path / "again", tmp_path / "other"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_load_round_trip_gives_identical_logits(run):
    out, model, task, _ = run
    loaded, loaded_task = load_needle_model(out)
    assert loaded_task == task and not loaded.training
    assert loaded.config._attn_implementation == "sdpa"
    ids = make_batch(task, 2, 96, seed=123, num_questions=2, num_records=4).input_ids
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = loaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    bf16, _ = load_needle_model(out, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_loader_errors(tmp_path, run):
    out, *_ = run
    with pytest.raises(ValueError, match="not a folder"):
        load_needle_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_needle_model(tmp_path)
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    (tmp_path / "task.json").write_text((out / "task.json").read_text())
    with pytest.raises(ValueError, match=r"no model.safetensors \(weights\)"):
        load_needle_model(tmp_path)


def test_time_budget_stops_training_and_still_saves(tmp_path):
    _, _, log = train(tiny(tmp_path, steps=100_000, max_minutes=1e-9))
    assert log["stopped_by"] == "time budget" and log["steps_done"] < 100_000
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "README.md").is_file()


def test_parse_args_and_bad_config():
    cfg = parse_args(["--steps", "7", "--lengths", "128", "256", "--eval-depths", "0", "0.5", "--no-progress", "--lr", "5e-4"])
    assert cfg.steps == 7 and cfg.lengths == (128, 256) and cfg.eval_depths == (0.0, 0.5) and not cfg.progress and cfg.lr == 5e-4
    assert parse_args([]) == TrainConfig()
    for kw, match in [(dict(heads=3, kv_heads=2), "multiple"), (dict(steps=0), "--steps"), (dict(save_dtype="int8"), "save-dtype"),
                      (dict(task="[1]"), "JSON object"),
                      (dict(induction_steps=40), "induction-steps"), (dict(induction_length=8), "induction-length"),
                      (dict(filler_weight=-1.0), "filler-weight"), (dict(lengths=(16,), question_spacing=1), "too short"), (dict(eval_lengths=(6,)), "too short")]:
        with pytest.raises(ValueError, match=match):
            train(tiny("/nonexistent", **kw))


def test_length_schedule_grows_and_is_deterministic():
    cfg = TrainConfig(steps=200, lengths=(128, 256, 512), curriculum=0.5, induction_steps=0)
    s = length_schedule(cfg)
    assert s == length_schedule(cfg) and len(s) == 200
    assert set(s[:50]) <= {128, 256} and set(s[:10]) == {128}
    assert set(s[100:]) == {128, 256, 512}
    assert length_schedule(replace(cfg, seed=1)) != s
    assert set(length_schedule(replace(cfg, curriculum=0.0))[:20]) == {128, 256, 512}
    warm = length_schedule(replace(cfg, steps=300, induction_steps=100, induction_length=64))
    assert warm[:100] == [64] * 100 and warm[100:] == s  # the curriculum counts task steps only


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(cfg, 0) == pytest.approx(1e-4) and lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3) and lr_at(cfg, 99) == pytest.approx(1e-4)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 99))


def test_worker_processes_give_the_same_batches():
    cfg = TrainConfig(steps=4, lengths=(64, 96), tokens_per_step=256, record_spacing=16, question_spacing=32, workers=1,
                      induction_steps=2, induction_length=32)
    task = Task()
    schedule = length_schedule(cfg)
    batches = Batches(cfg, task, schedule, workers=1)
    try:
        for step in range(4):
            got, want = batches.get(step), step_batch(cfg, task, step, schedule[step])
            assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.targets, want.targets)
    finally:
        batches.close()
