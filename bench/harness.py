"""What the benchmarks in bench/ share: recording a section in RESULTS.md, the Llama-3 shapes,
the GPU timer and the copy bandwidth.

* :func:`record` appends a section to bench/RESULTS.md: a heading, then one line with the
  date (UTC), the hardware (GPU name, or CPU model and cores), the torch / triton /
  transformers versions and the exact command line, then the script's own text (its table).
* :data:`LLAMA3_8B`, :data:`LLAMA3_70B` (attention shapes) and :func:`llama3_8b_config` (the
  transformers config of a Llama-3-8B-shaped model, random weights, any number of layers).
* :class:`Timer`: median time of a callable, CUDA-graph replay with L2 flushed before each
  run, CUDA events around it (wall time on the CPU).
* :func:`copy_bandwidth`: read + write of a large ``copy_``, timed by :class:`Timer`; the
  "floor" and "% copy" columns of the scripts divide by it.

The scripts import it as ``from harness import ...``: ``python bench/x.py`` (from the repo
root) and ``python x.py`` (from bench/) both put this folder first on ``sys.path``.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moa_flex.plan import ModelShape

if TYPE_CHECKING:
    from transformers import LlamaConfig

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")
ROOT = RESULTS.parent.parent
COPY_GIB = 4.0  # copy_bandwidth's buffer: read + write of 4 GiB, ~2 ms on an H200
ENV_IN_COMMAND = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")  # environment that changes what a run does

LLAMA3_8B = ModelShape(32, 32, 8, 128, "Llama-3-8B")  # layers, query heads, KV heads, head dim
LLAMA3_70B = ModelShape(80, 64, 8, 128, "Llama-3-70B")


# ---------------------------------------------------------------------------------- recording
def hardware(device: str | torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def versions() -> str:
    """'torch X, triton Y, transformers Z' (not installed: 'none')."""
    out = [f"torch {torch.__version__}"]
    for name in ("triton", "transformers"):
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} none")
    return ", ".join(out)


def command() -> str:
    """The command line of this run: the environment that changes the run, ``python`` and
    sys.argv; then the folder it ran from, when not the repo root."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENV_IN_COMMAND if k in os.environ]
    text = "`" + " ".join([*env, "python", shlex.join(sys.argv)]) + "`"
    cwd = Path.cwd().resolve()
    if cwd != ROOT:
        where = cwd.relative_to(ROOT).as_posix() + "/" if cwd.is_relative_to(ROOT) else str(cwd)
        text += f" (from `{where}`)"
    return text


def record(heading: str, text: str, *, device: str | torch.device, details: str = "") -> Path:
    """Append a section to bench/RESULTS.md and return its path::

        ## <heading>

        <date> UTC, <hardware>, torch ..., triton ..., transformers .... Command: `<command>` (from `<dir>`). <details>

        <text>

    ``details``: what the reader needs besides the table (settings, how times are taken);
    ``text``: the table and the notes under it, as printed.
    """
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    line = f"{stamp}, {hardware(device)}, {versions()}. Command: {command()}."
    if details:
        line += " " + details.strip()
    tail = RESULTS.read_bytes()[-2:] if RESULTS.exists() else b"\n\n"
    gap = "" if tail == b"\n\n" else "\n" if tail.endswith(b"\n") else "\n\n"
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(f"{gap}## {heading}\n\n{line}\n\n{text.strip(chr(10))}\n")
    print(f"appended to {RESULTS}")
    return RESULTS


# ---------------------------------------------------------------------------------- models
def llama3_8b_config(layers: int = LLAMA3_8B.num_layers, smoke: bool = False) -> LlamaConfig:
    """transformers LlamaConfig of Llama-3-8B's shape with `layers` decoder layers (32 query /
    8 KV heads of 128, hidden 4096, MLP 14336, vocabulary 128256, RoPE theta 500000, its BOS
    and EOS ids); ``smoke``: a tiny one of the same form for CPU checks of the scripts."""
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                           intermediate_size=128, vocab_size=256, max_position_embeddings=1 << 20)
    s = LLAMA3_8B
    return LlamaConfig(
        num_hidden_layers=layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        hidden_size=s.num_heads * s.head_dim, intermediate_size=14336, vocab_size=128256,
        max_position_embeddings=1 << 20, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
    )


# ---------------------------------------------------------------------------------- timing
class Timer:
    """Median GPU time (ms) of a callable, L2 flushed before each run; CPU: wall time."""

    def __init__(self, device: str, repeats: int) -> None:
        self.device, self.repeats = device, repeats
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device == "cuda" else None

    def __call__(self, fn: Callable[[], object], graph: bool = True) -> tuple[float, str]:
        """(median ms, mode): mode 'graph' (CUDA-graph replay), 'eager' or 'cpu'."""
        if self.device != "cuda":
            fn()
            times = []
            for _ in range(self.repeats):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times), "cpu"
        for _ in range(3):
            fn()  # compile, autotune, warm up
        torch.cuda.synchronize()
        run, mode = fn, "eager"
        if graph:
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                run, mode = g.replay, "graph"
            except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
                print(f"  note: CUDA-graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing eagerly")
                torch.cuda.synchronize()
        for _ in range(3):
            run()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), mode


def copy_bandwidth(device: str, gib: float = COPY_GIB, repeats: int = 50) -> float:
    """Measured copy bandwidth (bytes/s): read + write of a `gib` GiB tensor, each copy timed
    alone by :class:`Timer` (eager, L2 flushed before it, CUDA events; median of `repeats`)."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _ = Timer(device, repeats)(functools.partial(dst.copy_, src), graph=False)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()  # give the buffers back: later free-memory estimates see them
    return 2 * n / (ms * 1e-3)
