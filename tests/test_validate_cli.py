"""Validation of plans (moa_flex.validate) and the ``compress`` / ``show --plot`` commands, on a
tiny random-weight Llama (CPU, fp32). Sample lengths stay in one FlexAttention length bucket
(<= 384 tokens) to keep compiles few."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moa_flex
from moa_flex.plan import FORMAT, ModelShape, Plan
from moa_flex.data.calibration import answer_samples, synthetic_samples
from moa_flex.cli import main
from moa_flex.optimize.validate import response_loss, validate
from reference import reference_logits
from tiny_models import D, H, KVH, VOCAB
from tiny_models import tiny_model as make_model
from word_tokenizers import WORDS, make_tokenizer

# plans for ~300-token samples, validation without inductor (its path: test_compile)
TINY = ["--sink", "16", "--span-multiple", "16", "--min-span", "32", "--max-new-tokens", "4", "--backend", "eager"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The tiny model saved with save_pretrained (no tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model().save_pretrained(path)
    return str(path)


def sparse_plan(config) -> Plan:  # noqa: ANN001
    """Heterogeneous spans well below the samples' ~300 tokens, so the masks cut."""
    alpha = [[32.0, 0.0], [16.0, 48.0]]
    beta = [[0.25, 0.125], [0.0, 0.375]]
    return Plan(ModelShape.from_config(config), alpha, beta, granularity="kv_head", sink=16, span_multiple=16, min_span=32)


@torch.no_grad()
def reference_loss(model, samples, plan: Plan | None = None) -> float:  # noqa: ANN001
    """Mean over samples of the answer tokens' cross-entropy, from full logits and log_softmax;
    with ``plan``, through test_compile's independent reference attention (reference_mask,
    float64) instead of the model's own attention."""
    total = 0.0
    for s in samples:
        ids = s.input_ids.unsqueeze(0)
        if plan is None:
            logits = model(input_ids=ids, use_cache=False).logits[0].double()
        else:
            logits = reference_logits(model, plan, input_ids=ids)[0].double()
        A = s.answer.numel()
        logp = logits[-A - 1:-1].log_softmax(-1)
        total += float(-logp.gather(1, s.answer.view(-1, 1)).mean())
    return total / len(samples)


# ------------------------------------------------------------------------------------------------
# validate()


def test_validate_scores_plans_and_restores_the_model():
    model = make_model()
    samples = answer_samples(model, synthetic_samples(VOCAB, 296, 2, seed=5), max_new_tokens=4, progress=False)
    assert all(280 <= s.num_tokens <= 300 for s in samples)
    ids = samples[0].input_ids.unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits.clone()
    stock = reference_loss(model, samples)
    sparse = sparse_plan(model.config)
    sparse_ref = reference_loss(model, samples, sparse)
    assert abs(sparse_ref - stock) > 1e-4  # the sparse plan really changes the loss
    dense = Plan.dense(model.config, sink=16, span_multiple=16, min_span=32)
    assert response_loss(model, samples) == pytest.approx(stock, abs=1e-5)

    best, losses = validate(model, [sparse, dense], samples, progress=False, backend="eager")

    assert losses[1] == pytest.approx(stock, abs=1e-5)   # dense plan through moa_flex.compile == stock model
    assert losses[0] == pytest.approx(sparse_ref, abs=1e-4)  # sparse plan == independent masked attention
    want = min(range(2), key=lambda i: losses[i])
    assert best is [sparse, dense][want]
    for i, p in enumerate([sparse, dense]):
        v = p.meta["validation"]
        assert v["loss"] == losses[i] and v["samples"] == 2 and v["length"] == max(s.num_tokens for s in samples)
        assert v["dense_loss"] == pytest.approx(stock, abs=1e-5)
        assert v["rank"] == (1 if i == want else 2)
    scores = best.meta["validation"]["scores"]
    assert [s["loss"] for s in scores] == losses and best.meta["validation"]["chosen"] is True
    assert "scores" not in [sparse, dense][1 - want].meta["validation"]
    # restored: no moa_flex state, original forward, same logits
    assert getattr(model, "moa_flex", None) is None and "forward" not in model.__dict__
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        after = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_validate_rejects_bad_input():
    model = make_model()
    samples = answer_samples(model, synthetic_samples(VOCAB, 60, 1, seed=1), max_new_tokens=2, progress=False)
    dense = Plan.dense(model.config, sink=16, span_multiple=16, min_span=32)
    with pytest.raises(ValueError, match="at least one plan"):
        validate(model, [], samples, progress=False)
    with pytest.raises(ValueError, match="at least one sample"):
        validate(model, [dense], [], progress=False)
    with pytest.raises(ValueError, match="no answer tokens"):
        validate(model, [dense], synthetic_samples(VOCAB, 60, 1), progress=False)
    other = Plan.dense(ModelShape(3, H, KVH, D, "other"))
    with pytest.raises(ValueError, match=r"plans\[1\].*num_layers"):
        validate(model, [dense, other], samples, progress=False)
    assert getattr(model, "moa_flex", None) is None  # nothing half-applied


# ------------------------------------------------------------------------------------------------
# moa-flex compress / show --plot


