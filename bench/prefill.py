"""Prefill with MoA plans against dense FlexAttention and SDPA flash, attention alone and whole model.

    python bench/prefill.py [--lengths 8192 32768 65536] [--densities 0.25 0.5] [--layers 32] [--record]
    python bench/prefill.py --smoke        # tiny shapes on the CPU: checks the script runs

Llama-3-8B shapes (32 query / 8 KV heads, head dim 128, bf16, random weights). Plans have
heterogeneous spans per KV group (kv_head granularity), scaled to the target attention density
(kept causal pairs / all causal pairs) at each length. Times are medians (CUDA events through
triton.testing.do_bench for attention; synchronized wall time per forward for the model);
memory is the CUDA allocator's peak above the resident tensors. Attention alone:
SDPA flash causal, SDPA with its default backend (cuDNN on an H200), FlexAttention causal (the same analytic BlockMask code, dense plan) and
moa-flex; the moa-flex output is checked against SDPA with the explicit reference mask at
the smallest length. Whole model: HF sdpa (eager, is_causal flash) against moa_flex.compile with
a dense plan and the sparse plans (one compiled graph, plans switched with set_plan); the
rewritten graph is checked to build no dense [B, 1, Q, K] mask.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

import moa_flex
from harness import llama3_8b_config, record
from moa_flex.masks import BLOCK_MASK_CACHE, block_mask, reference_mask
from moa_flex.plan import ModelShape, Plan


def plan_at_density(shape: ModelShape, N: int, density: float, seed: int = 0) -> Plan:
    """kv_head plan with heterogeneous spans whose attention density at N is close to `density`."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(shape.num_layers, shape.num_kv_heads, generator=gen) * 0.95 + 0.05

    def build(c: float) -> Plan:
        beta = (raw * c).clamp(max=1.0).tolist()
        alpha = [[0.0] * shape.num_kv_heads for _ in range(shape.num_layers)]
        return Plan(shape, alpha, beta, granularity="kv_head", meta={"source": f"bench density {density} at {N}"})

    lo, hi = 0.0, 20.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if build(mid).attention_density(N) < density else (lo, mid)
    return build(hi)


