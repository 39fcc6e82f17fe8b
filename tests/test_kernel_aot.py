"""Every Triton kernel compiles for a Hopper GPU and fits its shared memory, checked without one.

The CPU suite runs the kernels in Triton's interpreter, which skips the compiler's checks: the
FP8 append kernel ran there and failed to compile on the H200 (two return types in one
function). tests/kernel_aot.py compiles each kernel the host wrappers launch (bf16 and FP8
caches, soft-cap / window / sinks on and off, a latent cache's 576 / 512 widths) to an sm_90
cubin with Triton's own compiler, in a process without the interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("kernel_aot.py")


def _compiled(which: str, *flags: str) -> list[str]:
    """The script's lines for the compiled kernels of ``which`` cases (and the lines under them);
    fails with its report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, silenced
    run = subprocess.run([sys.executable, str(SCRIPT), which, *flags], capture_output=True, text=True, env=env,
                         timeout=900, cwd=SCRIPT.parent.parent)
    report = run.stdout + run.stderr[-3000:]
    assert run.returncode == 0, report
    compiled = [line for line in run.stdout.splitlines() if line.startswith(("compiled ", "  "))]
    names = {line.split()[1] for line in compiled if line.startswith("compiled ")}
    assert names == {"_append_kernel", "_decode_partial_kernel", "_decode_combine_kernel", "_chunk_kernel"}, report
    return compiled


def test_kernels_compile_for_sm90_within_shared_memory() -> None:
    """An FP8 cache at head dim 128 with soft-cap, window and sinks: every option's code, and the
    chunk kernel's largest tiles at this width (scales beside the values)."""
    compiled = _compiled("fp8", "--sass")
    # append, decode (both modes, without and with an indexer's selection) and chunk
    assert sum("QUANT': True" in line for line in compiled) == 6
    loops = [line for line in compiled if line.startswith("  its loop: ")]  # one per decode kernel
    counts = [tuple(map(int, re.findall(r"(\d+) (?:SASS|on the path)", line))) for line in loops]
    assert len(counts) == 4 and all(0 < path <= body for body, path in counts), loops
    assert sum("V_PAIRS': True" in line for line in compiled) == 2
    assert sum("HAS_SELECT': True" in line for line in compiled) == 2
    assert sum("HAS_SOFTCAP': True" in line for line in compiled) == 5  # decode (four) and chunk


@pytest.mark.slow  # 11 s: kept out of the default run, which compiles the same kernels with every option on
def test_kernels_compile_for_sm90_with_a_bf16_cache() -> None:
    """A bf16 cache at head dim 128 without soft-cap, window or sinks."""
    compiled = _compiled("bf16")
    assert sum("QUANT': False" in line for line in compiled) == 3  # append, decode and chunk


@pytest.mark.slow  # the chunk kernel at 1024- and 2048-wide tiles takes 10 s to 19 s to compile, four times
def test_kernels_compile_at_latent_widths() -> None:
    """Latent caches: DeepSeek-V3's (keys 576 wide, values 512) at its 128 query heads, 16 a
    decode program, and dots3's sliding layers' (1088, 1024) at 64: the kernels' tiles fit; the
    decode and chunk kernels with and without an indexer's selection (DeepSeek-V3.2)."""
    compiled = _compiled("latent")
    assert sum("D=576" in line for line in compiled) == 5 and sum("D=1088" in line for line in compiled) == 5
    decode = [line for line in compiled if line.startswith("compiled _decode_partial_kernel")]
    assert len(decode) == 4 and all("HB=16 HPG=" in line for line in decode), decode  # 128 and 64 heads, 16 a program


@pytest.mark.slow  # 30 s (make test-slow)
def test_kernels_compile_with_a_key_bias_column() -> None:
    """Keys 129 wide (Doge's bias column beside head dim 128), fp32 and bf16: the chunk kernel's
    fp32 tiles at 256 lanes needed 246272 bytes of shared memory before they counted bytes, not
    lanes (an H100 refused them at launch), and fit now."""
    assert sum("D=129" in line for line in _compiled("keybias")) == 6  # append, decode and chunk; two dtypes


@pytest.mark.slow  # make test-slow
def test_kernels_compile_in_float32_at_head_dim_128() -> None:
    """fp32 at head dim 128 with soft-cap, window and sinks: the chunk kernel's largest tiles
    (229888 bytes of shared memory, 1% under Hopper's 232448)."""
    assert sum("D=128" in line for line in _compiled("fp32")) == 4  # append, chunk, decode without and with a selection
