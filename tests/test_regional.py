"""Regional compilation (moa_flex.passes.regional): one compile per distinct decoder layer.

Units: the cut into regions, the canonical key that decides which parts share code (equal
graphs up to input order and size-symbol names; attention's layer index free), and the guard
transfer that keeps a shared compile's assumptions true for every layer that runs it. End to
end: a model compiled by region equals the reference, and compiled whole (slow) the eager backend.
"""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import moa_flex
from moa_flex.passes.regional import FROM_RUNTIME, POST, PRE, _guards_hold, canonical_key, regions
from moa_flex.plan import Plan
from conversation import reference_greedy
from reference import reference_logits
from tiny_models import tiny_model


def _env() -> tuple[ShapeEnv, FakeTensorMode]:
    env = ShapeEnv()
    return env, FakeTensorMode(shape_env=env)


def _sym(env: ShapeEnv, value: int, name: str) -> torch.SymInt:
    src = ConstantSource(name)
    return env.create_symintnode(env.create_symbol(value, src), hint=value, source=src)


def _traced(fn) -> torch.fx.GraphModule:  # noqa: ANN001
    return torch.fx.symbolic_trace(fn)


def _mlp(x, w, b):  # noqa: ANN001, ANN202
    return torch.relu(x @ w + b) * 2.0


def _mlp_reordered(w, b, x):  # noqa: ANN001, ANN202
    return torch.relu(x @ w + b) * 2.0


def _mlp_other_constant(x, w, b):  # noqa: ANN001, ANN202
    return torch.relu(x @ w + b) * 3.0


def _fakes(env: ShapeEnv, mode: FakeTensorMode, rows: int, name: str) -> list:
    n = _sym(env, rows, name)
    with mode:
        return [torch.empty(n, 8), torch.empty(8, 4), torch.empty(4)]


def test_equal_graphs_over_renamed_symbols_share_a_key() -> None:
    env, mode = _env()
    a, b = _fakes(env, mode, 5, "a"), _fakes(env, mode, 7, "b")
    ka, sa, oa = canonical_key(_traced(_mlp), a)
    kb, sb, ob = canonical_key(_traced(_mlp), b)
    assert ka == kb and oa == ob == [0, 1, 2]
    assert sa["c0"] != sb["c0"] and {str(sa["c0"]), str(sb["c0"])} == {str(a[0].shape[0]), str(b[0].shape[0])}


def test_input_order_is_canonical() -> None:
    env, mode = _env()
    x, w, b = _fakes(env, mode, 5, "a")
    k1, _, o1 = canonical_key(_traced(_mlp), [x, w, b])
    k2, _, o2 = canonical_key(_traced(_mlp_reordered), [w, b, x])
    assert k1 == k2
    assert [[x, w, b][j] for j in o1] == [[w, b, x][j] for j in o2]  # the same inputs in canonical order


@pytest.mark.parametrize("change", ["constant", "static size", "dtype", "shared symbol"])
def test_different_parts_get_different_keys(change: str) -> None:
    env, mode = _env()
    x, w, b = _fakes(env, mode, 5, "a")
    fn, args = _mlp, [x, w, b]
    if change == "constant":
        fn = _mlp_other_constant
    elif change == "static size":
        with mode:
            args = [torch.empty(5, 8), w, b]
    elif change == "dtype":
        with mode:
            args = [x, w, torch.empty(4, dtype=torch.float64)]
    else:  # two inputs of one symbol versus two symbols
        n = x.shape[0]

        def fn(x, y):  # noqa: ANN001, ANN202
            return x + y

        with mode:
            one = [torch.empty(n, 8), torch.empty(n, 8)]
            args = [torch.empty(n, 8), torch.empty(_sym(env, 6, "z"), 8)]
        assert canonical_key(_traced(fn), one)[0] != canonical_key(_traced(fn), args)[0]
        return
    assert canonical_key(_traced(_mlp), [x, w, b])[0] != canonical_key(_traced(fn), args)[0]


def _attention_part(layer: int) -> torch.fx.GraphModule:
    def part(q, k, v):  # noqa: ANN001, ANN202
        return torch.ops.moa_flex.attention.default(q, k, v, None, -1.0, layer, 0, 0.0) * 2

    return _traced(part)


