"""The benchmark scripts' own CPU checks (``--smoke``): each runs end to end on a tiny model or
tiny shapes and prints its table. The benchmarks themselves need the GPU, which is lent only
at times; these runs catch a script broken by a change to the library between GPU sessions.
Slow (7 min 30 s together on our CPU in session 33, the sweep test included): ``make test-slow``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"

SMOKES = [  # script and its arguments; --record is never passed (RESULTS.md stays as it is)
    ["decode_kernel.py", "--smoke", "--kv-dtypes", "bf16", "fp8"],
    ["chunk_kernel.py", "--smoke"],
    ["linear_kernel.py", "--smoke"],
    ["decode.py", "--smoke", "--kv-dtypes", "bf16", "fp8", "--max-batch", "1", "--no-hf", "--densities", "0.25"],
    ["longctx.py", "--smoke", "--plans", "d0.25", "--filled", "1", "--longest", "d0.25", "--kv-dtypes", "bf16", "fp8"],
    ["startup.py", "--smoke"],
    ["prefill.py", "--smoke"],
    ["profiler.py", "--smoke"],
    ["multigpu.py", "--placement", "layers", "--smoke"],  # accelerate's hooks on one device
    ["-m", "torch.distributed.run", "--nproc_per_node", "2", "multigpu.py", "--placement", "tp", "--smoke"],  # gloo
]


def _name(argv: list[str]) -> str:
    script = next(a for a in argv if a.endswith(".py"))
    return f"{script}[{argv[argv.index('--placement') + 1]}]" if "--placement" in argv else script


def _smoke(argv: list[str]) -> subprocess.CompletedProcess:
    """One bench script run from bench/, its Triton kernels in the interpreter; asserts it exits 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the Triton kernels run in the interpreter on the CPU
    env.pop("MOA_FLEX_CACHE_DIR", None)
    done = subprocess.run([sys.executable, *argv], cwd=BENCH, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.parametrize("argv", SMOKES, ids=[_name(a) for a in SMOKES])
def test_bench_script_smoke_run(argv: list[str]) -> None:
    done = _smoke(argv)
    assert any(line.startswith("|---") for line in done.stdout.splitlines()), f"no table printed:\n{done.stdout[-2000:]}"


def test_decode_kernel_sweeps_the_grid_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--sweep-grid`` is the grid the sweep times (it was once overwritten by the default before
    it was read, so every recorded sweep ran the default grid whatever the command said)."""
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its harness as a sibling module
    spec = importlib.util.spec_from_file_location("bench_decode_kernel", BENCH / "decode_kernel.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.sweep_grid(True, "64,128/4/2,3/auto,0.5", smoke=False) == ((64, 128), (4,), (2, 3), (None, 0.5))
    assert script.sweep_grid(True, None, smoke=False) == script.SWEEP_GRID
    assert script.sweep_grid(False, None, smoke=False) is None
    with pytest.raises(SystemExit, match="pass --sweep too"):
        script.sweep_grid(False, "64/4/2/auto", smoke=False)
    with pytest.raises(SystemExit, match="BLOCK_NS/WARPS/STAGES/CHUNKS"):
        script.sweep_grid(True, "64/4/2", smoke=False)


@pytest.mark.slow
def test_decode_kernel_smoke_sweep_times_only_the_given_grid() -> None:
    """End to end: the sweep table's rows besides each layout's default are the grid's tiles."""
    done = _smoke(["decode_kernel.py", "--smoke", "--kv-dtypes", "bf16", "--sweep", "--sweep-grid", "16/4/2/auto"])
    table = done.stdout.split("Tile sweep")[1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    rows = [dict(zip(cells[0], r)) for r in cells[1:]]
    swept = [r for r in rows if r["config"] != "default"]
    assert len(swept) == 4, table  # 2 batches x 2 densities, one configuration each
    assert {(r["block_n"], r["warps"], r["stages"], r["chunk (slots)"].split()[0]) for r in swept} == {("16", "4", "2", "auto")}
