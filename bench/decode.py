"""Whole-model decode with the ragged MoA cache against HF eager generate and a dense plan.

    python bench/decode.py [--cases 8x16384 4x65536] [--densities 0.5 0.25] [--steps 24] [--mode reduce-overhead] [--record]
    python bench/decode.py --max-batch 32768      # largest batch that fits at 32K: moa-flex d=0.25 vs HF eager
    python bench/decode.py --smoke                # tiny model on the CPU: checks the script runs
    python bench/decode.py --no-fuse-linear       # decode steps with one cuBLAS call per projection
    python bench/decode.py --no-hf                # without the HF eager baseline (quicker)

Llama-3-8B shape (32 layers, 32 query / 8 KV heads, head dim 128, bf16, random weights).
Same-batch cases: a random prompt of N - steps tokens, then `steps` greedy tokens through
`model.generate` (HF eager sdpa with its DynamicCache; moa_flex.compile with a dense plan and
with heterogeneous kv_head plans at the given KV densities, one compiled model, plans switched
with set_plan). Every decode step is timed alone: a logits processor synchronizes and takes a
timestamp at each step, the median of the differences is the step time (the first steps,
which compile or capture CUDA graphs, are dropped). Rows marked "(forward)" time the model's
decode step alone, without generate()'s loop: single-token forwards over a cache filled with
random keys and values, each synchronized and timed alone. Floor: (weight bytes + KV bytes the step
must read) / copy bandwidth measured in the same run (harness.copy_bandwidth: read + write of
4 GiB). Max-batch case: caches filled with random
keys and values instead of a prefill, then decode steps through the model's forward.
Kernel alone: bench/decode_kernel.py.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import moa_flex
from decode_kernel import plan_at_kv_density
from harness import copy_bandwidth, llama3_8b_config, record
from moa_flex import MoaCache
from moa_flex.plan import ModelShape, Plan


class StepClock(LogitsProcessor):
    """Synchronizes and timestamps every decode step (called once per generated token)."""

    def __init__(self, device: str) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores

    def step_ms(self, skip: int) -> float:
        gaps = [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])][skip:]
        return statistics.median(gaps)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_dense(shape: ModelShape, batch: int, N: int, elem: int) -> int:
    return 2 * shape.num_layers * batch * shape.num_kv_heads * N * shape.head_dim * elem


def timed_generate(model, ids: torch.Tensor, steps: int, device: str) -> tuple[float, int, torch.Tensor]:  # noqa: ANN001
    """(median step ms, peak bytes, sequences) of a greedy generate of `steps` tokens."""
    clock = StepClock(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0,
        )
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return clock.step_ms(skip=3), peak, out


@contextlib.contextmanager
def stock(model):  # noqa: ANN001, ANN201
    """The plain HF model for the baselines, keeping moa-flex's compiled graphs for later."""
    saved = {k: model.__dict__.pop(k) for k in ("forward", "generate") if k in model.__dict__}
    try:
        yield model
    finally:
        model.__dict__.update(saved)


def use_plan(model, plan: Plan, mode: str | None, fuse_linear: bool) -> None:  # noqa: ANN001
    """Compile the model once (first call), then switch plans without recompiling."""
    if getattr(model, "moa_flex", None) is None:
        moa_flex.compile(model, plan, mode=mode, fuse_linear=fuse_linear)
    else:
        model.moa_flex.set_plan(plan)


