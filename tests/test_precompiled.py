"""Precompiled graphs (moa_flex.runtime.precompiled): graphs written by one compile are read
back by the next, which then runs them without tracing, and computes what they computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moa_flex
from moa_flex.runtime.attention import MoaRuntime
from tiny_models import ids_of, sparse_plan, tiny_model

NEW = 5


def _generate(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _compiled(model: torch.nn.Module, folder: Path, monkeypatch: pytest.MonkeyPatch, **kw: object) -> torch.nn.Module:
    monkeypatch.setenv("MOA_FLEX_CACHE_DIR", str(folder))
    return moa_flex.compile(model, sparse_plan(model.config, "kv_head"), max_length=96, compile_cache=True,
                            progress=False, **kw)


def _traced(model: torch.nn.Module) -> list[str]:
    return [line for line in model.moa_flex.log.lines if "traced" in line]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One cold compile that writes its prefill and decode graphs; its tokens and logits."""
    folder = tmp_path_factory.mktemp("moa")
    with pytest.MonkeyPatch.context() as mp:
        model = _compiled(tiny_model("llama", layers=2), folder, mp)
        ids = ids_of(40, batch=2)
        tokens = _generate(model, ids)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        lines = list(model.moa_flex.log.lines)
        moa_flex.uncompile(model)
    return {"folder": folder, "ids": ids, "tokens": tokens, "logits": logits, "lines": lines}


