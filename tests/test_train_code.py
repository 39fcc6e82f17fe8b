"""The code-model trainer end to end on a tiny fake site-packages (CPU, seconds)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moa_flex.plan import Plan
from moa_flex.zoo import train_code
from moa_flex.zoo.train_code import (
    CodeTrainConfig,
    check_config,
    parse_args,
    schedule,
    token_stream,
)

WORDS = ("value", "count", "items", "path", "name", "index", "result", "buffer", "node", "parent", "child", "config",
         "token", "stream", "offset", "length", "limit", "cache", "entry", "record")
N_MODULES = 40


def _module(rng: random.Random, i: int) -> str:
    """A small, unique, code-like module (no stdlib copy, so none is dropped as held out)."""
    lines = [f'"""Module {i}: helpers for {rng.choice(WORDS)} handling."""', "", "import os", "import sys", ""]
    for j in range(rng.randint(3, 6)):
        a, b, c = rng.sample(WORDS, 3)
        lines += [
            "",
            f"def {a}_{b}_{i}_{j}({a}, {b}={rng.randint(0, 99)}):",
            f'    """Return the {c} of ``{a}``."""',
            f"    {c} = []",
            f"    for {b}_item in range({b}):",
            f"        if {b}_item % {rng.randint(2, 9)} == 0:",
            f"            {c}.append({a} + {b}_item)",
            f"    return {c}",
        ]
    lines += ["", "", f"class {rng.choice(WORDS).title()}{i}:",
              "    def __init__(self, value):", "        self.value = value", "",
              "    def __repr__(self):", '        return f"{type(self).__name__}({self.value!r})"', ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site-packages with distribution ``fakepkg`` 1.0 (N_MODULES kept modules, one too-small
    file, one duplicate)."""
    site = tmp_path_factory.mktemp("fake") / "site-packages"
    rng = random.Random(0)
    files = {f"fakepkg/mod_{i:02d}.py": _module(rng, i) for i in range(N_MODULES)}
    files["fakepkg/__init__.py"] = "x = 1\n"  # too_small
    files["fakepkg/zz_copy.py"] = files["fakepkg/mod_00.py"]  # duplicate (sorted after mod_00)
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text, encoding="utf-8")
    info = site / "fakepkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files))
    return site


def _argv(site: Path, out: Path) -> list[str]:
    return ["--out", str(out), "--roots", str(site), "--steps", "20", "--tokens-per-step", "512", "--lengths", "64", "128",
            "--curriculum", "0.5", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup", "2", "--layers", "2", "--hidden", "64",
            "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--intermediate", "128", "--max-position", "256",
            "--vocab-size", "384", "--tokenizer-sample-bytes", "0", "--val-length", "64", "--val-docs", "2",
            "--eval-lengths", "64", "--eval-docs", "1", "--log-every", "5", "--device", "cpu", "--threads", "1",
            "--no-progress", "--no-verbose"]


