"""KV-cache budgets in bytes of a given cache dtype (``Budget(kv_dtype=...)``, ``moa-flex compress
--kv-dtype``): byte counts against the bytes of real quantized tensors, the optimizer's plans
counted independently of the Budget's own arithmetic, and the CLI plumbing."""

from __future__ import annotations

import re

import pytest
import torch

import moa_flex.demo  # noqa: F401  (binds pipeline.compress at import: imported here, before any test patches it)
import moa_flex.pipeline
from moa_flex.cli import main
from moa_flex.kernels.quant import FP8, quantize_fp8
from moa_flex.optimize import GB, Budget, build_problem, optimize, solve
from moa_flex.optimize.optimizer import to_plan
from moa_flex.plan import ModelShape, Plan
from tiny_models import tiny_model

KW = dict(sink=16, span_multiple=16, min_span=32)
LENGTHS = (128, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": FP8}
TINY = ["--sink", "16", "--span-multiple", "16", "--min-span", "32", "--max-new-tokens", "4", "--backend", "eager",
        "--lengths", "128", "256", "--validation-length", "300", "--samples", "2", "--validation-samples", "2",
        "--quiet"]


def stored_vector_bytes(name: str, head_dim: int) -> int:
    """Bytes the runtime stores per head vector, from real tensors: a block of vectors as the
    cache holds them (fp8: quantized values and their float32 scales), divided by their count."""
    x = torch.randn(8, head_dim)
    if name == "fp8":
        x8, scale = quantize_fp8(x)
        total = x8.numel() * x8.element_size() + scale.numel() * scale.element_size()
    else:
        y = x.to(DTYPES[name])
        total = y.numel() * y.element_size()
    assert total % 8 == 0
    return total // 8


def plan_bytes(plan: Plan, length: int, name: str, batch_size: int) -> int:
    """Cache bytes of a plan at ``length``: its slots per layer and KV head (``cache_spans``),
    K and V, real bytes per stored vector, the whole batch."""
    slots = int(plan.cache_spans(length).sum())
    return slots * 2 * stored_vector_bytes(name, plan.model.head_dim) * batch_size


def random_hist(L: int, H: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """Positive influence in every bin: a longer span always lowers the loss, so a plan keeps
    as many slots as its budget allows."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(L, H, -(-n // 16), generator=gen, dtype=torch.float64) + 0.01 for n in LENGTHS}


# ---------------------------------------------------------------------------- Budget arithmetic


@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_gb_limit_is_the_brute_force_byte_count(head_dim, batch_size):
    shape = ModelShape(4, 8, 2, head_dim)
    gb = 3.7
    for name in DTYPES:
        b = Budget(gb=gb, length=4096, batch_size=batch_size, kv_dtype=name)
        assert b.slot_limits([4096], shape, 2) == {4096: gb * GB / (2 * stored_vector_bytes(name, head_dim) * batch_size)}
    # bf16 by name is the old default count (2 bytes per value, no scales)
    old = Budget(gb=gb, length=4096, batch_size=batch_size).slot_limits([4096], shape, 2)
    assert Budget(gb=gb, length=4096, batch_size=batch_size, kv_dtype="bf16").slot_limits([4096], shape, 2) == old
    # fp8 buys (2 * hd) / (hd + 4) times the slots of bf16: 1 byte per value plus a 4-byte scale
    fp8 = Budget(gb=gb, length=4096, batch_size=batch_size, kv_dtype="fp8").slot_limits([4096], shape, 2)[4096]
    assert fp8 / old[4096] == pytest.approx(2 * head_dim / (head_dim + 4), rel=1e-14)


@pytest.mark.parametrize("value_dim", [8, 32])
def test_gb_limit_counts_values_at_their_own_width(value_dim):
    """Values narrower (MiMo-V2) or wider (DiffLlama's two halves side by side) than keys: a slot
    holds one key of head_dim and one value of value_dim, by real bytes; the shape says so from
    the config, and a plan's JSON keeps it."""
    from moa_flex.support import tiny_config

    shape = ModelShape(4, 8, 2, 16, value_dim=value_dim)
    for name in DTYPES:
        b = Budget(gb=1.5, length=4096, batch_size=2, kv_dtype=name)
        per_slot = (stored_vector_bytes(name, 16) + stored_vector_bytes(name, value_dim)) * 2
        assert b.slot_limits([4096], shape, 2) == {4096: 1.5 * GB / per_slot}
    diff = tiny_config("diffllama")
    assert ModelShape.from_config(diff).value_dim == 2 * diff.head_dim
    mimo = tiny_config("mimo_v2_flash")
    assert ModelShape.from_config(mimo).value_dim == mimo.v_head_dim
    assert ModelShape.from_config(tiny_config("llama")).value_dim is None  # as wide as keys: not written
    plan = Plan.dense(diff)
    assert Plan.from_dict(plan.to_dict()).model == plan.model
    assert "value_dim" not in Plan.dense(tiny_config("llama")).to_dict()["model"]


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_gb_limit_counts_an_indexers_keys_by_the_caches_real_bytes(model_type):
    """DeepSeek Sparse Attention: the cache keeps each kept token's indexer key beside its
    latent (model dtype). A GB budget's bytes per slot equal a real MoaCache's bytes per slot,
    for every cache dtype; the shape reads ``index_dim`` from the config and a plan keeps it."""
    from moa_flex.runtime.cache import MoaCache
    from moa_flex.support import tiny_config

    config = tiny_config(model_type)
    shape = ModelShape.from_config(config)
    assert shape.index_dim == config.index_head_dim
    plan = Plan.dense(config)
    assert Plan.from_dict(plan.to_dict()).model == plan.model
    assert "index_dim" not in Plan.dense(tiny_config("deepseek_v3")).to_dict()["model"]
    N, batch = 96, 2
    for model_dtype, kv in ((torch.bfloat16, "bf16"), (torch.bfloat16, "fp8"), (torch.float16, "fp16"),
                            (torch.float32, "fp32")):
        cache = MoaCache(plan, batch, N, dtype=model_dtype, config=config, kv_dtype=kv)
        assert cache.moa_layers[0].index_keys is not None
        if kv != "fp8":  # a dense plan's cache in the model's dtype is the dense cache, indexer keys too
            assert cache.memory_bytes() == cache.dense_memory_bytes()
        per_slot = cache.memory_bytes() / (cache.slots() * batch)
        budget = Budget(gb=0.01, length=N, batch_size=batch, kv_dtype=kv)
        assert budget.slot_limits([N], shape, 1) == {N: pytest.approx(0.01 * GB / (per_slot * batch), rel=1e-12)}
    # without kv_dtype: dtype_bytes per value, the indexer's keys too
    cache = MoaCache(plan, batch, N, dtype=torch.float32, config=config)
    per_slot = cache.memory_bytes() / (cache.slots() * batch)
    got = Budget(gb=0.01, length=N, batch_size=batch, dtype_bytes=4).slot_limits([N], shape, 1)[N]
    assert got == pytest.approx(0.01 * GB / (per_slot * batch), rel=1e-12)
    with pytest.raises(ValueError, match="one cache group"):
        Budget(gb=0.01, length=N).slot_limits([N], shape, 2)


def test_kv_dtype_names_dtypes_and_serialization():
    for value in ("fp8", "FP8", "float8_e4m3fn", "torch.float8_e4m3fn", FP8):
        assert Budget(gb=1.0, length=128, kv_dtype=value).kv_dtype == FP8
    assert Budget(gb=1.0, length=128, kv_dtype="bfloat16").kv_dtype == torch.bfloat16
    b = Budget(gb=0.5, length=1024, batch_size=4, kv_dtype=torch.float8_e4m3fn)
    assert b.to_dict() == {"gb": 0.5, "length": 1024, "batch_size": 4, "kv_dtype": "fp8"}
    assert Budget(**b.to_dict()) == b
    # without kv_dtype nothing changes, in the record either
    assert Budget(density=0.5).to_dict() == {"density": 0.5, "batch_size": 1, "dtype_bytes": 2}
    assert Budget(density=0.5).kv_dtype is None


def test_density_and_token_budgets_accept_kv_dtype_without_changing_limits():
    shape = ModelShape(4, 8, 2, 64)
    for kw in (dict(density=0.3), dict(density=0.3, length=512), dict(tokens=700.0, length=512)):
        plain = Budget(**kw).slot_limits([256, 512], shape, 2)
        for name in DTYPES:
            b = Budget(**kw, kv_dtype=name)
            assert b.slot_limits([256, 512], shape, 2) == plain
            assert b.to_dict()["kv_dtype"] == name
        with pytest.raises(ValueError, match="kv_dtype must be one of"):
            Budget(**kw, kv_dtype="int4")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gb=1.0, length=128, kv_dtype="fp8", dtype_bytes=1), "kv_dtype or dtype_bytes, not both"),
        (dict(gb=1.0, length=128, kv_dtype="fp32", dtype_bytes=4), "not both"),
        (dict(gb=1.0, length=128, kv_dtype="e5m2"), "kv_dtype must be one of"),
        (dict(gb=1.0, length=128, kv_dtype=torch.int8), "kv_dtype must be one of"),
        (dict(density=0.5, kv_dtype=torch.float8_e5m2), "kv_dtype must be one of"),
    ],
)
def test_kv_dtype_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


