"""Tests of the plan (moa_flex/plan.py) and the shipped plans (moa_flex.plans).

Every expected value is computed independently of the library: spans with plain Python from
the formula in docs/DESIGN.md, densities by brute-force counting, upstream spans straight from the
MoA authors' JSON files.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_flex.plan import FORMAT, ModelShape, Plan
from moa_flex import plans as shipped
from moa_flex.plan import kept_pairs
from moa_flex.plans import convert_upstream

UPSTREAM_DIR = Path(__file__).resolve().parents[2] / "shared" / "upstream_moa_plans"
SHIPPED_DIR = Path(shipped.__file__).resolve().parent

# Real attention shapes (num_layers, num_heads, num_kv_heads, head_dim), from each model's
# config.json on the Hugging Face Hub; written out here independently of convert_upstream.
MODEL_SHAPES = {
    "gradientai/Llama-3-8B-Instruct-262k": (32, 32, 8, 128),
    "gradientai/Llama-3-70B-Instruct-262k": (80, 64, 8, 128),
    "lmsys/vicuna-7b-v1.5-16k": (32, 32, 32, 128),
    "lmsys/vicuna-13b-v1.5-16k": (40, 40, 40, 128),
    "meta-llama/Llama-3.2-1B-Instruct": (16, 32, 8, 64),
    "meta-llama/Llama-3.2-3B-Instruct": (28, 24, 8, 128),
}


# ---------------------------------------------------------------------------- brute force
def ref_span(alpha: float, beta: float, N: int, sink: int, m: int, min_span: int) -> int:
    """docs/DESIGN.md: min(N, max(min_span, ceil_to_multiple(alpha + beta * N, m))), plain Python."""
    del sink
    return min(N, max(min_span, math.ceil((alpha + beta * N) / m) * m))


def ref_group_spans(plan_dict: dict, N: int) -> list[list[int]]:
    """[L][G] spans from a plan's JSON object, plain Python."""
    return [
        [
            ref_span(a, b, N, plan_dict["sink"], plan_dict["span_multiple"], plan_dict["min_span"])
            for a, b in zip(arow, brow)
        ]
        for arow, brow in zip(plan_dict["alpha"], plan_dict["beta"])
    ]