def test_the_attention_layer_index_is_free_other_constants_are_not() -> None:
    env, mode = _env()
    with mode:
        qkv = [torch.empty(1, 2, 4, 8) for _ in range(3)]
    assert canonical_key(_attention_part(3), qkv)[0] == canonical_key(_attention_part(7), qkv)[0]
    assert FROM_RUNTIME < 0


def _index_keep_part(layer: int) -> torch.fx.GraphModule:
    def part(scores, info):  # noqa: ANN001, ANN202
        return scores.masked_fill(~torch.ops.moa_flex.index_keep.default(scores, info, layer, 0), float("-inf"))

    return _traced(part)


def test_an_indexers_layer_index_is_free_too() -> None:
    """DeepSeek Sparse Attention's layers carry their layer in ``index_keep`` as well (passes/indexed.py)."""
    env, mode = _env()
    with mode:
        args = [torch.empty(2, 4, 4), torch.empty(3, dtype=torch.long)]
    assert canonical_key(_index_keep_part(3), args)[0] == canonical_key(_index_keep_part(7), args)[0]


def test_guards_move_only_where_they_hold() -> None:
    env, _ = _env()
    s0, s1, s2 = (_sym(env, v, n).node.expr for v, n in ((16, "s0"), (16, "s1"), (8, "s2")))
    guards = [sympy.Eq(s0, 16)]
    before = len(env.guards)
    assert _guards_hold(guards, {"c0": s0}, {"c0": s1}, env)
    assert any(s1 in g.expr.free_symbols for g in env.guards[before:])  # recorded for the member
    recorded = len(env.guards)
    assert not _guards_hold(guards, {"c0": s0}, {"c0": s2}, env)
    assert len(env.guards) == recorded  # a failed member records nothing
    assert _guards_hold([], {}, {}, None)


def _node(graph: torch.fx.Graph, name: str, path: str | None) -> torch.fx.Node:
    n = graph.call_function(torch.relu, ())
    n.name = name
    if path is not None:
        n.meta["nn_module_stack"] = {"m": (path, torch.nn.Module), "f": ("G['apply_rotary_pos_emb']", object)}
    return n


def test_regions_follow_layers_and_keep_glue_with_the_layer_before() -> None:
    g = torch.fx.Graph()
    g.placeholder("x")
    nodes = {name: _node(g, name, path) for name, path in [
        ("embed", "L['self'].model.embed_tokens"), ("rotary", None), ("q0", "L['self'].model.layers.0.self_attn"),
        ("glue", "L['self'].model"), ("q1", "L['self'].model.layers['1'].mlp"), ("norm", "L['self'].model.norm"),
        ("head", None)]}
    g.output(nodes["head"])
    r = regions(g)
    assert [r[nodes[k]] for k in ("embed", "rotary", "q0", "glue", "q1", "norm", "head")] == \
        [PRE, PRE, 0, 0, 1, POST, POST]


@pytest.fixture(scope="module")
def four_layers() -> tuple:
    model = tiny_model("llama", layers=4, seed=3)
    plan = Plan.uniform(model.config, alpha=32, beta=0.4)
    ids = torch.randint(1, 100, (2, 300), generator=torch.Generator().manual_seed(0))
    return model, plan, ids


@pytest.fixture(scope="module")
def eager_run(four_layers: tuple) -> tuple:
    """The eager backend's logits and tokens on four_layers, the whole-graph fallback's reference."""
    return _run(*four_layers, backend="eager")


def _run(model, plan, ids, dense_too: bool = False, **kw) -> tuple:  # noqa: ANN001, ANN003
    """Logits and greedy tokens of ``plan``, the region reports, and with ``dense_too`` the
    logits after ``set_plan(Plan.dense)`` on the same compiled graphs."""
    moa_flex.compile(model, plan, compile_cache=False, **kw)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        reports = list(model.moa_flex.region_reports)
        dense = None
        if dense_too:
            model.moa_flex.set_plan(Plan.dense(model.config))
            with torch.no_grad():
                dense = model(input_ids=ids).logits
            assert len(model.moa_flex.region_reports) == len(reports), "a new plan must not recompile"
        return logits, tokens, reports, dense
    finally:
        moa_flex.uncompile(model)