def test_a_second_compile_reads_the_graphs_and_traces_nothing(written: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = list(written["folder"].glob("*/graphs/*.graph"))
    # generate's prefill onto the cache, its decode step, and the plain forward without a cache
    assert sorted(p.name.split("-")[0] for p in graphs) == ["decode", "prefill", "prefill"]
    assert any("traced" in line for line in written["lines"])
    model = _compiled(tiny_model("llama", layers=2), written["folder"], monkeypatch)
    assert any("precompile: read 3 compiled graphs" in line for line in model.moa_flex.log.lines)
    assert len(model.moa_flex.reports) == 2 and len(model.moa_flex.decode_reports) == 1  # what the passes did
    assert all(len(r.rewritten) == 2 for r in model.moa_flex.reports + model.moa_flex.decode_reports)
    assert torch.equal(_generate(model, written["ids"]), written["tokens"])
    with torch.no_grad():
        logits = model(input_ids=written["ids"], use_cache=False).logits
    torch.testing.assert_close(logits, written["logits"], rtol=0, atol=1e-6)
    assert _traced(model) == [], "a graph read back is not traced again"
    assert any("verify: 2 layers" in line for line in model.moa_flex.log.lines), "its first call is checked here too"
    # another plan of the same layout: same graphs, other spans
    model.moa_flex.set_plan(sparse_plan(model.config, "kv_head", seed=3))
    _generate(model, written["ids"])
    assert _traced(model) == []


def test_a_call_no_graph_accepts_is_compiled_and_written(written: dict, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(written["folder"], folder)
    model = _compiled(tiny_model("llama", layers=2), folder, monkeypatch)
    assert model.moa_flex.compiled_forward.loaded == 2
    with torch.no_grad():
        out = model(input_ids=written["ids"], use_cache=False, logits_to_keep=1)  # an argument the graphs were not traced with
    torch.testing.assert_close(out.logits, written["logits"][:, -1:], rtol=0, atol=1e-6)
    assert len(_traced(model)) == 1
    assert len(list(folder.glob("*/graphs/prefill-*.graph"))) == 3


def test_changes_the_key_does_not_cover_are_refused_or_traced(written: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _compiled(tiny_model("llama", layers=2), written["folder"], monkeypatch)
    ids = written["ids"]
    calls = []
    handle = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, written["logits"], rtol=0, atol=1e-6)
    assert calls, "a hook added after compile runs (the graph is traced with it)"
    assert any("forward hooks changed" in line for line in model.moa_flex.log.lines)
    handle.remove()
    model = _compiled(moa_flex.uncompile(model), written["folder"], monkeypatch)
    with torch.no_grad():
        model.lm_head.weight.data = model.lm_head.weight.data.t().contiguous().t()  # same values, other strides
        logits = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, written["logits"], rtol=0, atol=1e-5)
    assert any("weights changed dtype, device or layout" in line for line in model.moa_flex.log.lines)
    model = _compiled(moa_flex.uncompile(model), written["folder"], monkeypatch)
    model.config.output_hidden_states = True
    with pytest.raises(ValueError, match="config changed after moa_flex.compile"), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.config.output_hidden_states = False
    model.train()
    with pytest.raises(ValueError, match="inference only"):
        model(input_ids=ids, use_cache=False)


def test_a_broken_file_is_skipped_and_dropped(written: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(written["folder"], folder)
    prefill = sorted(folder.glob("*/graphs/prefill-*.graph"))
    for path in prefill:
        path.write_bytes(b"not a graph")
    model = _compiled(tiny_model("llama", layers=2), folder, monkeypatch)
    assert not any(path.exists() for path in prefill)
    assert any("precompile: skipped" in line for line in model.moa_flex.log.lines)
    assert torch.equal(_generate(model, written["ids"]), written["tokens"])
    assert len(_traced(model)) == 1, model.moa_flex.log.lines  # the prefill graph, traced and written again


def test_graphs_run_this_models_plan_while_another_runtime_holds_their_ids(
        written: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The written graphs name their runtimes by the ids they had when compiled. While other
    live runtimes hold those ids (here with a dense plan), a model that reads the graphs still
    runs its own plan: each call renames the ids to its runtimes."""
    import pickle

    path = next(written["folder"].glob("*/graphs/prefill-*.graph"))
    saved = pickle.loads(path.read_bytes())["runtimes"]
    holders = []
    for rid in saved:
        holder = MoaRuntime(moa_flex.Plan.dense(tiny_model("llama", layers=2).config))
        moa_flex.runtime.ops.RUNTIMES.pop(holder.id)
        holder.id, previous = rid, moa_flex.runtime.ops.RUNTIMES.get(rid)
        moa_flex.runtime.ops.RUNTIMES[rid] = holder
        holders.append((holder, previous))
    try:
        model = _compiled(tiny_model("llama", layers=2), written["folder"], monkeypatch)
        assert model.moa_flex.compiled_forward.loaded == 2 and model.moa_flex.runtime.id not in saved
        assert torch.equal(_generate(model, written["ids"]), written["tokens"])
        with torch.no_grad():
            logits = model(input_ids=written["ids"], use_cache=False).logits
        torch.testing.assert_close(logits, written["logits"], rtol=0, atol=1e-6)
        assert _traced(model) == []
    finally:
        for holder, previous in holders:
            moa_flex.runtime.ops.RUNTIMES.pop(holder.id)
            if previous is not None:
                moa_flex.runtime.ops.RUNTIMES[holder.id] = previous


def test_a_model_aot_precompile_cannot_capture_runs_through_torch_compile(
        written: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch._dynamo.aot_compile as aot

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot capture")

    monkeypatch.setattr(aot, "aot_compile_fullgraph", refuse)
    model = _compiled(tiny_model("llama", layers=2), tmp_path / "empty", monkeypatch)
    assert torch.equal(_generate(model, written["ids"]), written["tokens"])
    assert any("AOT precompile cannot capture this model (RuntimeError: cannot capture)" in line
               for line in model.moa_flex.log.lines)
    assert not list((tmp_path / "empty").glob("*/graphs/*.graph"))


def test_precompile_can_be_turned_off(written: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOA_FLEX_PRECOMPILE", "0")
    model = _compiled(tiny_model("llama", layers=2), written["folder"], monkeypatch)
    assert not any("precompile" in line for line in model.moa_flex.log.lines)
    with torch.no_grad():
        model(input_ids=written["ids"], use_cache=False)
    assert _traced(model)


def test_guards_kept_are_those_on_the_call_arguments() -> None:
    """Both forms transformers' forwards come in: a ``(*args, **kwargs)`` decorator (the model is
    ``args[0]``) and a plain ``forward(self, input_ids, ...)``: guards on the call's arguments
    are kept, those reaching the model, a closure or a global are dropped."""
    from types import SimpleNamespace

    from moa_flex.runtime.precompiled import Arguments

    def entry(name: str, kind: str = "TENSOR_MATCH", is_global: bool = False, derived: tuple = ()) -> SimpleNamespace:
        return SimpleNamespace(name=name, guard_type=kind, is_global=is_global, derived_guard_types=derived)

    def wrapped(*args: object, **kwargs: object) -> None: ...

    def forward(self: object, input_ids: object = None, past_key_values: object = None) -> None: ...

    star, plain = Arguments.of(wrapped), Arguments.of(forward)
    assert (star.model, plain.model) == ("args[0]", "self")
    for args, call in ((star, "kwargs['input_ids']"), (plain, "input_ids")):
        assert args.keep(entry(call))
        assert args.keep(entry(call, "CONSTANT_MATCH"))
        assert args.keep(entry("", "SHAPE_ENV")) and args.keep(entry("", "GRAD_MODE"))
        assert not args.keep(entry(call, "ID_MATCH"))
        assert not args.keep(entry(call, "TYPE_MATCH", derived=("ID_MATCH",)))
        assert not args.keep(entry("G['torch'].float32", "CONSTANT_MATCH", is_global=True))
        assert not args.keep(entry("func.__name__", "CONSTANT_MATCH"))  # a wrapper's closure
    assert star.keep(entry("type(kwargs['past_key_values'])", "TYPE_MATCH"))
    assert not star.keep(entry("args[0]._modules['model'].weight"))
    assert not star.keep(entry("dict(type(args[0].config).__mro__[1].__dict__)['x']", "CONSTANT_MATCH"))
    assert plain.keep(entry("past_key_values.layers[0].keys"))
    assert not plain.keep(entry("self._modules['lm_head']._parameters['weight']"))
    assert not plain.keep(entry("type(self.config)", "TYPE_MATCH"))
    assert plain.names_model("L['self']._modules") and star.names_model("L['args'][0]._modules")
    assert not plain.names_model("L['input_ids']") and not star.names_model("L['kwargs']['input_ids']")
