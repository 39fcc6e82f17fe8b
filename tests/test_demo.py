"""`moa-flex demo` end to end on a tiny model folder trained in the test (CPU): every stage
runs, the files are written, the table and the results agree, the model is restored."""

from __future__ import annotations

import json

import pytest

from moa_flex.cli import main
from moa_flex.plan import Plan
from moa_flex.zoo.train import train
from tiny_models import tiny_train_config as tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_needle")
    train(tiny(out, steps=5, induction_steps=2, eval_samples=1))
    return out


def test_demo_runs_end_to_end(folder, tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--model-dir", str(folder), "-o", str(out), "--densities", "0.5", "--lengths", "256", "384",
                 "--depths", "0", "1", "--samples", "2", "--profile-lengths", "256", "--calibration-samples", "1", "--quiet",
                 "--backend", "eager"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("calibration.jsonl", "profile.safetensors", "plan-moa-0.5.json", "results.json", "results.md", "demo.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert list(res["results"]) == ["dense", "MoA d=0.5", "uniform d=0.5"]
    for name, r in res["results"].items():
        assert len(r["accuracy"]) == 2 and all(len(row) == 2 for row in r["accuracy"])
        assert all(0 <= a <= 1 for row in r["accuracy"] for a in row)
        assert f"| {name} |" in printed
    plan = Plan.load(out / "plan-moa-0.5.json")
    assert plan.kv_density(256) <= 0.5 + 1e-9
    assert res["results"]["MoA d=0.5"]["kv_density"] == [plan.kv_density(256), plan.kv_density(384)]
    assert res["results"]["uniform d=0.5"]["kv_density"][0] == pytest.approx(0.5, abs=0.25)
    lines = [json.loads(x) for x in (out / "calibration.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["length"] == 256 and len(lines[0]["prompt"]) + len(lines[0]["answer"]) <= 256
    assert "MoA / uniform" in printed


def test_demo_rejects_bad_arguments(folder, tmp_path, capsys) -> None:
    assert main(["demo", "--model-dir", str(folder), "-o", str(tmp_path), "--densities", "1.5"]) == 2
    assert "densities" in capsys.readouterr().err
    assert main(["demo", "--model-dir", str(tmp_path / "missing"), "-o", str(tmp_path)]) == 2