@pytest.mark.slow  # 25 s (make test-slow); by default test_generate.py and test_compile.py check regional compilation
def test_regional_equals_the_reference(four_layers: tuple) -> None:  # on two layers (reference, stock, the reports)
    """Regional compilation through inductor gives the reference's logits and greedy tokens,
    and after set_plan(Plan.dense) on the same graphs the stock model's logits. (A whole graph's
    inductor compile, what regional=False runs, is the fallback a slow test takes.)"""
    model, plan, ids = four_layers
    mask = torch.ones_like(ids)
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        want_logits = reference_logits(model, plan, input_ids=ids)
    assert (want_logits - stock).abs().max() > 1e-3, "the plan really cuts"
    want_tokens, _ = reference_greedy(model, plan, ids.shape[1] + 5, ids, mask, 5)
    logits, tokens, reports, dense = _run(model, plan, ids, dense_too=True)
    torch.testing.assert_close(dense, stock, rtol=0, atol=1e-5)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=2e-5)
    # the plain forward and the prefill over the cache: one layer compiled, three reusing it; on the
    # CPU decode steps (not captured in CUDA graphs) compile whole
    assert len(reports) == 2
    for r in reports:
        assert r.layers == [0, 1, 2, 3] and r.compiles == 1 and r.shared == {1: 0, 2: 0, 3: 0}


def test_regional_must_be_a_bool(four_layers: tuple) -> None:
    model, plan, _ = four_layers
    with pytest.raises(ValueError, match="regional"):
        moa_flex.compile(model, plan, regional="yes")
    assert getattr(model, "moa_flex", None) is None


@pytest.mark.slow
def test_hybrid_layers_share_by_kind() -> None:
    """Qwen3-Next: linear-attention layers 0 and 2, attention layers 1 and 3 (plan layers 0 and
    1): attention layer 3 runs layer 1's code as its own plan layer (1), and the result equals
    the eager backend. (The first linear-attention layer's graph differs from the second's,
    which then gets its own compile.)"""
    model = tiny_model("qwen3_next", layers=4, seed=2)
    plan = Plan.uniform(model.config, alpha=32, beta=0.3)
    ids = torch.randint(1, 100, (1, 300), generator=torch.Generator().manual_seed(1))
    logits, tokens, reports, _ = _run(model, plan, ids)
    eager_logits, eager_tokens, *_ = _run(model, plan, ids, backend="eager")
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=5e-5)
    for r in reports:
        assert r.layers == [0, 1, 2, 3] and r.compiles <= 3 and r.shared.get(3) == 1


@pytest.mark.slow  # the fallback compiles four layers whole through inductor: 19-24 s (make test-slow)
def test_a_graph_that_cannot_be_cut_compiles_whole(four_layers: tuple, eager_run: tuple,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """If the cut itself fails, the graph compiles whole (what regional=False runs), the
    report says why and a start-up line says it; the result is unchanged."""
    import moa_flex.passes.regional as regional

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("no cut today")

    model, plan, ids = four_layers
    monkeypatch.setattr(regional, "split_module", refuse)
    moa_flex.compile(model, plan, compile_cache=False)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        reports, lines = list(model.moa_flex.region_reports), list(model.moa_flex.log.lines)
    finally:
        moa_flex.uncompile(model)
    assert len(reports) == 1 and "no cut today" in reports[0].whole and reports[0].compiles == 0
    assert any("compiles whole" in line and "no cut today" in line for line in lines)
    torch.testing.assert_close(logits, eager_run[0], rtol=0, atol=2e-5)


def test_what_the_shape_env_knows_of_a_symbol_is_in_the_key() -> None:
    """A compile may rely on a symbol's known range without adding a guard: parts whose
    symbols have different ranges must not share code."""
    env, mode = _env()
    a, b = _fakes(env, mode, 5, "a"), _fakes(env, mode, 7, "b")
    assert canonical_key(_traced(_mlp), a, env)[0] == canonical_key(_traced(_mlp), b, env)[0]
    env.constrain_symbol_range(b[0].shape[0].node.expr, compiler_min=2, compiler_max=64)
    assert canonical_key(_traced(_mlp), a, env)[0] != canonical_key(_traced(_mlp), b, env)[0]
    assert canonical_key(_traced(_mlp), a)[0] == canonical_key(_traced(_mlp), b)[0]  # without the env: graph only