@pytest.fixture(scope="module")
def runs(fake_site: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """Two runs of the same tiny config and seed (two out folders)."""
    outs = [tmp_path_factory.mktemp("run") / "code" for _ in range(2)]
    argv = _argv(fake_site, outs[0])
    threads = torch.get_num_threads()  # --threads 1 (fast on a shared CPU) is process-wide: restored after
    try:
        train_code.main(argv)
        train_code.main(_argv(fake_site, outs[1]))
    finally:
        torch.set_num_threads(threads)
    return outs[0], outs[1], argv


def test_folder_loads_bf16_and_learns(runs: tuple[Path, Path, list[str]]) -> None:
    out = runs[0]
    for name in ("model.safetensors", "config.json", "generation_config.json", "corpus_manifest.json", "train_log.json",
                 "README.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    assert tok.convert_tokens_to_ids(["<|bos|>", "<|eos|>", "<|pad|>"]) == [0, 1, 2]
    text = "def f(x):\n    return x + 1\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[0] + ids])).logits.shape[-1] == model.config.vocab_size >= len(tok)
    log = json.loads((out / "train_log.json").read_text())
    rows = log["log"]
    assert log["steps_done"] == 20 and log["stopped_by"] == "steps" and [r["step"] for r in rows] == [5, 10, 15, 20]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    ev = log["eval"]["64"]
    assert ev["documents"] == 1 and ev["tokens"] == 63 and 0 < ev["bits_per_byte"] < 10


def test_manifest_and_card(runs: tuple[Path, Path, list[str]], fake_site: Path) -> None:
    out, _, argv = runs
    manifest = json.loads((out / "corpus_manifest.json").read_text())
    kept = sorted(fake_site.glob("fakepkg/mod_*.py"))
    assert manifest["files"] == N_MODULES == len(kept)
    assert manifest["bytes"] == sum(p.stat().st_size for p in kept)
    assert manifest["dropped"]["too_small"] == 1 and manifest["dropped"]["duplicate"] == 1
    assert manifest["dropped"]["heldout"] == 0
    assert manifest["packages"] == {"fakepkg": {"version": "1.0", "files": N_MODULES, "bytes": manifest["bytes"]}}
    log = json.loads((out / "train_log.json").read_text())
    assert log["data"]["corpus_sha256"] == manifest["sha256"]
    assert log["config"]["roots"] == [str(fake_site)]
    card = (out / "README.md").read_text()
    command = "python -m moa_flex.zoo.train_code " + " ".join(argv)
    assert log["command"] == command and command in card
    assert manifest["sha256"] in card and "fakepkg" in card


def test_same_seed_same_weights(runs: tuple[Path, Path, list[str]]) -> None:
    a, b, _ = runs
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
    la, lb = (json.loads((d / "train_log.json").read_text()) for d in (a, b))
    assert [r["loss"] for r in la["log"]] == [r["loss"] for r in lb["log"]]
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_stream_and_schedule(runs: tuple[Path, Path, list[str]]) -> None:
    tok = AutoTokenizer.from_pretrained(runs[0])
    s = token_stream(tok, ["a = 1\n", "b = 2\n"])
    assert s.dtype == np.uint16 and s[0] == 0 and s[-1] == 1
    assert tok.decode(s[1:-1].tolist()) == "a = 1\n<|eos|><|bos|>b = 2\n"
    cfg = CodeTrainConfig(steps=100, lengths=(64, 128, 256), curriculum=0.5)
    lengths = schedule(cfg)
    assert len(lengths) == 100 and lengths[0] == 64 and set(lengths[50:]) == {64, 128, 256}
    assert max(lengths[:25]) <= 128 and schedule(cfg) == lengths


@pytest.mark.parametrize(("flags", "field"), [
    (["--kv-heads", "4", "--heads", "6"], "--heads"),
    (["--steps", "0"], "--steps"),
    (["--lengths", "8", "64"], "--lengths"),
    (["--lengths", "512", "32768"], "--lengths"),
    (["--vocab-size", "100000"], "--vocab-size"),
    (["--curriculum", "1.5"], "--curriculum"),
    (["--save-dtype", "int8"], "--save-dtype"),
    (["--max-corpus-bytes", "-1"], "--max-corpus-bytes"),
])
def test_bad_config_names_the_field(flags: list[str], field: str) -> None:
    cfg = parse_args(flags)
    with pytest.raises(ValueError, match=field):
        check_config(cfg)
    with pytest.raises(ValueError, match=field):
        train_code.train(cfg)


def test_steps_within_fits_the_schedule_to_the_budget() -> None:
    cfg = CodeTrainConfig(steps=200, lengths=(64, 128, 256), curriculum=0.5, warmup=5)
    per = {64: 0.01, 128: 0.03, 256: 0.1}

    def cost(n: int) -> float:  # brute force: the schedule of n steps, step by step
        return 1.1 * sum(per[L] for L in schedule(CodeTrainConfig(steps=n, lengths=cfg.lengths, curriculum=0.5)))

    for budget in (0.5, 2.0, 7.5, 100.0):
        if cost(10) > budget:
            with pytest.raises(ValueError, match="--max-minutes"):
                train_code.steps_within(cfg, per, budget)
            continue
        n = train_code.steps_within(cfg, per, budget)
        assert n == max(k for k in range(cfg.steps + 1) if cost(k) <= budget)


def test_reproduce_command_gives_the_same_config(runs: tuple[Path, Path, list[str]]) -> None:
    out, _, argv = runs
    log = json.loads((out / "train_log.json").read_text())
    fitted = log["fitted_steps"]  # the default --max-minutes fits the steps: 20 tiny steps fit
    assert fitted["steps"] == fitted["requested_steps"] == 20 and set(fitted["step_seconds"]) == {"64", "128"}
    command = log["reproduce"]
    assert command.startswith("python -m moa_flex.zoo.train_code ") and "--max-minutes 0" in command
    again = parse_args(command.split()[3:])
    ran = parse_args(argv)
    for f in ("out", "max_minutes", "progress", "verbose"):
        setattr(again, f, getattr(ran, f))
    assert again == ran
    assert command in (out / "README.md").read_text()


def test_code_samples_are_windows_of_whole_files(runs: tuple[Path, Path, list[str]], fake_site: Path) -> None:
    from moa_flex.data import code_samples

    tok = AutoTokenizer.from_pretrained(runs[0])
    samples = code_samples(tok, 256, 4, seed=3, roots=[str(fake_site)])
    assert len(samples) == 4 and all(s.prompt_len == 256 and not s.head.numel() and not s.question.numel()
                                     for s in samples)
    stream = torch.cat([s.context for s in samples]).tolist()
    assert stream[0] == tok.bos_token_id
    files = {p.read_text() for p in fake_site.glob("fakepkg/mod_*.py")}
    text = tok.decode(stream)
    pieces = text.split("<|eos|><|bos|>")
    assert all(p in files for p in pieces[1:-1]) and len(pieces) >= 3  # whole files between the marks
    again = code_samples(tok, 256, 4, seed=3, roots=[str(fake_site)])
    assert all(torch.equal(a.context, b.context) for a, b in zip(samples, again))
    other = code_samples(tok, 256, 4, seed=4, roots=[str(fake_site)])
    assert not all(torch.equal(a.context, b.context) for a, b in zip(samples, other))
    with pytest.raises(ValueError, match="fill only"):
        code_samples(tok, 256, 10_000, roots=[str(fake_site)])


def test_code_demo_runs_the_whole_job(runs: tuple[Path, Path, list[str]], fake_site: Path, tmp_path: Path) -> None:
    """`moa-flex demo --model code` on a tiny trained code model: calibration on the fake
    site-packages, compress, held-out standard-library evaluation, outputs and bars."""
    from moa_flex.code_demo import CodeDemoConfig, run_code_demo

    cfg = CodeDemoConfig(model_dir=str(runs[0]), out=str(tmp_path / "demo"), densities=(0.5,), lengths=(64, 128),
                         docs=1, profile_lengths=(64, 96), calibration_samples=2, validation_samples=1,
                         max_new_tokens=8, roots=(str(fake_site),), backend="eager", progress=False,
                         spans={"sink": 8, "span_multiple": 8, "min_span": 16})
    summary = run_code_demo(cfg)
    out = tmp_path / "demo"
    for name in ("results.json", "results.md", "plan-moa-0.5.json", "profile.safetensors"):
        assert (out / name).is_file(), name
    plans = summary["results"]["plans"]
    assert set(plans) == {"dense", "MoA d=0.5", "uniform d=0.5"}
    for by in plans.values():
        assert set(by) == {"64", "128"} and all(0 < s["bits_per_byte"] < 20 for s in by.values())
    moa = Plan.load(out / "plan-moa-0.5.json")
    assert moa.kv_density(96) <= 0.5 + 1e-9
    assert len(summary["bars"]) == 1 and summary["bars"][0].startswith("d=0.5 at 128 tokens")
    with pytest.raises(ValueError, match="profile_lengths"):
        run_code_demo(CodeDemoConfig(model_dir=str(runs[0]), profile_lengths=(8,), max_new_tokens=8))
