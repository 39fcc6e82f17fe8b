"""The public API: what ``import moa_flex`` exposes, ``moa_flex.compress`` as a library call,
and plans that travel with the model (``save_pretrained`` / ``from_pretrained`` /
``moa_flex.compile(model)`` without a plan)."""

from __future__ import annotations

import pytest
import torch

import moa_flex
from moa_flex.cli import main
from moa_flex.data.calibration import calibration_set, synthetic_samples
from moa_flex.plan import PLAN_FILE, Plan
from moa_flex.profile import instrument
from tiny_models import SEQ, ids_of, sparse_plan, tiny_model

# plans for ~300-token inputs: spans in 16s from 32 up, a 16-token sink
GRID = dict(sink=16, span_multiple=16, min_span=32)


def test_the_top_level_is_a_small_coherent_set() -> None:
    assert sorted(moa_flex.__all__) == sorted(
        ["Budget", "MoaCache", "Plan", "Profile", "backend", "compile", "compress", "masks", "plans", "uncompile"])
    for name in moa_flex.__all__:
        assert getattr(moa_flex, name) is not None, name
    plan = moa_flex.plans.load("Llama-3-8B-Instruct-262k.moa")  # the README's first example
    assert isinstance(plan, moa_flex.Plan) and plan.num_layers == 32
    assert callable(moa_flex.masks.block_mask) and callable(moa_flex.masks.mask_mod)
    assert callable(moa_flex.masks.reference_mask)


def test_plan_travels_with_the_model(tmp_path) -> None:
    model = tiny_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    plan = sparse_plan(model.config, "kv_head", seed=3)
    assert plan.save_pretrained(folder) == str(folder / PLAN_FILE)
    assert Plan.from_pretrained(folder) == plan

    loaded = type(model).from_pretrained(folder, local_files_only=True).eval()
    moa_flex.compile(loaded, backend="eager")  # no plan: the one in the model's folder
    assert loaded.moa_flex.plan == plan
    ids = ids_of(SEQ)
    with torch.no_grad():
        got = loaded(input_ids=ids, use_cache=False).logits
    moa_flex.uncompile(loaded)
    moa_flex.compile(loaded, plan, backend="eager")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, use_cache=False).logits, got)


def test_missing_plans_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="has no moa_plan.json.*moa-flex compress"):
        Plan.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        Plan.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="is not a folder"):
        sparse_plan(tiny_model().config, "kv_head").save_pretrained(tmp_path / "nope")
    model = tiny_model()  # built from a config: no folder
    with pytest.raises(ValueError, match="not loaded from a folder"):
        moa_flex.compile(model)
    model.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m", local_files_only=True).eval()
    with pytest.raises(ValueError, match="has no moa_plan.json"):
        moa_flex.compile(loaded)
    assert getattr(loaded, "moa_flex", None) is None


def test_compress_as_a_library_call(tmp_path, monkeypatch, capsys) -> None:
    """compress() on the tiny model, synthetic data, silent: the best plan of the Pareto set,
    every plan's scores in its meta; a profile path is written once and reused."""
    model = tiny_model()
    profile = tmp_path / "profile.safetensors"
    kw = dict(density=0.5, lengths=[128, 256], samples_per_length=2, max_new_tokens=4, validation_length=300,
              validation_samples=2, profile=profile, progress=False, backend="eager", **GRID)
    plan = moa_flex.compress(model, **kw)
    assert capsys.readouterr().err == "", "progress=False prints nothing"
    assert profile.exists() and not (tmp_path / "profile.safetensors.partial").exists()
    info = plan.meta["compress"]
    assert info["lengths"] == [128, 256] and info["validation_length"] == 300 and info["data"] == "synthetic"
    assert info["selected_by"] == "lowest validation loss at 300 tokens"
    scores = info["plans"]
    assert scores[info["index"]]["validation_loss"] == plan.meta["validation"]["loss"]
    assert plan.meta["validation"]["loss"] == min(s["validation_loss"] for s in scores)
    for s in scores:
        assert all(d <= 0.5 + 1e-9 for d in s["kv_density"].values())
    assert getattr(model, "moa_flex", None) is None, "the model is left dense"

    # the second density reuses the profile: nothing is profiled again
    def no_profiling(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("profiled again")

    monkeypatch.setattr(instrument, "_profile_length", no_profiling)
    sparser = moa_flex.compress(model, **{**kw, "density": 0.25, "select": "profiled"})
    assert all(d <= 0.25 + 1e-9 for d in sparser.meta["kv_density"].values() if d is not None)
    assert sparser.meta["compress"]["selected_by"] == "lowest profiled loss at 256 tokens"
    assert "validation" not in sparser.meta


def test_compress_takes_an_answered_calibration_set() -> None:
    model = tiny_model()
    calib = calibration_set(model, synthetic_samples(128, 124, 2), [128], max_new_tokens=4, progress=False)
    plan = moa_flex.compress(model, density=0.5, lengths=[128], data=calib, select="profiled", progress=False, **GRID)
    assert plan.meta["compress"]["samples"] == {"128": 2} and plan.meta["compress"]["data"] == "dict"
    with pytest.raises(ValueError, match="held-out samples"):
        moa_flex.compress(model, density=0.5, lengths=[128], data=calib, progress=False, **GRID)
    with pytest.raises(ValueError, match="no samples for lengths \\[256\\]"):
        moa_flex.compress(model, density=0.5, lengths=[128, 256], data=calib, select="profiled", progress=False,
                          **GRID)


@pytest.mark.parametrize("kwargs,match", [
    (dict(density=0.0), "density must be in"),
    (dict(density=0.5, select="best"), "select must be one of"),
    (dict(density=0.5, samples_per_length=0), "samples_per_length must be"),
    (dict(density=1e-4), "smallest feasible density"),
    (dict(density=0.5, data=[1, 2, 3]), "data must be"),
])
def test_compress_rejects_bad_input_before_any_work(kwargs, match) -> None:  # noqa: ANN001
    with pytest.raises((ValueError, TypeError), match=match):
        moa_flex.compress(tiny_model(), lengths=[128, 256], progress=False, **{**GRID, **kwargs})


def test_cli_compress_writes_into_the_model_folder(tmp_path, capsys) -> None:
    """Without -o, `moa-flex compress MODEL_DIR` writes MODEL_DIR/moa_plan.json, which
    moa_flex.compile(model) then finds."""
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    rc = main(["compress", str(folder), "--density", "0.5", "--lengths", "128", "256", "--validation-length", "300",
               "--samples", "1", "--validation-samples", "1", "--max-new-tokens", "4", "--sink", "16",
               "--span-multiple", "16", "--min-span", "32", "--backend", "eager", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert (folder / PLAN_FILE).is_file() and (folder / "moa_profile.safetensors").is_file()
    model = type(tiny_model()).from_pretrained(folder, local_files_only=True).eval()
    moa_flex.compile(model, backend="eager")
    assert model.moa_flex.plan == Plan.load(folder / PLAN_FILE)


def test_compiled_forward_runs_without_autograd() -> None:
    """Inference only: a forward outside torch.no_grad() works (the attention op has no
    backward) and its logits carry no graph."""
    model = tiny_model()
    ids = ids_of(SEQ)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    moa_flex.compile(model, Plan.dense(model.config), backend="eager")
    got = model(input_ids=ids, use_cache=False).logits
    assert not got.requires_grad and (got - want).abs().max() <= 1e-5