def same_batch(args: argparse.Namespace, model, shape: ModelShape, bw: float, rows: list, checks: list) -> None:  # noqa: ANN001
    dev = args.device
    elem = torch.empty((), dtype=args.dtype).element_size()
    wbytes = weight_bytes(model)
    for case in args.cases:
        B, N = (int(x) for x in case.split("x"))
        ids = torch.randint(1, model.config.vocab_size, (B, N - args.steps), device=dev,
                            generator=torch.Generator(dev).manual_seed(0))
        dense_kv = kv_bytes_dense(shape, B, N, elem)
        hf_out = None
        if args.hf:
            t0 = time.perf_counter()
            with stock(model):
                hf_ms, hf_peak, hf_out = timed_generate(model, ids, args.steps, dev)
            print(f"HF eager: generate took {time.perf_counter() - t0:.1f} s in all", flush=True)
            rows.append(dict(case=case, method="HF eager sdpa", density=1.0, ms=hf_ms, peak=hf_peak,
                             floor=(wbytes + dense_kv) / bw * 1e3))
            print(rows[-1], flush=True)
            cache = random_dynamic_cache(shape, B, N - args.steps - 4, args.dtype, dev)
            with stock(model):
                fms = decode_steps(model, cache, B, N - args.steps - 4, args.steps, dev)
            del cache
            rows.append(dict(case=case, method="HF eager sdpa (forward)", density=1.0, ms=fms, peak=0,
                             floor=(wbytes + dense_kv) / bw * 1e3))
            print(rows[-1], flush=True)
        plans = [("moa-flex dense plan", Plan.dense(shape))] + [
            (f"moa-flex d={d}", plan_at_kv_density(shape, N, d, seed=1, alpha_fraction=0.0)) for d in args.densities
        ]
        for name, plan in plans:
            use_plan(model, plan, args.mode, args.fuse_linear)
            t0 = time.perf_counter()
            ms, peak, out = timed_generate(model, ids, args.steps, dev)
            print(f"{name}: generate took {time.perf_counter() - t0:.1f} s in all", flush=True)
            kv = model.moa_flex.cache.memory_bytes()
            rows.append(dict(case=case, method=name, density=plan.kv_density(N), ms=ms, peak=peak,
                             floor=(wbytes + kv) / bw * 1e3))
            print(rows[-1], flush=True)
            if name.endswith("dense plan") and hf_out is not None:
                new = out[:, -args.steps:] == hf_out[:, -args.steps:]
                checks.append(f"{case}: dense plan vs HF eager generate, greedy tokens equal: first token "
                              f"{bool(new[:, 0].all())}, all {int(new.sum())}/{new.numel()} (bf16, other kernels)")
            model.moa_flex.release_cache()
            # the model's decode step alone (no generate() loop): a filled cache, forwards timed alone
            cache = random_moa_cache(plan, B, N, N - args.steps - 4, args.dtype, dev)
            fms = decode_steps(model, cache, B, N - args.steps - 4, args.steps, dev)
            del cache
            rows.append(dict(case=case, method=f"{name} (forward)", density=plan.kv_density(N), ms=fms, peak=0,
                             floor=(wbytes + kv) / bw * 1e3))
            print(rows[-1], flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()


def decode_steps(model, cache, B: int, start: int, steps: int, dev: str) -> float:  # noqa: ANN001
    """Median ms of `steps` single-token forwards over a filled cache (positions from `start`)."""
    tok = torch.ones(B, 1, dtype=torch.long, device=dev)
    times = []
    with torch.no_grad():
        for t in range(steps):
            pos = torch.full((B, 1), start + t, dtype=torch.long, device=dev)
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[3:])


def random_moa_cache(plan: Plan, B: int, N: int, filled: int, dtype: torch.dtype, dev: str) -> MoaCache:
    cache = MoaCache(plan, B, N, dtype=dtype, devices=dev)
    for layer in cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
        layer.length.fill_(filled)
    cache.mark_filled(filled)
    return cache


def random_dynamic_cache(shape: ModelShape, B: int, filled: int, dtype: torch.dtype, dev: str) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(shape.num_layers):
        k = torch.randn(B, shape.num_kv_heads, filled, shape.head_dim, dtype=dtype, device=dev)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def max_batch(args: argparse.Namespace, model, shape: ModelShape, bw: float, rows: list, checks: list) -> None:  # noqa: ANN001
    """Largest batch that fits at N tokens: moa-flex at d=0.25 against HF eager at its own."""
    dev, N, steps = args.device, args.max_batch, args.steps
    free = torch.cuda.mem_get_info()[0]
    elem = torch.empty((), dtype=args.dtype).element_size()
    row_dense = kv_bytes_dense(shape, 1, N + steps, elem)
    plan = plan_at_kv_density(shape, N + steps, 0.25, seed=1, alpha_fraction=0.0)
    wbytes = weight_bytes(model)
    if getattr(model, "moa_flex", None) is not None:
        model.moa_flex.release_cache()

    def hf_try(B: int) -> float:
        cache = random_dynamic_cache(shape, B, N, args.dtype, dev)
        return decode_steps(model, cache, B, N, steps, dev)

    def search(try_fn, first: int) -> tuple[int, float]:  # noqa: ANN001
        B = first
        while B > 0:
            try:
                ms = try_fn(B)
                return B, ms
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                B = int(B * 0.9)
        raise SystemExit("nothing fits")

    with stock(model):
        hf_B, hf_ms = search(hf_try, int(free * 0.9 / (row_dense * 1.05)))
    rows.append(dict(case=f"max batch @{N}", method=f"HF eager sdpa B={hf_B}", density=1.0, ms=hf_ms,
                     peak=0, floor=(wbytes + kv_bytes_dense(shape, hf_B, N, elem)) / bw * 1e3, batch=hf_B))
    print(rows[-1], flush=True)
    torch.cuda.empty_cache()
    use_plan(model, plan, args.mode, args.fuse_linear)

    def moa_try(B: int) -> float:
        cache = random_moa_cache(plan, B, N + steps, N, args.dtype, dev)
        try:
            return decode_steps(model, cache, B, N, steps, dev)
        finally:
            del cache

    row_moa = plan.kv_density(N + steps) * row_dense
    moa_B, moa_ms = search(moa_try, int(torch.cuda.mem_get_info()[0] * 0.8 / (row_moa * 1.1)))
    kv = int(plan.kv_density(N + steps) * kv_bytes_dense(shape, moa_B, N + steps, elem))
    rows.append(dict(case=f"max batch @{N}", method=f"moa-flex d=0.25 B={moa_B}", density=plan.kv_density(N + steps),
                     ms=moa_ms, peak=0, floor=(wbytes + kv) / bw * 1e3, batch=moa_B))
    print(rows[-1], flush=True)
    ratio = (moa_B / moa_ms) / (hf_B / hf_ms)
    checks.append(f"max batch at {N}: moa-flex d=0.25 {moa_B * 1e3 / moa_ms:.0f} tok/s (B={moa_B}) vs HF eager "
                  f"{hf_B * 1e3 / hf_ms:.0f} tok/s (B={hf_B}): {ratio:.2f}x (bar >= 5x); caches filled with random K/V")


