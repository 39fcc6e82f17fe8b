"""The chunk-attention kernel alone against FlexAttention on the same kept pairs.

    python bench/chunk_kernel.py [--lengths 131072 262144] [--chunk 16384] [--plans 262k d0.25] [--record]
    python bench/chunk_kernel.py --sweep             # block_q x block_n x warps x stages, the fastest first
    python bench/chunk_kernel.py --smoke             # tiny shapes on the CPU (Triton's interpreter)

One Llama-3-8B layer (32 query / 8 KV heads of 128, bf16). The last chunk of a prompt of N
tokens: ``C`` queries at positions N - C .. N - 1. moa-flex: ``chunk_attention_triton`` over a
ragged cache holding positions 0 .. N - C - 1 (each group's sink and ring, random K/V) plus the
chunk's own keys. FlexAttention: the same queries over all N keys (dense K/V) with the layer's
analytic BlockMask (``block_mask_from_spans``, q_offset N - C), compiled: the one-shot prefill's
work on these rows. Both compute the same kept pairs; TFLOP/s counts 4 * D flops per kept pair.
Layer 0 of the shipped 262k plan ("262k") or of a kv_head plan at KV density 0.25 ("d0.25").
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch.nn.attention.flex_attention import flex_attention

import moa_flex
from decode_kernel import plan_at_kv_density
from harness import LLAMA3_8B, Timer, record
from moa_flex.kernels.chunk import chunk_attention_triton
from moa_flex.masks import block_mask_from_spans
from moa_flex.plan import Plan, kept_pairs


def layer_plan(name: str, N: int) -> Plan:
    if name == "262k":
        return moa_flex.plans.load("Llama-3-8B-Instruct-262k.moa")
    return plan_at_kv_density(LLAMA3_8B, N, float(name[1:]), seed=1, alpha_fraction=0.0)


def inputs(plan: Plan, N: int, C: int, dev: str, dtype: torch.dtype, heads: int, kv_heads: int, D: int) -> dict:
    """The chunk, its ragged cache and the dense K/V of the whole prompt (layer 0)."""
    gen = torch.Generator(dev).manual_seed(0)
    spans = plan.head_spans(N)[0][:heads].to(torch.int32).view(1, heads)
    caps = plan.cache_spans(N)[0][:kv_heads].to(torch.int32).view(1, kv_heads)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), caps[0].cumsum(0).to(torch.int32)])
    S = int(offsets[-1])
    q = torch.randn(1, heads, C, D, device=dev, dtype=dtype, generator=gen)
    k_all = torch.randn(1, kv_heads, N, D, device=dev, dtype=dtype, generator=gen)
    v_all = torch.randn(1, kv_heads, N, D, device=dev, dtype=dtype, generator=gen)
    keys = torch.randn(1, S, D, device=dev, dtype=dtype, generator=gen)  # ring contents: random, as the timing needs
    values = torch.randn(1, S, D, device=dev, dtype=dtype, generator=gen)
    n = torch.tensor([N - C], device=dev)
    return dict(q=q, k_new=k_all[:, :, N - C:].contiguous(), v_new=v_all[:, :, N - C:].contiguous(), keys=keys,
                values=values, offsets=offsets.to(dev), caps=caps.to(dev), spans=spans.to(dev), n=n, k_all=k_all,
                v_all=v_all, sink=plan.sink)


def pairs(plan: Plan, N: int, C: int, heads: int) -> float:
    """Kept (query, key) pairs of the last C queries, summed over heads."""
    spans = plan.head_spans(N)[0][:heads]
    return float((kept_pairs(spans, plan.sink, N) - kept_pairs(spans, plan.sink, N - C)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144])
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--plans", nargs="+", default=["262k", "d0.25"])
    ap.add_argument("--sweep", action="store_true", help="time the kernel's tile grid and list the fastest")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    heads, kv_heads, D = (4, 1, 16) if args.smoke else (32, 8, 128)
    if args.smoke:
        args.lengths, args.chunk, args.repeats = [256], 64, 1
    timer = Timer(dev, args.repeats)
    flex = torch.compile(flex_attention, dynamic=False)
    lines = ["| N | chunk | plan | kept pairs (G) | moa-flex chunk kernel (ms) | TFLOP/s | every tile masked (ms) | "
             "FlexAttention (ms) | TFLOP/s | kernel / flex |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    sweeps = []
    for N, name in itertools.product(args.lengths, args.plans):
        plan = layer_plan(name, N)
        x = inputs(plan, N, args.chunk, dev, dtype, heads, kv_heads, D)
        C, scale = args.chunk, D ** -0.5
        call = (x["q"], x["k_new"], x["v_new"], x["keys"], x["values"], x["offsets"], x["caps"], x["spans"], x["n"],
                x["n"].clone(), x["sink"], 0, scale, 0.0)
        ms, _ = timer(lambda: chunk_attention_triton(*call), graph=False)
        mms, _ = timer(lambda: chunk_attention_triton(*call, full_tiles=False), graph=False)
        bm = block_mask_from_spans(x["spans"][0].long(), x["sink"], C, N - C, N, 128, dev, compute_q_blocks=False)
        fms, _ = timer(lambda: flex(x["q"], x["k_all"], x["v_all"], block_mask=bm, scale=scale, enable_gqa=True),
                       graph=False)
        p = pairs(plan, N, C, heads)
        flops = 4 * D * p
        lines.append(f"| {N} | {C} | {name} | {p / 1e9:.2f} | {ms:.2f} | {flops / ms / 1e9:.0f} | {mms:.2f} | {fms:.2f} | "
                     f"{flops / fms / 1e9:.0f} | {ms / fms:.2f} |")
        print(lines[-1], flush=True)
        if args.sweep:
            for bq, bn, w, st in itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4]):
                try:
                    t, _ = timer(lambda: chunk_attention_triton(*call, block_q=bq, block_n=bn, num_warps=w,
                                                                num_stages=st), graph=False)
                except Exception as e:  # noqa: BLE001 - a tile that does not fit is skipped and said
                    print(f"  block_q {bq} block_n {bn} warps {w} stages {st}: {type(e).__name__}")
                    continue
                sweeps.append((t, N, name, bq, bn, w, st))
    text = "\n".join(lines)
    if sweeps:
        sweeps.sort()
        text += "\n\nFastest tilings (ms, N, plan, block_q, block_n, warps, stages):\n" + "\n".join(
            f"- {t:.2f} ms: N={N} {name} block_q {bq} block_n {bn} warps {w} stages {st}"
            for t, N, name, bq, bn, w, st in sweeps[:12])
    print(text)
    if args.record:
        record("Chunk attention kernel alone vs FlexAttention (one Llama-3-8B layer)", text, device=dev,
               details="Same kept pairs: the last chunk of an N-token prompt; FlexAttention over the dense K/V "
                       "of the whole prompt with the analytic BlockMask.")


if __name__ == "__main__":
    main()