def ref_head_spans(plan_dict: dict, N: int) -> list[list[int]]:
    """[L][H] span of every query head, plain Python."""
    m = plan_dict["model"]
    H, KVH = m["num_heads"], m["num_kv_heads"]
    gs = ref_group_spans(plan_dict, N)
    if plan_dict["granularity"] == "head":
        return gs
    per_kv = H // KVH
    return [[row[h // per_kv] for h in range(H)] for row in gs]


def ref_cache_slots(plan_dict: dict, N: int) -> list[list[int]]:
    """[L][KVH]: largest span among the query heads that read each KV head."""
    m = plan_dict["model"]
    H, KVH = m["num_heads"], m["num_kv_heads"]
    per_kv = H // KVH
    hs = ref_head_spans(plan_dict, N)
    return [[max(row[h] for h in range(H) if h // per_kv == kv) for kv in range(KVH)] for row in hs]


def ref_kv_density(plan_dict: dict, N: int) -> float:
    slots = [s for row in ref_cache_slots(plan_dict, N) for s in row]
    return sum(slots) / len(slots) / N


_KEPT_CACHE: dict[tuple[int, int, int], int] = {}


def ref_kept(span: int, sink: int, N: int) -> int:
    """Kept (i, j) pairs of one head: a dense boolean matrix of the keep rule, counted."""
    key = (span, sink, N)
    if key not in _KEPT_CACHE:
        i = torch.arange(N).view(-1, 1)
        j = torch.arange(N).view(1, -1)
        keep = (j <= i) & ((j < sink) | (i - j < span - sink))
        _KEPT_CACHE[key] = int(keep.sum())
    return _KEPT_CACHE[key]


def ref_kept_loops(span: int, sink: int, N: int) -> int:
    """The same count with explicit loops (used to cross-check ref_kept on small N)."""
    return sum(1 for i in range(N) for j in range(N) if j <= i and (j < sink or i - j < span - sink))


def ref_attention_density(plan_dict: dict, N: int) -> float:
    m = plan_dict["model"]
    hs = ref_head_spans(plan_dict, N)
    kept = sum(ref_kept(s, plan_dict["sink"], N) for row in hs for s in row)
    return kept / (m["num_heads"] * m["num_layers"] * N * (N + 1) / 2)


# ---------------------------------------------------------------------------- strategies
alphas = st.one_of(st.integers(-2000, 2000).map(float), st.floats(-2000, 2000, allow_nan=False))
betas = st.one_of(
    st.sampled_from([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]),
    st.floats(0.0, 1.0, allow_nan=False),
)


@st.composite
def plan_dicts(draw, granularity=None, alpha=alphas, beta=betas) -> dict:
    """A random valid plan JSON object (small shapes, GQA and MHA, both granularities)."""
    L = draw(st.integers(1, 3))
    KVH = draw(st.integers(1, 3))
    H = KVH * draw(st.integers(1, 3))
    gran = granularity or draw(st.sampled_from(["kv_head", "head"]))
    G = KVH if gran == "kv_head" else H
    sink = draw(st.integers(0, 80))
    min_span = draw(st.integers(sink + 1, sink + 200))
    m = draw(st.integers(1, 100))
    return {
        "format": FORMAT,
        "model": {"num_layers": L, "num_heads": H, "num_kv_heads": KVH, "head_dim": 16, "name": "rand"},
        "granularity": gran,
        "sink": sink,
        "span_multiple": m,
        "min_span": min_span,
        "alpha": [[draw(alpha) for _ in range(G)] for _ in range(L)],
        "beta": [[draw(beta) for _ in range(G)] for _ in range(L)],
        "meta": {"note": draw(st.text(max_size=8)), "lengths": [4096, 16384]},
    }


lengths = st.integers(1, 300)
EXAMPLES = settings(max_examples=100, deadline=None)


def base_dict(granularity: str = "kv_head") -> dict:
    """A small valid plan: 2 layers, 4 query heads, 2 KV heads."""
    G = 2 if granularity == "kv_head" else 4
    return {
        "format": FORMAT,
        "model": {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "name": "tiny"},
        "granularity": granularity,
        "sink": 4,
        "span_multiple": 8,
        "min_span": 16,
        "alpha": [[float(10 * g) for g in range(G)] for _ in range(2)],
        "beta": [[0.5] * G for _ in range(2)],
        "meta": {"source": "test"},
    }


# ---------------------------------------------------------------------------- 1. round trip
def _round_trip(plan: Plan, path: Path) -> Plan:
    plan.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "moa-flex.plan/1"
    assert data == plan.to_dict()
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.to_dict() == plan.to_dict()
    assert torch.equal(loaded.alpha, plan.alpha) and torch.equal(loaded.beta, plan.beta)
    return loaded


@pytest.mark.parametrize("granularity", [None, "kv_head", "head"])
def test_round_trip_uniform_and_dense(tmp_path, granularity):
    shape = ModelShape(3, 8, 2, 32, "rt-model")
    for plan in (
        Plan.uniform(shape, alpha=512, beta=0.25, granularity=granularity, sink=16, span_multiple=32,
                     min_span=64, meta={"density": 0.5}),
        Plan.dense(shape, granularity=granularity),
    ):
        loaded = _round_trip(plan, tmp_path / "p.json")
        assert loaded.granularity == (granularity or "kv_head")
        assert loaded.meta == plan.meta and loaded.model == shape


@settings(EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=plan_dicts())
def test_round_trip_random_plan(tmp_path, data):
    plan = Plan.from_dict(data)
    assert plan.to_dict() == data  # every value survives construction unchanged
    loaded = _round_trip(plan, tmp_path / "rand.json")
    assert loaded.granularity == data["granularity"]


def test_eq_detects_any_change():
    a = Plan.from_dict(base_dict())
    assert a == Plan.from_dict(base_dict())
    for key, value in [("sink", 5), ("span_multiple", 16), ("min_span", 24), ("granularity", "head"),
                       ("meta", {"source": "other"})]:
        d = base_dict()
        d[key] = value
        if key == "granularity":
            d["alpha"], d["beta"] = base_dict("head")["alpha"], base_dict("head")["beta"]
        assert Plan.from_dict(d) != a, key
    d = base_dict()
    d["alpha"][1][1] += 1e-9
    assert Plan.from_dict(d) != a
    d = base_dict()
    d["model"]["name"] = "other"
    assert Plan.from_dict(d) != a
    assert a != "not a plan"


# ---------------------------------------------------------------------------- 2. validation
def _with(granularity="kv_head", **changes) -> dict:
    d = base_dict(granularity)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = d
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if isinstance(target, list):
            target[int(leaf)] = value
        else:
            target[leaf] = value
    return d


def _without(key: str) -> dict:
    d = base_dict()
    del d[key]
    return d


def _upstream_dict() -> dict:
    return {"alphas": [[0.0] * 4] * 2, "betas": [[0.5] * 4] * 2}


INVALID = {
    "unknown format": (_with(format="moa-flex.attention"), r"plan\.format must be 'moa-flex\.plan/1', got 'moa-flex\.attention'"),
    "no format": (_without("format"), r"plan\.format must be .*got None"),
    "wrong version": (_with(format="moa-flex.plan/2"), r"plan\.format .*'moa-flex\.plan/2'"),
    "upstream dict": (_upstream_dict(), r"plan\.format.*from_moa_json"),
    "not a dict": ([1, 2], r"JSON object.*list"),
    "unknown field": ({**base_dict(), "extra": 1}, r"unknown fields \['extra'\]"),
    "unknown model field": (_with(model__num_experts=3), r"plan\.model has unknown fields \['num_experts'\]"),
    "missing model.num_kv_heads": (
        {**base_dict(), "model": {"num_layers": 2, "num_heads": 4}}, r"plan\.model\.num_kv_heads is missing"
    ),
    "alpha layers": (_with(alpha=[[0.0, 0.0]] * 3), r"plan\.alpha has 3 layers, expected 2 \(model\.num_layers\)"),
    "beta layers": (_with(beta=[[0.5, 0.5]]), r"plan\.beta has 1 layers, expected 2"),
    "alpha not a list": (_with(alpha=1.0), r"plan\.alpha must be a list"),
    "beta entries kv_head": (
        _with(beta__1=[0.5, 0.5, 0.5]),
        r"plan\.beta\[1\] has 3 entries, expected 2 \(G = model\.num_kv_heads for granularity 'kv_head'\)",
    ),
    "beta entries head": (
        _with("head", beta__1=[0.5, 0.5]),
        r"plan\.beta\[1\] has 2 entries, expected 4 \(G = model\.num_heads for granularity 'head'\)",
    ),
    "alpha entries head": (_with("head", alpha__0=[0.0] * 5), r"plan\.alpha\[0\] has 5 entries, expected 4"),
    "alpha string": (_with(alpha__0__1="12"), r"plan\.alpha\[0\]\[1\] must be a number, got '12'"),
    "beta bool": (_with(beta__0__0=True), r"plan\.beta\[0\]\[0\] must be a number, got True"),
    "nan alpha": (_with(alpha__0__1=float("nan")), r"plan\.alpha\[0\]\[1\] must be finite, got nan"),
    "inf beta": (_with(beta__1__0=float("inf")), r"plan\.beta\[1\]\[0\] must be finite, got inf"),
    "-inf alpha": (_with(alpha__1__1=float("-inf")), r"plan\.alpha\[1\]\[1\] must be finite"),
    "beta < 0": (_with(beta__0__1=-0.01), r"plan\.beta\[0\]\[1\] must be in \[0, 1\], got -0\.01"),
    "beta > 1": (_with(beta__1__0=1.5), r"plan\.beta\[1\]\[0\] must be in \[0, 1\], got 1\.5"),
    "min_span == sink": (_with(sink=16, min_span=16), r"plan\.min_span \(16\) must be > plan\.sink \(16\)"),
    "min_span < sink": (_with(sink=64, min_span=32), r"plan\.min_span \(32\) must be > plan\.sink \(64\)"),
    "span_multiple 0": (_with(span_multiple=0), r"plan\.span_multiple must be >= 1, got 0"),
    "span_multiple float": (_with(span_multiple=8.0), r"plan\.span_multiple must be an integer"),
    "sink negative": (_with(sink=-1), r"plan\.sink must be >= 0, got -1"),
    "num_layers 0": (_with(model__num_layers=0), r"plan\.model\.num_layers must be >= 1, got 0"),
    "heads not divisible": (
        _with(model__num_heads=6, model__num_kv_heads=4, alpha=[[0.0] * 4] * 2, beta=[[0.5] * 4] * 2),
        r"plan\.model\.num_heads \(6\) must be divisible by plan\.model\.num_kv_heads \(4\)",
    ),
    "unknown granularity": (_with(granularity="query"), r"plan\.granularity must be one of .*got 'query'"),
    "meta not a dict": (_with(meta=[1]), r"plan\.meta must be a JSON object"),
}
for _key in ("model", "granularity", "sink", "span_multiple", "min_span", "alpha", "beta"):
    INVALID[f"missing {_key}"] = (_without(_key), rf"plan\.{_key} is missing")


@pytest.mark.parametrize("case", sorted(INVALID), ids=sorted(INVALID))
def test_from_dict_rejects(case):
    data, pattern = INVALID[case]
    before = copy.deepcopy(data)
    with pytest.raises(ValueError, match=pattern):
        Plan.from_dict(data)
    assert repr(data) == repr(before)  # a failed load does not touch its input (repr: NaN != NaN)


@pytest.mark.parametrize("case", ["wrong version", "beta entries head", "min_span == sink", "missing alpha"])
def test_load_rejects_with_path_and_field(tmp_path, case):
    data, pattern = INVALID[case]
    path = tmp_path / "bad-plan.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=pattern) as info:
        Plan.load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_load_rejects_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "moa-flex.plan/1", "sink": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        Plan.load(path)


def test_from_moa_json_rejects_missing_betas(tmp_path):
    path = tmp_path / "up.json"
    path.write_text(json.dumps({"alphas": [[0.0, 0.0]]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"up\.json: .*'betas'"):
        Plan.from_moa_json(path)


def test_from_moa_json_rejects_bad_values(tmp_path):
    path = tmp_path / "up.json"
    path.write_text(json.dumps({"alphas": [[0.0, 0.0], [0.0, 0.0]], "betas": [[0.5, 0.5], [0.5, 2.0]]}))
    with pytest.raises(ValueError, match=r"up\.json: betas\[1\]\[1\] must be in \[0, 1\], got 2\.0"):
        Plan.from_moa_json(path)
    path.write_text(json.dumps({"alphas": [[0.0, 0.0], [0.0]], "betas": [[0.5, 0.5], [0.5, 0.5]]}))
    with pytest.raises(ValueError, match=r"up\.json: alphas\[1\] has 1 entries, expected 2"):
        Plan.from_moa_json(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match=r"up\.json: not valid JSON"):
        Plan.from_moa_json(path)


def test_from_dict_does_not_mutate_or_alias_input():
    data = base_dict()
    before = copy.deepcopy(data)
    plan = Plan.from_dict(data)
    assert data == before
    # later edits of the input do not reach the plan
    data["alpha"][0][0] = 999.0
    data["beta"][0][0] = 0.0
    data["meta"]["source"] = "edited"
    data["model"]["num_layers"] = 7
    assert plan == Plan.from_dict(before)


def _llama(layers=2, heads=4, kv_heads=2, head_dim=8):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        hidden_size=heads * head_dim, intermediate_size=64, vocab_size=100,
    )


def test_check_model_against_transformers_config():
    plan = Plan.from_dict(base_dict())  # 2 layers, 4 heads, 2 KV heads, head_dim 8
    plan.check_model(_llama())
    plan.check_model(ModelShape(2, 4, 2, 8))
    cases = [
        (_llama(layers=3), r"plan\.model\.num_layers = 2 but the model has num_hidden_layers = 3", "num_heads"),
        (_llama(heads=8), r"plan\.model\.num_heads = 4 but the model has num_attention_heads = 8", "num_layers"),
        (_llama(kv_heads=4), r"plan\.model\.num_kv_heads = 2 but the model has num_key_value_heads = 4", "num_layers"),
        (_llama(kv_heads=1), r"num_kv_heads = 2 but the model has num_key_value_heads = 1", "num_heads ="),
    ]
    for config, pattern, absent in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            plan.check_model(config)
        assert absent not in str(info.value)  # only the offending field is named
    with pytest.raises(ValueError, match=r"num_layers = 2 .*; plan\.model\.num_kv_heads = 2"):
        plan.check_model(_llama(layers=5, kv_heads=1))


def test_uniform_from_transformers_config():
    plan = Plan.uniform(_llama(layers=3, heads=8, kv_heads=2, head_dim=16), alpha=0, beta=0.5)
    assert (plan.num_layers, plan.num_heads, plan.num_kv_heads, plan.model.head_dim) == (3, 8, 2, 16)
    assert plan.granularity == "kv_head" and plan.num_groups == 2
    mha = Plan.dense(_llama(heads=4, kv_heads=4))
    assert mha.granularity == "head" and mha.num_groups == 4


def test_length_and_index_validation():
    plan = Plan.from_dict(base_dict())
    for bad in (0, -3, True, 2.0, "8"):
        with pytest.raises(ValueError, match=r"N \(planned length in tokens\)"):
            plan.spans(bad)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\)"):
        plan.span(2, 0, 100)
    with pytest.raises(ValueError, match=r"group must be in \[0, 2\)"):
        plan.span(0, -1, 100)


# ---------------------------------------------------------------------------- 3. spans
@EXAMPLES
@given(data=plan_dicts(), N=lengths)
def test_spans_match_formula(data, N):
    plan = Plan.from_dict(data)
    spans = plan.spans(N)
    assert spans.dtype == torch.long and tuple(spans.shape) == (plan.num_layers, plan.num_groups)
    expected = ref_group_spans(data, N)
    assert spans.tolist() == expected
    layer, group = len(expected) - 1, len(expected[0]) - 1
    assert plan.span(layer, group, N) == expected[layer][group]


@EXAMPLES
@given(
    granularity=st.sampled_from([None, "kv_head", "head"]),
    kvh=st.integers(1, 3), ratio=st.integers(1, 3), layers=st.integers(1, 3),
    sink=st.integers(0, 80), extra=st.integers(1, 200), m=st.integers(1, 100), N=lengths,
    via_dense=st.booleans(),
)
def test_dense_plan_is_dense(granularity, kvh, ratio, layers, sink, extra, m, N, via_dense):
    shape = ModelShape(layers, kvh * ratio, kvh)
    kw = dict(granularity=granularity, sink=sink, span_multiple=m, min_span=sink + extra)
    plan = Plan.dense(shape, **kw) if via_dense else Plan.uniform(shape, alpha=0, beta=1, **kw)
    assert plan.spans(N).tolist() == [[N] * plan.num_groups] * layers
    assert plan.head_spans(N).tolist() == [[N] * (kvh * ratio)] * layers
    assert plan.cache_spans(N).tolist() == [[N] * kvh] * layers
    assert plan.kv_density(N) == 1.0
    assert plan.attention_density(N) == 1.0
    assert ref_kept(N, sink, N) == N * (N + 1) // 2  # the keep rule itself is dense at span N


@EXAMPLES
@given(data=plan_dicts(), n1=lengths, n2=lengths)
def test_spans_monotone_in_length(data, n1, n2):
    n1, n2 = min(n1, n2), max(n1, n2)
    plan = Plan.from_dict(data)
    assert bool((plan.spans(n1) <= plan.spans(n2)).all())
    assert bool((plan.head_spans(n1) <= plan.head_spans(n2)).all())
    assert bool((plan.cache_spans(n1) <= plan.cache_spans(n2)).all())


@EXAMPLES
@given(data=plan_dicts(), N=lengths)
def test_head_spans_map_heads_to_groups(data, N):
    plan = Plan.from_dict(data)
    H, KVH = data["model"]["num_heads"], data["model"]["num_kv_heads"]
    group = [h if data["granularity"] == "head" else h // (H // KVH) for h in range(H)]
    assert plan.group_of_head().tolist() == group
    spans = plan.spans(N).tolist()
    assert plan.head_spans(N).tolist() == [[row[group[h]] for h in range(H)] for row in spans]
    assert plan.head_spans(N).tolist() == ref_head_spans(data, N)


@EXAMPLES
@given(data=plan_dicts(), N=lengths)
def test_kv_density_brute_force(data, N):
    plan = Plan.from_dict(data)
    assert plan.cache_spans(N).tolist() == ref_cache_slots(data, N)
    assert plan.kv_density(N) == ref_kv_density(data, N)


@EXAMPLES
@given(data=plan_dicts(), N=lengths)
def test_attention_density_brute_force(data, N):
    plan = Plan.from_dict(data)
    assert plan.attention_density(N) == ref_attention_density(data, N)


@EXAMPLES
@given(sink=st.integers(0, 80), N=st.integers(1, 120), span=st.integers(0, 250))
def test_kept_pairs_brute_force(sink, N, span):
    """The closed form behind attention_density, for any span (also span < sink or > N)."""
    expected = ref_kept_loops(span, sink, N)
    assert expected == ref_kept(span, sink, N)
    got = kept_pairs(torch.tensor([[span, 0], [N, span]]), sink, N)
    assert got.tolist() == [[expected, ref_kept(0, sink, N)], [ref_kept(N, sink, N), expected]]


# ---------------------------------------------------------------------------- 4. shipped plans
def _upstream_files() -> dict[str, Path]:
    """Shipped plan name -> upstream file, by the naming of convert_upstream."""
    if not UPSTREAM_DIR.is_dir():
        pytest.skip(f"no upstream MoA plans at {UPSTREAM_DIR}")
    out = {}
    for f in sorted(UPSTREAM_DIR.glob("*_alpha_beta.json")):
        org_model, kind = f.name[: -len("_alpha_beta.json")].rsplit("__", 1)
        org, model = org_model.split("--", 1)
        out[f"{model}.{kind}"] = f
    return out


def test_shipped_names_all_load():
    names = shipped.names()
    assert len(names) == 12 and names == sorted(names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"moa", "streamingllm"}
    for name in names:
        plan = shipped.load(name)
        assert isinstance(plan, Plan)
        assert plan == Plan.load(SHIPPED_DIR / f"{name}.json")
    assert (SHIPPED_DIR / "LICENSE-MoA").is_file()
    assert "MIT" in (SHIPPED_DIR / "LICENSE-MoA").read_text(encoding="utf-8")


def test_shipped_plans_match_upstream():
    files = _upstream_files()
    assert sorted(files) == shipped.names()
    assert convert_upstream.UPSTREAM_MODELS == MODEL_SHAPES
    for name, src in files.items():
        up = json.loads(src.read_text(encoding="utf-8"))
        plan = shipped.load(name)
        model = plan.model.name
        L, H, KVH, D = MODEL_SHAPES[model]
        assert src.name.replace("--", "/", 1).startswith(model + "__")
        assert (plan.num_layers, plan.num_heads, plan.num_kv_heads, plan.model.head_dim) == (L, H, KVH, D)
        assert (len(up["alphas"]), len(up["alphas"][0]), len(up["betas"]), len(up["betas"][0])) == (L, H, L, H)
        assert plan.granularity == "head" and plan.num_groups == H
        assert (plan.sink, plan.span_multiple, plan.min_span) == (64, 64, 128)
        assert plan.meta["upstream_file"] == src.name
        assert src.name in plan.meta["source"] and "MoA upstream" in plan.meta["source"]
        assert "MHA" in plan.meta["upstream_granularity"]
        assert plan.meta["license"].startswith("MIT") and "LICENSE-MoA" in plan.meta["license"]
        assert plan.meta["upstream_kind"] == ("MoA plan" if name.endswith(".moa") else
                                              "uniform StreamingLLM-style baseline")
        for N in (4096, 16384):
            expected = [
                [min(N, max(128, math.ceil((a + b * N) / 64) * 64)) for a, b in zip(arow, brow)]
                for arow, brow in zip(up["alphas"], up["betas"])
            ]
            assert plan.head_spans(N).tolist() == expected, (name, N)
            per_kv = H // KVH
            slots = [[max(row[kv * per_kv:(kv + 1) * per_kv]) for kv in range(KVH)] for row in expected]
            assert plan.cache_spans(N).tolist() == slots, (name, N)
            assert plan.kv_density(N) == sum(map(sum, slots)) / (L * KVH) / N


def test_convert_upstream_reproduces_shipped_files(tmp_path, capsys):
    _upstream_files()  # skips without the upstream folder
    convert_upstream.main([str(UPSTREAM_DIR), "-o", str(tmp_path)])
    made = sorted(p.name for p in tmp_path.glob("*.json"))
    assert made == sorted(p.name for p in SHIPPED_DIR.glob("*.json"))
    assert len(made) == 12
    for fname in made:
        assert (tmp_path / fname).read_bytes() == (SHIPPED_DIR / fname).read_bytes(), fname
    assert len(capsys.readouterr().out.strip().splitlines()) == 12


def test_convert_upstream_rejects_unknown_names(tmp_path):
    bad = tmp_path / "acme--Foo-7B__moa_alpha_beta.json"
    bad.write_text(json.dumps({"alphas": [[0.0]], "betas": [[0.5]]}))
    with pytest.raises(ValueError, match=r"unknown model 'acme/Foo-7B'"):
        convert_upstream.convert(bad)
    with pytest.raises(ValueError, match=r"expected a name like"):
        convert_upstream.convert(tmp_path / "plan.json")


def test_load_unknown_shipped_name():
    with pytest.raises(ValueError, match=r"no shipped plan named 'nope'; known plans: ") as info:
        shipped.load("nope")
    for name in shipped.names():
        assert name in str(info.value)


# ---------------------------------------------------------------------------- 5. summary
def _summary_tables(text: str, num_layers: int):
    lines = text.splitlines()
    dash = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    layer_rows = []
    for line in lines[dash + 1:]:
        if not line.strip():
            break
        layer_rows.append(line)
    head = next(i for i, line in enumerate(lines) if line.split() == ["length", "kv_density", "attention_density"])
    density_rows = [line.split() for line in lines[head + 1:] if line.strip()]
    return layer_rows, density_rows


@pytest.mark.parametrize(
    "data",
    [
        {**base_dict("kv_head"), "model": {**base_dict()["model"], "name": "summary-model-kv"}},
        {**base_dict("head"), "model": {**base_dict()["model"], "name": "summary-model-head"},
         "alpha": [[0.0, 40.0, -30.0, 0.0], [100.0, 0.0, 0.0, 8.0]],
         "beta": [[0.5, 0.25, 1.0, 0.125], [0.0, 0.75, 0.5, 1.0]]},
    ],
    ids=["kv_head", "head"],
)
def test_summary(data):
    plan = Plan.from_dict(data)
    Ns = (100, 256, 1000)
    text = plan.summary(Ns)
    assert data["model"]["name"] in text.splitlines()[0]
    layer_rows, density_rows = _summary_tables(text, plan.num_layers)
    assert [int(r.split()[0]) for r in layer_rows] == list(range(plan.num_layers))
    for layer, row in enumerate(layer_rows):
        distinct = {(a, b) for a, b in zip(data["alpha"][layer], data["beta"][layer])}
        assert int(row.split()[1]) == len(distinct)
        for N in Ns:
            spans = ref_group_spans(data, N)[layer]
            want = f"{min(spans)}-{max(spans)}" if min(spans) != max(spans) else str(min(spans))
            assert f" {want} " in row, (row, want)
    assert [int(r[0]) for r in density_rows] == list(Ns)
    for (n, kv, att), N in zip(density_rows, Ns):
        assert kv == f"{plan.kv_density(N):.3f}" and att == f"{plan.attention_density(N):.3f}"
        assert abs(float(kv) - ref_kv_density(data, N)) <= 0.0005 + 1e-12
        assert abs(float(att) - ref_attention_density(data, N)) <= 0.0005 + 1e-12


def test_summary_of_shipped_plan():
    plan = shipped.load("Llama-3.2-1B-Instruct.moa")
    text = plan.summary()
    assert "meta-llama/Llama-3.2-1B-Instruct" in text.splitlines()[0]
    layer_rows, density_rows = _summary_tables(text, plan.num_layers)
    assert len(layer_rows) == 16
    data = plan.to_dict()
    for (n, kv, att), N in zip(density_rows, (4096, 16384, 65536)):
        assert int(n) == N
        assert kv == f"{ref_kv_density(data, N):.3f}"
        assert att == f"{plan.attention_density(N):.3f}"


def test_summary_unnamed_and_bad_length():
    plan = Plan.uniform(ModelShape(1, 2, 2), alpha=0, beta=0.5)
    assert "(unnamed)" in plan.summary((64,)).splitlines()[0]
    with pytest.raises(ValueError, match=r"N \(planned length"):
        plan.summary((0,))


def _layer_kv_column(row: str, num_lengths: int) -> list[str]:
    """The per-layer 'kv' values of a summary row (the last token of each (spans, kv) pair)."""
    return row.split()[-2 * num_lengths:][1::2]


def test_summary_layer_kv_column_kv_head():
    data = {**base_dict("kv_head"), "alpha": [[0.0, 40.0], [100.0, -64.0]], "beta": [[0.5, 0.25], [0.0, 1.0]]}
    plan = Plan.from_dict(data)
    Ns = (100, 256, 1000)
    layer_rows, _ = _summary_tables(plan.summary(Ns), plan.num_layers)
    for layer, row in enumerate(layer_rows):
        want = [f"{sum(ref_cache_slots(data, N)[layer]) / 2 / N:.2f}" for N in Ns]
        assert _layer_kv_column(row, len(Ns)) == want


def test_summary_layer_kv_column_head_granularity_gqa():
    plan = shipped.load("Llama-3-8B-Instruct-262k.moa")
    data = plan.to_dict()
    layer_rows, _ = _summary_tables(plan.summary((4096,)), plan.num_layers)
    for layer, row in enumerate(layer_rows):
        slots = ref_cache_slots(data, 4096)[layer]
        assert _layer_kv_column(row, 1) == [f"{sum(slots) / len(slots) / 4096:.2f}"], layer


def test_to_dict_does_not_alias_plan_state():
    """Neither to_dict() nor the caller's nested meta may alias the plan's state."""
    plan = Plan.from_dict(base_dict())
    d = plan.to_dict()
    d["meta"]["source"] = "edited"
    d["alpha"][0][0] = 123.0
    assert plan.meta == {"source": "test"}
    assert plan == Plan.from_dict(base_dict())


def test_nested_meta_is_copied_from_the_input():
    data = {**base_dict(), "meta": {"profile": {"lengths": [4096]}}}
    plan = Plan.from_dict(data)
    data["meta"]["profile"]["lengths"].append(1)
    assert plan.meta == {"profile": {"lengths": [4096]}}