def table(rows: list) -> str:
    lines = ["| case | method | KV density | step (ms) | tok/s | floor (ms) | x floor | peak (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        B = r.get("batch") or int(r["case"].split("x")[0])
        lines.append(f"| {r['case']} | {r['method']} | {r['density']:.3f} | {r['ms']:.2f} | {B * 1e3 / r['ms']:.0f} | "
                     f"{r['floor']:.2f} | {r['ms'] / r['floor']:.2f} | {r['peak'] / 2**30:.1f} |".replace("| 0.0 |", "| |"))
    return "\n".join(lines)


def bars(rows: list) -> list[str]:
    out = []
    by = {(r["case"], r["method"]): r for r in rows}
    for case in {r["case"] for r in rows if "x" in r["case"]}:
        hf = by.get((case, "HF eager sdpa"))
        dense = by.get((case, "moa-flex dense plan"))
        for d in ("0.5", "0.25"):
            r = by.get((case, f"moa-flex d={d}"))
            if r is None:
                continue
            vs_hf = f"{hf['ms'] / r['ms']:.2f}x HF eager; " if hf else ""
            out.append(f"{case} d={d}: {r['ms'] / r['floor']:.2f}x floor (bar <= 1.5); {vs_hf}"
                       f"{dense['ms'] / r['ms']:.2f}x dense plan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=["8x16384", "4x65536"], help="BATCHxTOKENS (planned length)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--steps", type=int, default=24, help="decode steps per generate")
    ap.add_argument("--mode", default="reduce-overhead", help="inductor mode of moa_flex.compile (decode)")
    ap.add_argument("--max-batch", type=int, default=0, help="also run the largest-batch case at this length")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF eager baseline rows")
    ap.add_argument("--no-fuse-linear", dest="fuse_linear", action="store_false",
                    help="decode steps without the fused q/k/v and gate/up kernels (moa_flex.compile fuse_linear=False)")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.dtype, args.layers, args.mode = "cpu", torch.float32, 2, None
        args.cases, args.steps = ["2x400"], 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/decode.py needs a GPU (or --smoke)")
        args.device, args.dtype = "cuda", torch.bfloat16
    from transformers import LlamaForCausalLM

    config = llama3_8b_config(args.layers, args.smoke)
    config._attn_implementation = "sdpa"
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(config, dtype=args.dtype).eval()
    shape = ModelShape.from_config(config)
    bw = copy_bandwidth(args.device) if not args.smoke else 1e10
    rows: list = []
    checks: list = [f"copy bandwidth {bw / 1e12:.2f} TB/s"]
    if args.cases:
        same_batch(args, model, shape, bw, rows, checks)
    if args.max_batch:
        max_batch(args, model, shape, bw, rows, checks)
    out = table(rows)
    notes = checks + bars(rows)
    print(out)
    for n in notes:
        print("-", n)
    if args.record:
        record(
            f"Decode: whole model, ragged MoA cache vs HF eager generate (Llama-3-8B shape, {args.layers} layers)",
            out + "\n\n" + "\n".join(f"- {n}" for n in notes),
            device=args.device,
            details=("Smoke run: tiny model on the CPU, floor from a nominal 10 GB/s. " if args.smoke else "")
            + f"moa-flex decode mode {args.mode}, linear fusion {'on' if args.fuse_linear else 'off'}. "
            "Step = median time of one decode step, each timed alone.",
        )


if __name__ == "__main__":
    main()