# ---------------------------------------------------------------------------- the optimizer's plans


def test_fp8_gb_budget_keeps_more_slots_within_its_bytes():
    """At the same GB, the solved plan under an fp8 cache keeps more slots than under bf16, and
    each stays within the GB when its slots are counted in the real tensors' bytes."""
    shape, batch, N = ModelShape(3, 8, 2, 64), 2, 256
    hist = random_hist(3, 8)
    dense = N * 3 * 2 * 2 * stored_vector_bytes("bf16", 64) * batch  # a dense bf16 cache's bytes at N
    gb = 0.35 * dense / GB
    kept = {}
    for name in ("bf16", "fp8"):
        budget = Budget(gb=gb, length=N, batch_size=batch, kv_dtype=name)
        prob = build_problem(hist, shape, budget, **KW)
        plan = to_plan(prob, solve(prob, N, solver="cbc", gap_rel=0.0))
        assert plan_bytes(plan, N, name, batch) <= gb * GB
        assert plan.meta["budget"]["kv_dtype"] == name
        kept[name] = int(plan.cache_spans(N).sum())
    assert kept["fp8"] > kept["bf16"]
    # the budget binds: bf16 cannot hold what fp8 keeps
    assert kept["fp8"] * 2 * stored_vector_bytes("bf16", 64) * batch > gb * GB
    # every Pareto plan of optimize() stays within the bytes too
    for plan in optimize(hist, shape, Budget(gb=gb, length=N, batch_size=batch, kv_dtype="fp8"), solver="cbc",
                         progress=False, **KW):
        assert plan_bytes(plan, N, "fp8", batch) <= gb * GB


