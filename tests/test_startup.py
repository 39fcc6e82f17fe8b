"""Start-up: phase lines, warmup(), the persistent compile cache, and no wasted re-tracing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import moa_flex
from moa_flex.runtime.compile_cache import (CompileCache, _flagged_isas, _isa_probe_file, artifact_key, cache_enabled,
                                            settle_isa_probe)
from moa_flex.runtime.startup_log import StartupLog
from tiny_models import ids_of, prompt_ids, run_generate, sparse_plan, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _generate(model: torch.nn.Module, ids: torch.Tensor, new: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)


def test_phase_lines_on_stderr_and_silenced(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each graph is traced once (no restarted analysis) and said on stderr with its seconds;
    progress=False and MOA_FLEX_QUIET=1 keep stderr silent but the lines are still kept."""
    # test_generate.py's inductor request (layout, prompt and chunk): its graphs, from inductor's cache when that ran first
    model = tiny_model("llama", layers=2)
    moa_flex.compile(model, sparse_plan(model.config, "kv_head"), prefill_chunk=128)
    before = counters["aot_autograd"]["autograd_cache_bypass"]
    run_generate(model, prompt_ids())
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("moa-flex: ")]
    assert said == model.moa_flex.log.lines
    traced = [line for line in said if "traced" in line]
    assert [line.split(":")[1].strip() for line in traced] == ["prefill graph (2 layers)", "decode-step graph (2 layers)"]
    assert all(any(line.startswith(f"moa-flex: {what}: compiled (inductor) in ") for line in said)
               for what in ("prefill graph (2 layers)", "decode-step graph (2 layers)"))
    # the passes' new nodes carry example values: AOTAutograd's cache takes both graphs
    assert counters["aot_autograd"]["autograd_cache_bypass"] == before

    quiet = tiny_model("llama", layers=2, seed=1)
    moa_flex.compile(quiet, sparse_plan(quiet.config, "kv_head"), max_length=96, progress=False, backend="eager")
    _generate(quiet, ids_of(40, batch=1))
    assert "moa-flex: " not in capsys.readouterr().err
    assert any("traced" in line for line in quiet.moa_flex.log.lines)

    # MOA_FLEX_QUIET=1 silences the same log (compile builds it with progress=True)
    monkeypatch.setenv("MOA_FLEX_QUIET", "1")
    log = StartupLog(True)
    with log.phase("a phase"):
        log.say("a line")
    assert not log.enabled and "moa-flex: " not in capsys.readouterr().err and len(log.lines) == 2


def test_warmup_compiles_ahead_and_the_request_reuses_it() -> None:
    """After warmup(B, max_length) a request of that layout compiles and allocates nothing,
    and its tokens equal those of a model that was not warmed up."""
    plan = sparse_plan(tiny_model("llama", layers=2).config, "head")
    ids = ids_of(50, batch=2)
    cold = moa_flex.compile(tiny_model("llama", layers=2), plan, max_length=96)
    want = _generate(cold, ids)
    model = moa_flex.compile(tiny_model("llama", layers=2), plan, max_length=96)
    seconds = model.moa_flex.warmup(2)
    assert seconds > 0 and model.moa_flex.cache is not None and model.moa_flex.cache.batch_size == 2
    cache, compiles = model.moa_flex.cache, model.moa_flex.log.compiles
    frames = counters["stats"]["unique_graphs"]
    got = _generate(model, ids)
    assert torch.equal(got, want)
    assert model.moa_flex.cache is cache and model.moa_flex.log.compiles == compiles
    assert counters["stats"]["unique_graphs"] == frames


def test_warmup_refuses_bad_arguments() -> None:
    model = moa_flex.compile(tiny_model("llama", layers=2), sparse_plan(tiny_model("llama", layers=2).config, "head"),
                             max_length=96, backend="eager")
    with pytest.raises(ValueError, match="batch_size"):
        model.moa_flex.warmup(0)
    with pytest.raises(ValueError, match="differs from compile's max_length=96"):
        model.moa_flex.warmup(1, max_length=128)
    short = moa_flex.compile(tiny_model("llama", layers=2), sparse_plan(tiny_model("llama", layers=2).config, "head"),
                             max_length=4, backend="eager")
    with pytest.raises(ValueError, match="no room for a warm-up request"):
        short.moa_flex.warmup(1)


