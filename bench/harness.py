"""What the benchmarks in bench/ share: recording a section in RESULTS.md, the Llama-3 shapes,
the GPU timer and the copy bandwidth.

* :func:`record` appends a section to bench/RESULTS.md: a heading, then one line with the
  date (UTC), the hardware (GPU name, or CPU model and cores), the torch / triton /
  transformers versions and the exact command line, then the script's own text (its table).
* :data:`LLAMA3_8B`, :data:`LLAMA3_70B` (attention shapes) and :func:`llama3_8b_config` (the
  transformers config of a Llama-3-8B-shaped model, random weights, any number of layers).
* :class:`Timer`: median time of a callable, CUDA-graph replay with L2 flushed before each
  run (by reading a 256 MiB buffer: clean lines), CUDA events around it (wall time on the CPU).
* :func:`copy_bandwidth`: read + write of a large ``copy_``, timed by :class:`Timer`; the
  "floor" and "% copy" columns of the scripts divide by it.
* The KV cache's storage dtype (``--kv-dtypes``): :data:`KV_CHOICES`, :func:`kv_storage`,
  :func:`kv_suffix` (how rows are named), :func:`cache_bytes` (a MoaCache's bytes before it
  exists: what the largest-batch and longest-context searches size by), :func:`quantize_fp8_slabs`
  and :func:`fill_random` (random K/V in a cache, FP8 through the quantizer, in slabs so that
  the temporaries stay small beside a cache that fills the GPU), :func:`set_kv_dtype`.

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

from moa_flex.kernels.quant import FP8, bytes_per_vector, quantize_fp8
from moa_flex.plan import ModelShape, Plan

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from moa_flex import MoaCache

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")
ROOT = RESULTS.parent.parent
COPY_GIB = 4.0  # copy_bandwidth's buffer: read + write of 4 GiB, ~2 ms on an H200
ENV_IN_COMMAND = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")  # environment that changes what a run does

# --kv-dtypes: "bf16" is the model's own dtype (bf16 on the GPU; float32 in the CPU smoke runs,
# whose tiny models run in float32), "fp8" the FP8 cache (moa_flex/kernels/quant.py)
KV_CHOICES = ("bf16", "fp8")
SLAB_VECTORS = 1 << 17  # head vectors per slab of the FP8 helpers: 64 MiB of float32 temporaries at D=128

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
L2_FLUSHES = ("read", "write")  # how Timer empties L2 before each timed run


class Timer:
    """Median GPU time (ms) of a callable, L2 flushed before each run; CPU: wall time.

    ``flush`` (:data:`L2_FLUSHES`): ``read`` (the default) reads a 256 MiB buffer, so L2 then
    holds clean lines that the timed call's reads simply replace; ``write`` zeroes it (the only
    flush before 2026-12-06), which leaves up to L2's size of dirty lines whose write-back the
    timed call pays: 8-11 us added to every kernel on an H100 (bench/RESULTS.md, "L2 flush by
    reading"), a tenth of a 0.1 ms decode kernel."""

    def __init__(self, device: str, repeats: int, flush: str = "read") -> None:
        if flush not in L2_FLUSHES:
            raise ValueError(f"flush must be one of {L2_FLUSHES}, got {flush!r}")
        self.device, self.repeats, self.flush_mode = device, repeats, flush
        self.flush = torch.zeros(256 * 2**20, dtype=torch.int8, device=device) if device == "cuda" else None

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
            self.flush.sum() if self.flush_mode == "read" else self.flush.zero_()
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


# ---------------------------------------------------------------------------------- KV storage dtype
def kv_storage(name: str) -> torch.dtype | None:
    """moa_flex's ``kv_dtype`` for a ``--kv-dtypes`` name: None (the model's dtype) for "bf16",
    FP8 for "fp8"."""
    if name not in KV_CHOICES:
        raise ValueError(f"kv dtype must be one of {KV_CHOICES}, got {name!r}")
    return FP8 if name == "fp8" else None


def kv_suffix(name: str) -> str:
    """What a row's method name gets for its cache dtype: nothing for the model's own (so the
    bf16 rows keep the names of earlier runs), " fp8" for FP8."""
    return "" if kv_storage(name) is None else f" {name}"


def cache_bytes(plan: Plan, N: int, batch: int, storage: torch.dtype, head_dim: int) -> int:
    """Bytes of the K and V storage of a MoaCache of ``batch`` unpadded rows planned for N tokens,
    stored in ``storage`` (an FP8 cache's scales included), as ``MoaCache.memory_bytes`` will
    count it: every planned layer's slots (``plan.cache_spans(N)``), K and V."""
    return 2 * batch * int(plan.cache_spans(N).sum()) * bytes_per_vector(storage, head_dim)


def quantize_fp8_slabs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8(x)`` (x [..., D] -> fp8 [..., D], float32 scales [...]) a slab of vectors
    at a time: the quantizer's float32 temporaries are 2-3x the size of its input, which
    would not fit beside a large cache."""
    x8 = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    src, dst, sc = x.reshape(-1, x.shape[-1]), x8.view(-1, x.shape[-1]), scale.view(-1)
    for a in range(0, src.shape[0], SLAB_VECTORS):
        dst[a:a + SLAB_VECTORS], sc[a:a + SLAB_VECTORS] = quantize_fp8(src[a:a + SLAB_VECTORS])
    return x8, scale


def _fill_random_(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> None:
    """Standard-normal vectors into one storage tensor [B, S, D]; FP8 (``scale`` [B, S]): drawn in
    ``dtype`` and stored as the cache's writes store them (quantize_fp8), slab by slab."""
    if scale is None:
        values.normal_()
        return
    flat, sc = values.view(-1, values.shape[-1]), scale.view(-1)
    for a in range(0, flat.shape[0], SLAB_VECTORS):
        n = min(SLAB_VECTORS, flat.shape[0] - a)
        flat[a:a + n], sc[a:a + n] = quantize_fp8(torch.randn(n, flat.shape[1], dtype=dtype, device=values.device))


def fill_random(cache: MoaCache, filled: int) -> MoaCache:
    """Make ``cache`` hold ``filled`` tokens of random K/V in every row (no prefill): standard
    normal keys and values in the cache's storage dtype (an FP8 cache: quantized with their
    scales). Returns the cache."""
    for layer in cache.moa_layers:
        _fill_random_(layer.keys, layer.k_scale, cache.dtype)
        _fill_random_(layer.values, layer.v_scale, cache.dtype)
        layer.length.fill_(filled)
    cache.mark_filled(filled)
    return cache


def set_kv_dtype(model: torch.nn.Module, name: str) -> None:
    """The cache dtype of a model compiled by moa_flex (``--kv-dtypes`` name) for its next
    generate() calls, without recompiling: generate() builds its cache in
    ``model.moa_flex.kv_dtype`` (as ``moa_flex.compile(kv_dtype=...)`` set it), and torch.compile
    traces the graphs again for the new storage dtype on its own (its guards see the cache's
    tensors), as it does for a new batch size."""
    state = model.moa_flex
    storage = kv_storage(name)
    if storage != state.kv_dtype:
        state.release_cache()  # the old cache's memory back before the next request allocates
        state.kv_dtype = storage


def storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a cache of ``--kv-dtypes`` name ``name`` stores its K/V in, for a model in
    ``model_dtype``."""
    return kv_storage(name) or model_dtype
