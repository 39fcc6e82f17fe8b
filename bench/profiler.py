"""The MoA profiler on a Llama-3-8B-shaped model: seconds and peak memory per sample.

    python bench/profiler.py [--lengths 8192 16384 32768] [--layers 32] [--record]
    python bench/profiler.py --smoke        # tiny model on the CPU: checks the script runs

Llama-3-8B shape (harness.llama3_8b_config: 32 layers, 32 query / 8 KV heads, head dim 128,
hidden 4096, intermediate 14336, vocab 128256), random weights built directly in bf16 on the
GPU. Per length: one synthetic lookup sample (prompt of N - max_new_tokens tokens, answered
greedily by the model itself), then ``profile_model`` on it (sink 64, span_multiple 64, Triton influence kernel,
per-layer activation checkpointing). Seconds: wall time of the profile call (synchronized),
after a warm-up length that compiles the kernels. Peak: the CUDA allocator's peak during the
call, in GiB, absolute and above the resident weights. Also the influence kernels alone on
one layer's random q, k, v, O, dO (ms per layer), to show their share.
Bars: 32K fits on one H200; 16K takes under 60 s per sample.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from harness import llama3_8b_config, record
from moa_flex.data.calibration import answer_samples, synthetic_samples
from moa_flex.profile import influence_histogram, profile_model

GIB = 2**30


def build_model(args: argparse.Namespace) -> transformers.PreTrainedModel:
    config = llama3_8b_config(args.layers, args.smoke)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_sample(model, args: argparse.Namespace, N: int) -> dict:  # noqa: ANN001
    """Answer one synthetic sample of length N, then profile it: seconds and peak memory."""
    vocab = model.config.vocab_size
    prompt = synthetic_samples(vocab, N - args.max_new_tokens, 1, seed=N, num_records=16)
    sample = answer_samples(model, prompt, max_new_tokens=args.max_new_tokens, progress=False)[0]
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    sync(args.device)
    t = time.perf_counter()
    profile = profile_model(model, {N: [sample]}, sink=args.sink, span_multiple=args.span_multiple, progress=False)
    sync(args.device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
    hist = profile.hist[N]
    assert torch.isfinite(hist).all() and hist.sum() > 0, "profile histogram is not finite and positive"
    return {"N": N, "tokens": sample.num_tokens, "answer": sample.answer.numel(), "seconds": seconds,
            "peak_gib": peak / GIB, "extra_gib": (peak - resident) / GIB}


def kernel_ms(args: argparse.Namespace, N: int, H: int, KVH: int, D: int) -> float:
    """Influence kernels alone on one layer's random tensors (ms, median of 3 after a warm-up)."""
    g = torch.Generator(device=args.device).manual_seed(0)
    q, o, do = (torch.randn(H, N, D, device=args.device, dtype=args.dtype, generator=g) for _ in range(3))
    k, v = (torch.randn(KVH, N, D, device=args.device, dtype=args.dtype, generator=g) for _ in range(2))
    impl = "auto" if args.device == "cuda" else "chunked"

    def run() -> None:
        influence_histogram(q, k, v, o, do, scale=D**-0.5, sink=args.sink, span_multiple=args.span_multiple, impl=impl)

    run()
    times = []
    for _ in range(3):
        sync(args.device)
        t = time.perf_counter()
        run()
        sync(args.device)
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def table(rows: list[dict]) -> str:
    lines = ["| N (tokens) | sample tokens | s per sample | peak (GiB) | above weights (GiB) | influence kernels, 1 layer (ms) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['tokens']} | {r['seconds']:.1f} | {r['peak_gib']:.1f} | {r['extra_gib']:.1f} | "
                     f"{r['kernel_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--span-multiple", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.dtype, args.lengths, args.warmup, args.layers = "cpu", torch.float32, [256, 512], 128, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/profiler.py needs a GPU (or --smoke)")
        args.device, args.dtype, args.warmup = "cuda", torch.bfloat16, 1024
    t = time.perf_counter()
    model = build_model(args)
    print(f"model built in {time.perf_counter() - t:.1f} s", flush=True)
    one_sample(model, args, args.warmup)  # compiles the Triton kernels
    cfg = model.config
    rows = []
    for N in args.lengths:
        try:
            row = one_sample(model, args, N)
        except torch.OutOfMemoryError as e:
            print(f"N={N}: out of memory ({str(e).splitlines()[0]})", flush=True)
            row = {"N": N, "tokens": N, "answer": 0, "seconds": float("nan"), "peak_gib": float("nan"), "extra_gib": float("nan")}
            torch.cuda.empty_cache()
        row["kernel_ms"] = kernel_ms(args, N, cfg.num_attention_heads, cfg.num_key_value_heads,
                                     cfg.hidden_size // cfg.num_attention_heads)
        rows.append(row)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = table(rows)
    print(out)
    bars = []
    for r in rows:
        if r["N"] == 32768:
            bars.append(f"bar: 32K fits on one GPU: {'yes' if r['seconds'] == r['seconds'] else 'NO'} (peak {r['peak_gib']:.1f} GiB)")
        if r["N"] == 16384:
            bars.append(f"bar: 16K in {r['seconds']:.1f} s per sample (< 60 s: {'yes' if r['seconds'] < 60 else 'NO'})")
    for b in bars:
        print(b)
    if args.record:
        record(
            f"Profiler: one sample per length (Llama-3-8B shape, {args.layers} layers, random bf16 weights)",
            out + "\n\n" + "\n".join(f"- {b}" for b in bars),
            device=args.device,
            details=("Smoke run: tiny model on the CPU. " if args.smoke else "")
            + f"Sink {args.sink}, span_multiple {args.span_multiple}, answers of up to {args.max_new_tokens} tokens "
            "written by the model; peak is the CUDA allocator's peak during profile_model.",
        )


if __name__ == "__main__":
    main()
