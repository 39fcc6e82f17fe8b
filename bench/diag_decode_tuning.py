"""Diagnostic: sweep the ragged decode kernel's tiling on one layout, and FlexAttention dense
decode with and without an explicit BlockMask (which baseline is fair).

    python bench/diag_decode_tuning.py [--batch 8] [--length 65536] [--densities 0.25 0.5]

Prints, per density, time and bandwidth on the kept K/V bytes for every (block_n, num_warps,
num_stages, chunk) tried, best first, then the FlexAttention variants. Needs a GPU.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing

from decode_kernel import plan_at_kv_density, ragged_inputs
from moa_flex.plan import ModelShape
from moa_flex.kernels import decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5])
    args = ap.parse_args()
    B, N, H, KVH, D, dt = args.batch, args.length, 32, 8, 128, torch.bfloat16
    x = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=50, return_mode="median")
    copy_bw = 2 * x.numel() * 2 / (copy_ms * 1e-3)
    del x, y
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    shape = ModelShape(1, H, KVH, D)
    for density in args.densities:
        plan = plan_at_kv_density(shape, N, density, seed=B * 7 + N % 1000)
        inputs = ragged_inputs(plan, B, N, D, dt, "cuda")
        slots = int(inputs[3][-1])
        nbytes = B * slots * D * 2 * 2
        out = torch.empty(B, H, D, device="cuda", dtype=dt)
        offs = decode.host_offsets(inputs[3], inputs[1].shape[1])
        results = []
        for block_n, warps, stages, mult in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (0.5, 1, 2)):
            chunk = max(block_n, int(decode.auto_chunk(B, offs, torch.device("cuda"), block_n) * mult))
            try:
                fn = lambda: decode.ragged_decode_triton(  # noqa: E731
                    *inputs, plan.sink, 0, D**-0.5, 0.0, out=out, chunk=chunk, block_n=block_n,
                    num_warps=warps, num_stages=stages)
                ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory)
                print(f"  block_n={block_n} warps={warps} stages={stages} chunk={chunk}: {type(e).__name__}")
                continue
            results.append((ms, block_n, warps, stages, chunk))
        results.sort()
        print(f"\nB={B} N={N} density {density}: {nbytes / 1e9:.3f} GB kept K/V")
        print("| time (ms) | TB/s | % copy | block_n | warps | stages | chunk |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for ms, block_n, warps, stages, chunk in results[:12]:
            bw = nbytes / (ms * 1e-3)
            print(f"| {ms:.4f} | {bw / 1e12:.2f} | {100 * bw / copy_bw:.0f} | {block_n} | {warps} | {stages} | {chunk} |")
        default = triton.testing.do_bench(
            lambda: decode.ragged_decode_triton(*inputs, plan.sink, 0, D**-0.5, 0.0, out=out),
            warmup=10, rep=60, return_mode="median")
        print(f"default config: {default:.4f} ms ({nbytes / (default * 1e-3) / copy_bw * 100:.0f}% copy)")
        del inputs, out

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=dt)
    k = torch.randn(B, KVH, N, D, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    nbytes = 2 * k.numel() * 2
    full = create_block_mask(lambda b, h, qi, kv: kv >= 0, None, None, 1, N, device="cuda")
    cases = {
        "flex, no block_mask": lambda: flex(q, k, v, enable_gqa=True),
        "flex, full BlockMask(Q_LEN=1)": lambda: flex(q, k, v, block_mask=full, enable_gqa=True),
        "sdpa default": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    print(f"\ndense decode B={B} N={N}: {nbytes / 1e9:.3f} GB K/V")
    for name, fn in cases.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
        print(f"  {name}: {ms:.4f} ms, {nbytes / (ms * 1e-3) / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