def test_infeasible_gb_budget_names_the_cache_dtype():
    shape = ModelShape(2, 4, 2, 64)
    with pytest.raises(ValueError, match=r"smallest feasible budget is .* GB for batch 1 at length 256 with kv_dtype fp8"):
        solve(build_problem(random_hist(2, 4), shape, Budget(gb=1e-9, length=256, kv_dtype="fp8"), **KW), 256,
              solver="cbc")


# ---------------------------------------------------------------------------- moa-flex compress --kv-dtype


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(path)
    return str(path)


class Reached(Exception):
    pass


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--density", "0.5"], Budget(density=0.5)),
        (["--density", "0.5", "--kv-dtype", "fp8"], Budget(density=0.5, kv_dtype="fp8")),
        (["--tokens", "300", "--budget-length", "512", "--kv-dtype", "fp16"],
         Budget(tokens=300.0, length=512, kv_dtype="fp16")),
        (["--gb", "0.25", "--budget-length", "4096", "--batch-size", "8", "--kv-dtype", "fp8"],
         Budget(gb=0.25, length=4096, batch_size=8, kv_dtype="fp8")),
        (["--gb", "0.25", "--budget-length", "4096"], Budget(gb=0.25, length=4096)),
    ],
)
def test_cli_budget_flags_reach_the_budget(flags, want, model_dir, tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_compress(model, *, density, **kw):  # noqa: ANN001, ANN003
        seen["budget"] = density
        raise Reached

    monkeypatch.setattr(moa_flex.pipeline, "compress", fake_compress)
    with pytest.raises(Reached):
        main(["compress", model_dir, *flags, "-o", str(tmp_path / "p.json")])
    assert seen["budget"] == want


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--gb", "1", "--kv-dtype", "fp8"], "--gb needs --budget-length"),
        (["--tokens", "100"], "--tokens needs --budget-length"),
        (["--gb", "0", "--budget-length", "256"], "--gb must be a finite number > 0"),
        (["--gb", "1", "--budget-length", "256", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--density", "1.5"], r"--density must be in \(0, 1\]"),
    ],
)
def test_cli_budget_flag_errors(flags, match, model_dir, tmp_path, capsys):
    assert main(["compress", model_dir, *flags, "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moa-flex: error:")
    assert re.search(match, err), err


def test_cli_rejects_unknown_kv_dtype_and_two_budgets(model_dir, tmp_path, capsys):
    for flags in (["--density", "0.5", "--kv-dtype", "int8"], ["--density", "0.5", "--gb", "1"]):
        with pytest.raises(SystemExit):
            main(["compress", model_dir, *flags, "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert "invalid choice: 'int8'" in err and "not allowed with argument" in err
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--kv-dtype {bf16,fp16,fp32,fp8}" in text and "does not change the solve" in text


def test_cli_compress_gb_fp8_end_to_end(model_dir, tmp_path, capsys):
    """The whole pipeline under a GB budget of an fp8 cache: the plan records kv_dtype and fits
    the bytes; a GB budget too small names the smallest one with its cache dtype."""
    N, batch = 256, 2
    gb = 0.5 * (N * 2 * 2 * 2 * stored_vector_bytes("bf16", 16) * batch) / GB  # half a dense bf16 cache
    out = tmp_path / "plan.json"
    rc = main(["compress", model_dir, "--gb", repr(gb), "--budget-length", str(N), "--batch-size", str(batch),
               "--kv-dtype", "fp8", "-o", str(out), *TINY])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    plan = Plan.load(out)
    assert plan.meta["compress"]["budget"] == {"gb": gb, "length": N, "batch_size": batch, "kv_dtype": "fp8"}
    assert plan_bytes(plan, N, "fp8", batch) <= gb * GB
    rc = main(["compress", model_dir, "--gb", "1e-9", "--budget-length", str(N), "--kv-dtype", "fp8",
               "-o", str(tmp_path / "small.json"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "smallest feasible budget is" in err and "with kv_dtype fp8" in err
    assert not (tmp_path / "small.json").exists()