def peak_extra(fn) -> int:  # noqa: ANN001
    """CUDA allocator peak (bytes) above what was allocated before `fn` ran."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_ms(fn, device: str, repeats: int) -> float:  # noqa: ANN001
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_attention(args: argparse.Namespace, shape: ModelShape, rows: list, checks: list) -> None:
    dev, dtype = args.device, args.dtype
    H, KVH, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    flex = torch.compile(flex_attention, dynamic=False)
    for N in args.lengths:
        torch.manual_seed(N)
        q = torch.randn(1, H, N, D, device=dev, dtype=dtype)
        k = torch.randn(1, KVH, N, D, device=dev, dtype=dtype)
        v = torch.randn(1, KVH, N, D, device=dev, dtype=dtype)
        one_layer = ModelShape(1, H, KVH, D)

        # q, k, v bound as defaults: the loop deletes them before the next length
        def sdpa(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
            backends = [SDPBackend.FLASH_ATTENTION] if dev == "cuda" else [SDPBackend.MATH]
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def sdpa_default(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
            # SDPA's own backend choice (cuDNN on an H200): what HF eager gets
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        cases = [("sdpa flash causal", None, sdpa)] + ([("sdpa default (cudnn)", None, sdpa_default)] if dev == "cuda" else [])
        plans = [("flex causal", Plan.dense(one_layer))] + [
            (f"moa-flex d={d}", plan_at_density(one_layer, N, d, seed=1)) for d in args.densities
        ]
        for name, plan in plans:
            BLOCK_MASK_CACHE.clear()
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            bm = block_mask(plan, 0, N, device=dev)
            if dev == "cuda":
                torch.cuda.synchronize()
            build_ms = (time.perf_counter() - t) * 1e3
            cases.append((name, (plan, bm, build_ms), lambda bm=bm, q=q, k=k, v=v: flex(q, k, v, block_mask=bm, enable_gqa=True)))
        base = None
        for name, extra, fn in cases:
            fn()  # compile / warm up
            ms = time_ms(fn, dev, args.repeats)
            mem = peak_extra(fn) if dev == "cuda" else 0
            base = ms if name == "flex causal" else base
            plan, bm, build_ms = extra if extra else (None, None, None)
            rows.append({
                "part": "attention", "N": N, "method": name, "ms": ms, "peak_MiB": mem / 2**20,
                "attn_density": plan.attention_density(N) if plan else 1.0,
                "block_density": (1 - bm.sparsity() / 100) if bm is not None else 1.0,
                "mask_build_ms": build_ms,
            })
        for r in rows:
            if r["part"] == "attention" and r["N"] == N:
                r["vs_flex_causal"] = r["ms"] / base
        if N == min(args.lengths):  # correctness: moa-flex against SDPA with the reference mask
            name, (plan, bm, _), fn = cases[-1]
            ref_mask = reference_mask(plan, 0, N).to(dev)
            k_rep, v_rep = (t.repeat_interleave(H // KVH, 1) for t in (k, v))
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                ref = F.scaled_dot_product_attention(q.float(), k_rep.float(), v_rep.float(), attn_mask=ref_mask)
            err = float((fn().float() - ref).norm() / ref.norm())
            checks.append(f"{name} at N={N}: relative error vs SDPA with reference mask {err:.2e}")
            del ref_mask, ref, k_rep, v_rep
        del q, k, v


def bench_model(args: argparse.Namespace, rows: list, checks: list) -> None:
    from transformers import LlamaForCausalLM

    dev, dtype = args.device, args.dtype
    config = llama3_8b_config(args.layers, args.smoke)
    config._attn_implementation = "sdpa"
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    shape = ModelShape.from_config(config)

    def forward_ms(ids: torch.Tensor) -> tuple[float, int]:
        def run() -> None:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        run()
        times = []
        for _ in range(args.repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            run()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), (peak_extra(run) if dev == "cuda" else 0)

    inputs = {N: torch.randint(0, config.vocab_size, (1, N), device=dev) for N in args.lengths}
    for N, ids in inputs.items():
        ms, mem = forward_ms(ids)
        rows.append({"part": "model", "N": N, "method": "HF sdpa (eager)", "ms": ms, "peak_MiB": mem / 2**20, "attn_density": 1.0})
    moa_flex.compile(model, Plan.dense(config))
    for N, ids in inputs.items():
        plans = [("moa-flex dense plan", Plan.dense(config))] + [
            (f"moa-flex d={d}", plan_at_density(shape, N, d, seed=2)) for d in args.densities
        ]
        for name, plan in plans:
            model.moa_flex.set_plan(plan)
            BLOCK_MASK_CACHE.clear()
            ms, mem = forward_ms(ids)
            rows.append({"part": "model", "N": N, "method": name, "ms": ms, "peak_MiB": mem / 2**20,
                         "attn_density": plan.attention_density(N)})
    gm = model.moa_flex.reports[-1].graph_module
    dense = [n.name for n in gm.graph.nodes
             if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 4 and n.meta["val"].dtype == torch.bool]
    checks.append(f"whole model: graphs compiled {len(model.moa_flex.reports)}; dense 4-D bool mask nodes in the rewritten graph: {len(dense)}")
    for N in args.lengths:
        hf = next(r["ms"] for r in rows if r["part"] == "model" and r["N"] == N and r["method"].startswith("HF"))
        for r in rows:
            if r["part"] == "model" and r["N"] == N:
                r["vs_hf"] = r["ms"] / hf


def table(rows: list) -> str:
    lines = [
        "| part | N | method | attn density | block density | time (ms) | x ref | peak extra (MiB) | mask build (ms) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.get("vs_flex_causal", r.get("vs_hf"))
        lines.append(
            f"| {r['part']} | {r['N']} | {r['method']} | {r['attn_density']:.3f} | "
            f"{r.get('block_density', float('nan')):.3f} | {r['ms']:.2f} | {ratio:.3f} | {r['peak_MiB']:.0f} | "
            + (f"{r['mask_build_ms']:.1f}" if r.get("mask_build_ms") is not None else "") + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per model case")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.dtype, args.lengths, args.layers = "cpu", torch.float32, [384, 512], 2
        shape = ModelShape(1, 4, 2, 16)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/prefill.py needs a GPU (or --smoke)")
        args.device, args.dtype = "cuda", torch.bfloat16
        shape = ModelShape(1, 32, 8, 128)
    rows: list = []
    checks: list = []
    bench_attention(args, shape, rows, checks)
    print(table(rows), flush=True)
    if not args.skip_model:
        bench_model(args, rows, checks)
    out = table(rows)
    print(out)
    for c in checks:
        print("check:", c)
    bars = []
    for r in rows:
        if r["part"] == "attention" and r["N"] == 32768 and r["method"] == "moa-flex d=0.5":
            bars.append(f"bar: attention at density 0.5, 32K: {r['vs_flex_causal']:.3f}x dense FlexAttention (<= 0.65)")
    for b in bars:
        print(b)
    if args.record:
        record(
            f"Prefill: MoA plans vs dense FlexAttention and SDPA flash (Llama-3-8B shapes, {args.layers} layers)",
            out + "\n\n" + "\n".join(f"- {c}" for c in checks + bars),
            device=args.device,
            details=("Smoke run: tiny shapes on the CPU. " if args.smoke else "")
            + "'x ref' is the time over dense FlexAttention causal (attention) or over HF sdpa eager (model).",
        )


if __name__ == "__main__":
    main()