def test_compress_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["compress", model_dir, "--density", "0.5", "--lengths", "128", "256", "--validation-length", "300",
               "--samples", "2", "--validation-samples", "2", "--quiet", "-o", str(out), *TINY])
    text = capsys.readouterr().out
    assert rc == 0
    plan = Plan.load(out)
    plan.check_model(make_model().config)
    assert (plan.sink, plan.span_multiple, plan.min_span) == (16, 16, 32)
    v = plan.meta["validation"]
    assert v["chosen"] is True and v["length"] == 300 and v["samples"] == 2 and v["rank"] == 1
    assert math.isfinite(v["loss"]) and math.isfinite(v["dense_loss"])
    assert v["loss"] == min(s["loss"] for s in v["scores"])
    for N in (128, 256):
        assert plan.kv_density(N) <= 0.5 + 1e-9
    assert plan.meta["lengths"] == [128, 256]
    assert (tmp_path / "plan.json.profile.safetensors").exists()
    assert not (tmp_path / "plan.json.profile.partial").exists()
    moa_flex.Profile.load(tmp_path / "plan.json.profile.safetensors").check_model(make_model())
    assert "<- chosen" in text and "val_loss" in text
    assert len([ln for ln in text.splitlines() if ln.strip().startswith(tuple("0123456789"))]) == len(v["scores"])
    assert json.loads(out.read_text())["format"] == FORMAT


def test_compress_infeasible_density_names_the_smallest(model_dir, tmp_path, capsys):
    rc = main(["compress", model_dir, "--density", "1e-4", "--lengths", "128", "256", "--quiet",
               "-o", str(tmp_path / "plan.json"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("moa-flex: error:") and "smallest feasible density is" in err
    assert not (tmp_path / "plan.json").exists()


def test_compress_rejects_bad_arguments(model_dir, tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nope"), "--density", "0.5", "-o", str(tmp_path / "p.json")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["compress", model_dir, "--density", "1.5", "-o", str(tmp_path / "p.json")]) == 2
    assert "--density must be in (0, 1]" in capsys.readouterr().err
    assert main(["compress", model_dir, "--density", "0.5", "--data", str(tmp_path / "d.jsonl"),
                 "-o", str(tmp_path / "p.json")]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_show_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plan = sparse_plan(make_model().config)
    plan.meta["lengths"] = [128, 256]
    path = tmp_path / "plan.json"
    plan.save(path)
    png = tmp_path / "plan.png"
    assert main(["show", str(path), "--lengths", "256", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "spans at 256 tokens" in capsys.readouterr().out


def test_compress_with_jsonl_data(tmp_path, capsys):
    """--data: prompts from a JSONL file through the folder's tokenizer; the last long-enough
    samples are held out for validation."""
    folder = tmp_path / "model"
    make_model().save_pretrained(folder)
    tokenizer = make_tokenizer(chat=False)
    assert len(tokenizer) <= VOCAB
    tokenizer.save_pretrained(folder)
    gen = torch.Generator().manual_seed(3)
    words = [w for w in WORDS if not w.startswith("<")]
    lines = []
    for n in (400, 420, 440, 460):
        picks = torch.randint(0, len(words), (n,), generator=gen).tolist()
        lines.append(json.dumps({"context": " ".join(words[i] for i in picks), "question": "where is the cat"}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "plan.json"
    rc = main(["compress", str(folder), "--density", "0.5", "--lengths", "128", "256", "--validation-length", "300",
               "--data", str(data), "--samples", "2", "--validation-samples", "2", "--quiet", "-o", str(out), *TINY])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    plan = Plan.load(out)
    assert plan.meta["compress"]["data"] == str(data)
    assert plan.meta["validation"]["samples"] == 2 and plan.meta["validation"]["length"] == 300
    assert plan.meta["compress"]["samples"] == {"128": 2, "256": 2}


def test_show_profile_shares_and_picture(tmp_path, capsys) -> None:  # noqa: ANN001
    """Per head, the cumulative share of its influence by distance, against a hand count."""
    from moa_flex.cli import influence_shares
    from moa_flex.profile.store import Profile

    hist = torch.zeros(2, 2, 4, dtype=torch.float64)  # N=256, bins of 64 tokens
    hist[0, 0, 0] = 2.0  # local
    hist[0, 1, 3] = 1.0  # far only
    hist[1, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # uniform; head [1, 1] has no influence
    shares = influence_shares(hist)
    want = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1], [0.25, 0.5, 0.75, 1], [0, 0, 0, 0]], dtype=torch.float64)
    assert torch.equal(shares, want)
    profile = Profile(ModelShape(2, 2, 2, 16, name="toy"), 64, 64, {256: hist}, {256: torch.zeros(2, 2)}, {256: 3})
    profile.save(tmp_path / "p.safetensors")
    png = tmp_path / "p.png"
    assert main(["show-profile", str(tmp_path / "p.safetensors"), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "N=256: 3 samples; 1 of 4 heads have 90% of their influence within N/8 = 32 tokens" in out
    assert png.stat().st_size > 1000
    assert main(["show-profile", str(tmp_path / "p.safetensors"), "--plot", str(png), "--length", "512"]) == 2