def test_artifact_key_covers_layout_not_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_model("llama", layers=2).config
    plan = sparse_plan(config, "kv_head")
    key = artifact_key(config, plan, torch.float32, torch.device("cpu"), {"mode": None})
    assert key == artifact_key(config, sparse_plan(config, "kv_head", seed=5), torch.float32, torch.device("cpu"),
                               {"mode": None})  # other spans, same compiled code
    assert key != artifact_key(config, sparse_plan(config, "head"), torch.float32, torch.device("cpu"), {"mode": None})
    assert key != artifact_key(config, plan, torch.bfloat16, torch.device("cpu"), {"mode": None})
    assert key != artifact_key(config, plan, torch.float32, torch.device("cpu"), {"mode": "max-autotune"})
    assert key != artifact_key(tiny_model("llama", layers=3).config, moa_flex.Plan.dense(tiny_model("llama", layers=3).config),
                               torch.float32, torch.device("cpu"), {"mode": None})
    monkeypatch.setenv("MOA_FLEX_COMPILE_CACHE", "0")
    assert not cache_enabled(None) and cache_enabled(True)
    monkeypatch.setenv("MOA_FLEX_COMPILE_CACHE", "1")
    assert cache_enabled(None) and not cache_enabled(False)
    with pytest.raises(ValueError, match="compile_cache"):
        cache_enabled("yes")  # type: ignore[arg-type]


def test_a_broken_cache_file_is_dropped(tmp_path: Path) -> None:
    cache = CompileCache("k", folder=tmp_path)
    cache.folder.mkdir(parents=True)
    (cache.folder / "junk.bin").write_bytes(b"not a cache")
    assert not cache.load() and not (cache.folder / "junk.bin").exists()


@pytest.mark.skipif(_isa_probe_file(Path("/")) is None, reason="inductor's vector-ISA probe runs on x86 CPUs")
def test_the_cpu_isa_probe_is_settled_once_per_machine(tmp_path: Path) -> None:
    """The first process probes and writes what it found, a later one reads it; both set
    inductor's ``cpp.vec_isa_ok`` when every flagged ISA was usable (one configuration, so one
    set of cache keys); a record that disagrees with the flags, or a user's own setting, does not.
    The setting is changed inside inductor's own ``config.patch``, which restores it: pytest's
    monkeypatch restores a config entry by deleting it, which hides it from every later reader
    (inductor's own compiles in the same process included)."""
    from torch._inductor import config, cpu_vec_isa

    with config.patch({"cpp.vec_isa_ok": None}):
        probed = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
        all_usable = probed == _flagged_isas()
        assert settle_isa_probe(tmp_path) is False  # no record: probed (this process's cached probe)
        (path,) = tmp_path.glob("cpu-isa-*.json")
        assert json.loads(path.read_text()) == {"usable": probed}
        assert config.cpp.vec_isa_ok is (True if all_usable else None)
        config.cpp.vec_isa_ok = None
        assert settle_isa_probe(tmp_path) is True  # read back
        assert config.cpp.vec_isa_ok is (True if all_usable else None)
        config.cpp.vec_isa_ok = None
        path.write_text(json.dumps({"usable": probed[1:]}))  # the probe refused an ISA the flags name
        assert settle_isa_probe(tmp_path) is True and config.cpp.vec_isa_ok is None
        config.cpp.vec_isa_ok = False  # the user's own setting stays
        assert settle_isa_probe(tmp_path) is False and config.cpp.vec_isa_ok is False
    assert not config._config["cpp.vec_isa_ok"].hide


CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from torch._dynamo.utils import counters
    import moa_flex
    from tiny_models import tiny_model, ids_of
    model = tiny_model("llama", layers=1)
    moa_flex.compile(model, moa_flex.Plan.dense(model.config), compile_cache=True, progress=False, verify=False)
    with torch.no_grad():
        model(input_ids=ids_of(40, batch=1), use_cache=False)
    model.moa_flex.save_compiled()
    print(json.dumps({{"hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"],
                      "lines": model.moa_flex.log.lines}}))
""")


@pytest.mark.slow  # two fresh processes, each compiling with cold caches (~50 s): make test-slow
def test_a_second_process_starts_from_the_compile_cache(tmp_path: Path) -> None:
    """Two fresh processes, each with an empty inductor cache of its own: the first compiles
    and saves into moa-flex's folder, the second loads it and compiles nothing (it reads the
    precompiled graph: no trace either)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests")))
    runs = []
    for i in range(2):
        env = {**os.environ, "MOA_FLEX_CACHE_DIR": str(tmp_path / "moa"), "MOA_FLEX_COMPILE_CACHE": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}"), "TRITON_CACHE_DIR": str(tmp_path / f"triton{i}")}
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["misses"] > 0 and any("compile cache: saved" in line for line in first["lines"])
    assert list((tmp_path / "moa").glob("*/*.bin"))
    assert second["misses"] == 0
    assert any("compile cache: loaded" in line for line in second["lines"])
    # the model's graph was read back whole (precompile): not traced; inductor's cache served FlexAttention's kernel
    assert any("precompile: read 1 compiled graphs" in line for line in second["lines"])
    assert not any("traced" in line for line in second["lines"]) and second["hits"] <= first["misses"]
