"""The benchmark scripts' own CPU checks (``--smoke``): each runs end to end on a tiny model or
tiny shapes and prints its table. The benchmarks themselves need the GPU, which is lent only
at times; these runs catch a script broken by a change to the library between GPU sessions.
Slow (about 4.5 min together on our CPU): ``make test-slow``."""

from __future__ import annotations

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


@pytest.mark.slow
@pytest.mark.parametrize("argv", SMOKES, ids=[_name(a) for a in SMOKES])
def test_bench_script_smoke_run(argv: list[str]) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the Triton kernels run in the interpreter on the CPU
    env.pop("MOA_FLEX_CACHE_DIR", None)
    done = subprocess.run([sys.executable, *argv], cwd=BENCH, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}"
    assert any(line.startswith("|---") for line in done.stdout.splitlines()), f"no table printed:\n{done.stdout[-2000:]}"
