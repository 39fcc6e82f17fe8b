"""Compile moa-flex's Triton kernels for a Hopper GPU (sm_90) on a machine without one.

Triton's interpreter, which runs the kernels in the CPU suite, skips the compiler's own checks
(a kernel that ran there failed to compile on the H200: two return types in one function).
This script runs the host wrappers on small CPU tensors with the launches intercepted, and
compiles every launched (kernel, signature, constants) ahead of time to a cubin with Triton's
own compiler, specialized as Triton's JIT specializes a launch (alignment and divisibility by
16, integers equal to 1): without the marks the compiler emits other code, which for the FP8
chunk kernel needed 50176 bytes of shared memory where a GPU launch needs 131072. Run in a
process without TRITON_INTERPRET (tests/test_kernel_aot.py starts it); prints one line per
compiled kernel and exits non-zero on the first failure. Argument: the cases: ``fp8`` (an FP8
cache at head dim 128 with soft-cap, window and sinks, the default), ``bf16`` (a bf16 cache at
head dim 128 without them), ``latent`` (a latent cache's 576 / 512), ``keybias`` (keys 129 wide,
a per-key bias column beside head dim 128, fp32 and bf16), ``fp32`` (fp32 at head dim 128 with
every option: the chunk kernel's largest tiles) or ``bench`` (bench/decode_kernel.py's bf16 and
FP8 kernels); ``fp8``, ``latent`` and ``fp32`` compile the decode kernel without and with an
indexer's selection (DeepSeek Sparse Attention), ``latent`` the chunk kernel too. ``--sass`` also prints the decode
kernel's loop length in SASS instructions (how many a thread issues per tile: the FP8 kernel is
bound by them on an H200).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
    sys.exit("kernel_aot.py compiles kernels: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from moa_flex.kernels import append, chunk, decode  # noqa: E402
from moa_flex.kernels.quant import FP8, SCALE_DTYPE  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
SHARED_MAX = 232448  # bytes of shared memory one block may use on an H100 / H200 (227 KiB)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
           torch.int64: "i64", torch.int16: "i16", FP8: "fp8e4nv", torch.bool: "i1", torch.uint8: "u8"}
# (KV groups, key width, value width, cache dtype, soft-cap / window / sinks): Llama-like bf16
# plain, FP8 with every option, DeepSeek-V3's latent cache (one group, 512 + 64 and 512), a
# per-key bias as one more key column (Doge at head dim 128) in fp32 and bf16, and fp32 at head
# dim 128 with every option (the chunk kernel's largest tiles)
CASES = {"bf16": ((2, 128, 128, torch.bfloat16, False),), "fp8": ((2, 128, 128, FP8, True),),
         # DeepSeek-V3's latent at its 128 heads (16 a program), dots3's sliding layers' at 64
         "latent": ((1, 576, 512, torch.bfloat16, False, 128), (1, 1088, 1024, torch.bfloat16, False, 64)),
         "keybias": ((2, 129, 128, torch.float32, False), (2, 129, 128, torch.bfloat16, False)),
         "fp32": ((2, 128, 128, torch.float32, True),),
         # bench/decode_kernel.py's kernels: bf16 and FP8 caches at head dim 128, 4 heads a group
         "bench": ((2, 128, 128, torch.bfloat16, False), (2, 128, 128, FP8, False))}
LAUNCHES: list[tuple[JITFunction, dict[str, str], dict[str, Any], dict[tuple[int], list], dict[str, int], str]] = []
_DIVISIBLE = [["tt.divisibility", 16]]


def _record(fn: JITFunction, what: str) -> Any:
    """The launch's signature, constants and attributes as Triton's JIT would specialize them
    (a pointer 16-byte aligned or an integer divisible by 16 is marked so, an integer 1 becomes
    a constant, unless the kernel says ``do_not_specialize``): the marks change the compiled code
    (vector loads and asynchronous copies, hence shared memory) that a GPU launch runs."""
    def launch(*args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(fn.arg_names, args)) | kwargs
        signature, constants, attrs = {}, {}, {}
        for index, param in enumerate(fn.params):
            value = bound[param.name]
            if param.is_constexpr or value is None:
                signature[param.name], constants[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + _DTYPES[value.dtype]
                if value.data_ptr() % 16 == 0:
                    attrs[(index,)] = _DIVISIBLE
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                if value == 1 and not param.do_not_specialize:
                    signature[param.name], constants[param.name] = "constexpr", 1
                    continue
                signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0 and not param.do_not_specialize:
                    attrs[(index,)] = _DIVISIBLE
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                raise TypeError(f"{fn.fn.__name__}: no Triton type for argument {param.name}={value!r}")
        if "DOT_F32" in constants:  # the interpreter's accumulation; the GPU path runs tensor-core dots
            constants["DOT_F32"] = False
        LAUNCHES.append((fn, signature, constants, attrs, options, what))
    return launch


def _intercept(module: Any, names: tuple[str, ...], what: str) -> None:
    for name in names:
        fn = getattr(module, name)
        setattr(module, name, _Launcher(fn, what))


class _Launcher:
    """Stands in for ``kernel`` in ``kernel[grid](...)``: records the launch."""

    def __init__(self, fn: JITFunction, what: str) -> None:
        self.fn, self.what = fn, what

    def __getitem__(self, grid: Any) -> Any:
        return _record(self.fn, self.what)


def _cases(which: str) -> None:
    """Host wrappers on CPU tensors: a bf16 and an FP8 cache, without and with soft-cap, window
    and sinks (the constants that change the compiled code), and a latent cache's widths."""
    for mod in (append, chunk, decode):
        mod.interpreting = lambda: True  # let the wrappers accept CPU tensors; nothing runs
    _intercept(append, ("_append_kernel",), "append")
    _intercept(decode, ("_decode_partial_kernel", "_decode_combine_kernel"), "decode")
    _intercept(chunk, ("_chunk_kernel",), "chunk")
    B, S, C = 2, 64, 32
    length = torch.full((B,), 40, dtype=torch.long)
    for G, D, Dv, dtype, options, *heads in CASES[which]:
        H = heads[0] if heads else 8  # query heads
        spans = torch.full((B, H), 24, dtype=torch.int32)
        caps = torch.full((B, G), S // G, dtype=torch.int32)
        offsets = torch.arange(0, S + 1, S // G, dtype=torch.int32)
        quant = dtype == FP8
        keys, values = torch.zeros(B, S, D).to(dtype), torch.zeros(B, S, Dv).to(dtype)
        scales = ({"k_scale": torch.ones(B, S, dtype=SCALE_DTYPE), "v_scale": torch.ones(B, S, dtype=SCALE_DTYPE)}
                  if quant else {})
        act = torch.float32 if dtype == torch.float32 else torch.bfloat16  # the model's dtype: queries, new K/V
        k_new, v_new = torch.randn(B, G, 1, D, dtype=act), torch.randn(B, G, 1, Dv, dtype=act)
        append.cache_append_triton(keys, values, length, k_new, v_new, caps, offsets, 4, **scales)
        softcap, window, sinks = (30.0, 16, torch.zeros(H)) if options else (0.0, 0, None)
        q = torch.randn(B, H, D, dtype=act)
        # an indexer's selection (DeepSeek Sparse Attention): beside a latent cache, and with every option
        selects = (None, torch.ones(B, S, dtype=torch.bool)) if options or which == "latent" else (None,)
        for fp8_mode in decode.FP8_MODES if quant else (None,):
            for select in selects:
                decode.ragged_decode_triton(q, keys, values, offsets, caps, spans, length - 1, 4, window, 0.088,
                                            softcap, sinks=sinks, fp8_mode=fp8_mode, select=select, **scales)
        qc = torch.randn(B, H, C, D, dtype=act)
        kc, vc = torch.randn(B, G, C, D, dtype=act), torch.randn(B, G, C, Dv, dtype=act)
        # the chunk's selection, [B, C, S + C] (cache slots, then the chunk's keys): at a latent cache's widths,
        # DeepSeek Sparse Attention's (its compile takes 11 s to 100 s a case, kept to the one that serves)
        for select in selects if which == "latent" else (None,):
            chunk.chunk_attention_triton(qc, kc, vc, keys, values, offsets, caps, spans, length,
                                         torch.zeros(B, dtype=torch.long), 4, window, 0.088, softcap, sinks=sinks,
                                         select=None if select is None else torch.ones(B, C, S + C, dtype=torch.bool),
                                         **scales)


def dims(signature: dict[str, str], constants: dict[str, Any]) -> str:
    """The head widths a launch was compiled for (D, DV) and the decode kernel's heads a program
    (HB of HPG), for the report."""
    return " ".join(f"{k}={constants[k]}" for k in ("D", "DV", "HB", "HPG") if k in constants)


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*?);")


def loop_instructions(cubin: bytes) -> tuple[int, int]:
    """Instructions of a kernel's longest loop in its SASS (Triton's bundled ``cuobjdump``), and
    of the loop's path that takes its longest forward branch (a block the loop may skip)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(m[1], 16), m[2], m[3]) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    jumps = [(a, int(target[-1], 16)) for a, op, rest in ins
             if op == "BRA" and (target := re.findall(r"0x[0-9a-f]+", rest))]  # (branch, target) addresses
    lo, hi = max(((t, a) for a, t in jumps if t < a), key=lambda j: j[1] - j[0])  # the longest backward jump
    addresses = [a for a, _, _ in ins]
    body = sum(lo <= a <= hi for a in addresses)
    skip = max([sum(a < x < t for x in addresses) for a, t in jumps if lo <= a < t <= hi], default=0)
    return body, body - skip


def main() -> int:
    which = sys.argv[1] if len(sys.argv) > 1 else "fp8"
    sass = "--sass" in sys.argv[2:]
    if which not in CASES:
        sys.exit(f"usage: kernel_aot.py [{'|'.join(CASES)}] [--sass], got {which!r}")
    _cases(which)
    seen = set()
    for fn, signature, constants, attrs, options, what in LAUNCHES:
        key = (fn.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(map(str, constants.items()))),
               tuple(sorted(attrs)))
        if key in seen:
            continue
        seen.add(key)
        t0 = time.perf_counter()
        flags = {k: v for k, v in constants.items() if k.isupper() and isinstance(v, bool)}
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                                    target=TARGET, options=options)
        except Exception as e:  # noqa: BLE001 - the failure is the report
            print(f"FAILED {fn.fn.__name__} ({what}) {flags}: {type(e).__name__}: {e}", flush=True)
            return 1
        shared = int(kernel.metadata.shared)
        print(f"compiled {fn.fn.__name__} for sm_90 {flags} {dims(signature, constants)}: {shared} bytes of shared "
              f"memory, in {time.perf_counter() - t0:.1f} s", flush=True)
        if sass and fn.fn.__name__ == "_decode_partial_kernel":
            body, path = loop_instructions(kernel.asm["cubin"])
            print(f"  its loop: {body} SASS instructions a thread per {constants['BLOCK_N']}-slot tile, {path} on "
                  f"the path that skips its longest optional block", flush=True)
        if shared > SHARED_MAX:
            print(f"FAILED {fn.fn.__name__} ({what}) {flags}: needs {shared} bytes of shared memory, more than a "
                  f"Hopper SM's {SHARED_MAX}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
