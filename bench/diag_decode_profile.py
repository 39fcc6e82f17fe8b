"""Diagnostic: where a moa-flex decode step spends its time (torch.profiler, GPU).

    python bench/diag_decode_profile.py [--layers 8] [--batch 4] [--length 65536] [--density 0.5]

Llama-3-8B layer shapes (fewer layers to keep the compile short), random weights, bf16, a
MoaCache filled with random keys and values; decode steps through the compiled model
(mode reduce-overhead). Prints the step time, the GPU time per step from the profiler's
kernels, and the top kernels and CPU-side operators, to separate GPU work from host overhead.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import moa_flex
from decode import random_moa_cache
from decode_kernel import plan_at_kv_density
from prefill import llama3_8b_config
from moa_flex.plan import ModelShape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    from transformers import LlamaForCausalLM

    config = llama3_8b_config(args.layers, False)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    shape = ModelShape.from_config(config)
    plan = plan_at_kv_density(shape, args.length, args.density, seed=1, alpha_fraction=0.0)
    moa_flex.compile(model, plan, mode="reduce-overhead")
    B, N = args.batch, args.length
    start = N - 4 * args.steps
    cache = random_moa_cache(plan, B, N, start, torch.bfloat16, "cuda")
    tok = torch.ones(B, 1, dtype=torch.long, device="cuda")

    def step(t: int) -> None:
        pos = torch.full((B, 1), start + t, dtype=torch.long, device="cuda")
        model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        t0 = time.perf_counter()
        for t in range(args.steps):  # compile, warm up, record the CUDA graph
            step(t)
        torch.cuda.synchronize()
        print(f"first {args.steps} steps (compile, capture): {time.perf_counter() - t0:.1f} s")
        times = []
        for t in range(args.steps, 2 * args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(t)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"step times (ms): {[round(x, 2) for x in times]}")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for t in range(2 * args.steps, 3 * args.steps):
                step(t)
            torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / args.steps
    print(f"GPU kernel time per step: {gpu_us / 1e3:.2f} ms ({args.layers} layers)")
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
