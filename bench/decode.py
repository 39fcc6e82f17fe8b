"""Whole-model decode with the ragged MoA cache against HF eager generate and a dense plan.

    python bench/decode.py [--cases 8x16384 4x65536] [--densities 0.5 0.25] [--kv-dtypes bf16 fp8] [--steps 24]
                           [--mode reduce-overhead] [--record]
    python bench/decode.py --max-batch 32768      # largest batch that fits at 32K: moa-flex d=0.25 vs HF eager
    python bench/decode.py --cases --max-batch 32768 --kv-dtypes bf16 fp8   # ... for a bf16 and an FP8 cache
    python bench/decode.py --smoke [--kv-dtypes bf16 fp8] [--max-batch 1]   # tiny model on the CPU: the script runs
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

``--kv-dtypes bf16 fp8`` (default bf16): every moa-flex row (dense plan, each density, their
"(forward)" rows and the max-batch row) once per cache dtype; fp8 rows are named
"moa-flex d=0.25 fp8" (bf16 rows keep their names): moa_flex.compile(kv_dtype=...) for the
first, the compiled model's ``kv_dtype`` switched for the others (torch.compile traces the
graphs again for the new cache tensors; moa-flex itself is not recompiled); random-filled
caches are built with that kv_dtype (FP8: random bf16 values through the cache's quantizer).
Their floor counts the cache's bytes as ``MoaCache.memory_bytes`` does: FP8 values and scales.
The max-batch search sizes each row's first guess by that cache's bytes per row
(``harness.cache_bytes``: slots x 2 x (D bytes + 4 bytes of scale) for FP8, x 2D bytes for bf16),
so FP8 starts near its own, larger batch; notes give the fp8/bf16 ratio of step time
(same batch) and of the largest batch's tokens/s. HF eager rows: bf16 (DynamicCache) only.
``--smoke``: on the CPU the model runs in float32, so "bf16" is a float32 cache there;
``--max-batch`` with ``--smoke`` runs at 256 tokens against a nominal free memory of
``SMOKE_FREE`` (the search's arithmetic, not a real limit).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import moa_flex
from decode_kernel import plan_at_kv_density
from harness import (
    KV_CHOICES, cache_bytes, copy_bandwidth, fill_random, kv_storage, kv_suffix, llama3_8b_config, record, set_kv_dtype,
    storage_dtype,
)
from moa_flex import MoaCache
from moa_flex.runtime.generate import new_cache
from moa_flex.plan import ModelShape, Plan

SMOKE_FREE = 1 << 20  # --smoke --max-batch: the "free memory" the CPU search sizes its batches by
SMOKE_MAX_BATCH_N = 256  # --smoke --max-batch: its length (tokens)


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


def use_plan(model, plan: Plan, mode: str | None, fuse_linear: bool, kv: str = "bf16") -> None:  # noqa: ANN001
    """Compile the model once (first call, with this cache dtype), then switch plans and cache
    dtypes without recompiling moa-flex."""
    if getattr(model, "moa_flex", None) is None:
        moa_flex.compile(model, plan, mode=mode, fuse_linear=fuse_linear, kv_dtype=kv_storage(kv))
    else:
        model.moa_flex.set_plan(plan)
        set_kv_dtype(model, kv)


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
        plans = [("moa-flex dense plan", Plan.dense(shape))] * args.dense + [
            (f"moa-flex d={d}", plan_at_kv_density(shape, N, d, seed=1, alpha_fraction=0.0)) for d in args.densities
        ]
        for name, plan in plans:
            outs = {kv_name: moa_rows(args, model, case, f"{name}{kv_suffix(kv_name)}", plan, kv_name, ids, hf_out,
                                      wbytes, bw, rows, checks)
                    for kv_name in args.kv_dtypes}
            checks += cache_agreement(model, case, name, outs, args.steps)
        if dev == "cuda":
            torch.cuda.empty_cache()


def moa_rows(args: argparse.Namespace, model, case: str, method: str, plan: Plan, kv_name: str,  # noqa: ANN001
             ids: torch.Tensor, hf_out: torch.Tensor | None, wbytes: int, bw: float, rows: list, checks: list
             ) -> torch.Tensor:
    """One moa-flex plan with one cache dtype: the generate() row, then the "(forward)" row.
    Returns the generated sequences."""
    dev = args.device
    B, N = ids.shape[0], ids.shape[1] + args.steps
    use_plan(model, plan, args.mode, args.fuse_linear, kv_name)
    t0 = time.perf_counter()
    ms, peak, out = timed_generate(model, ids, args.steps, dev)
    print(f"{method}: generate took {time.perf_counter() - t0:.1f} s in all", flush=True)
    kv = model.moa_flex.cache.memory_bytes()  # values and an FP8 cache's scales
    rows.append(dict(case=case, method=method, density=plan.kv_density(N), ms=ms, peak=peak,
                     floor=(wbytes + kv) / bw * 1e3))
    print(rows[-1], flush=True)
    if method.startswith("moa-flex dense plan") and hf_out is not None:
        new = out[:, -args.steps:] == hf_out[:, -args.steps:]
        cache = "" if kv_storage(kv_name) is None else f", {kv_name} cache"
        checks.append(f"{case}: dense plan{cache} vs HF eager generate, greedy tokens equal: first token "
                      f"{bool(new[:, 0].all())}, all {int(new.sum())}/{new.numel()} (bf16, other kernels)")
    model.moa_flex.release_cache()
    # the model's decode step alone (no generate() loop): a filled cache, forwards timed alone
    cache = random_moa_cache(plan, B, N, N - args.steps - 4, args.dtype, dev, kv_storage(kv_name))
    fms = decode_steps(model, cache, B, N - args.steps - 4, args.steps, dev)
    del cache
    rows.append(dict(case=case, method=f"{method} (forward)", density=plan.kv_density(N), ms=fms, peak=0,
                     floor=(wbytes + kv) / bw * 1e3))
    print(rows[-1], flush=True)
    return out


def cache_logits(model, seq: torch.Tensor, kv_name: str, keep: int) -> torch.Tensor:  # noqa: ANN001
    """fp32 logits of the last ``keep`` positions of ``seq`` prefilled onto a fresh MoA cache of
    ``kv_name`` under the model's current plan (what decoding those tokens reads)."""
    cache = new_cache(model, model.moa_flex, seq.shape[0], seq.shape[1], kv_storage(kv_name))
    with torch.no_grad():
        out = model(input_ids=seq, past_key_values=cache, use_cache=True, logits_to_keep=keep).logits.float()
    del cache
    return out


def cache_agreement(model, case: str, name: str, outs: dict, steps: int) -> list[str]:  # noqa: ANN001
    """Each further cache dtype against the first, same plan: greedy tokens of generate(), and
    the logits of the first dtype's generated positions read through each cache (prefill of the
    first dtype's sequences; random weights: reported, not tuned)."""
    kinds = list(outs)
    if len(kinds) < 2:
        return []
    base = outs[kinds[0]]
    ref = None
    lines = []
    for kv_name in kinds[1:]:
        same = outs[kv_name][:, -steps:] == base[:, -steps:]
        differ = (~same).any(0).nonzero()
        first = int(differ[0]) if len(differ) else None
        if ref is None:
            ref = cache_logits(model, base[:, :-1], kinds[0], steps)
        got = cache_logits(model, base[:, :-1], kv_name, steps)
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        lines.append(f"{case} {name.removeprefix('moa-flex ')}: {kv_name} vs {kinds[0]} cache, greedy tokens equal "
                     f"{int(same.sum())}/{same.numel()} (first difference at step {first}); logits over the "
                     f"{kinds[0]} tokens: max |diff| {(got - ref).abs().max().item():.3g}, top-1 agree {top1:.1%}")
        print(lines[-1], flush=True)
    return lines


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


def random_moa_cache(plan: Plan, B: int, N: int, filled: int, dtype: torch.dtype, dev: str,
                     kv_dtype: torch.dtype | None = None) -> MoaCache:
    """A MoaCache (storage ``kv_dtype``, default ``dtype``) holding ``filled`` tokens of random K/V."""
    return fill_random(MoaCache(plan, B, N, dtype=dtype, devices=dev, kv_dtype=kv_dtype), filled)


def random_dynamic_cache(shape: ModelShape, B: int, filled: int, dtype: torch.dtype, dev: str) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(shape.num_layers):
        k = torch.randn(B, shape.num_kv_heads, filled, shape.head_dim, dtype=dtype, device=dev)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def free_memory(dev: str) -> int:
    """Free device memory (bytes) the searches size by; the CPU smoke run: SMOKE_FREE."""
    return torch.cuda.mem_get_info()[0] if dev == "cuda" else SMOKE_FREE


def search(try_fn: Callable[[int], float], first: int) -> tuple[int, float]:
    """(largest batch that ran, its step ms): from ``first`` down by 10% per out-of-memory."""
    B = first
    while B > 0:
        try:
            return B, try_fn(B)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            B = int(B * 0.9)
    raise SystemExit("nothing fits")


def max_batch(args: argparse.Namespace, model, shape: ModelShape, bw: float, rows: list, checks: list) -> None:  # noqa: ANN001
    """Largest batch that fits at N tokens: moa-flex at d=0.25 (per cache dtype) against HF eager at its own."""
    dev, N, steps = args.device, args.max_batch, args.steps
    free = free_memory(dev)
    elem = torch.empty((), dtype=args.dtype).element_size()
    row_dense = kv_bytes_dense(shape, 1, N + steps, elem)
    plan = plan_at_kv_density(shape, N + steps, 0.25, seed=1, alpha_fraction=0.0)
    wbytes = weight_bytes(model)
    if getattr(model, "moa_flex", None) is not None:
        model.moa_flex.release_cache()

    def hf_try(B: int) -> float:
        cache = random_dynamic_cache(shape, B, N, args.dtype, dev)
        return decode_steps(model, cache, B, N, steps, dev)

    with stock(model):
        hf_B, hf_ms = search(hf_try, int(free * 0.9 / (row_dense * 1.05)))
    rows.append(dict(case=f"max batch @{N}", method=f"HF eager sdpa B={hf_B}", density=1.0, ms=hf_ms,
                     peak=0, floor=(wbytes + kv_bytes_dense(shape, hf_B, N, elem)) / bw * 1e3, batch=hf_B))
    print(rows[-1], flush=True)
    torch.cuda.empty_cache()
    found = []
    for kv_name in args.kv_dtypes:
        found.append(moa_max_batch(args, model, plan, kv_name, shape.head_dim, wbytes, bw, rows))
        name, moa_B, moa_ms = found[-1]
        ratio = (moa_B / moa_ms) / (hf_B / hf_ms)
        checks.append(f"max batch at {N}: {name} {moa_B * 1e3 / moa_ms:.0f} tok/s (B={moa_B}) vs HF eager "
                      f"{hf_B * 1e3 / hf_ms:.0f} tok/s (B={hf_B}): {ratio:.2f}x (bar >= 5x); caches filled with random K/V")
    (name0, B0, ms0), *others = found
    for name, moa_B, moa_ms in others:
        checks.append(f"max batch at {N}: {name} {moa_B * 1e3 / moa_ms:.0f} tok/s (B={moa_B}) vs {name0} "
                      f"{B0 * 1e3 / ms0:.0f} tok/s (B={B0}): {(moa_B / moa_ms) / (B0 / ms0):.2f}x the tokens/s, "
                      f"{moa_B / B0:.2f}x the batch")


def moa_max_batch(args: argparse.Namespace, model, plan: Plan, kv_name: str, D: int, wbytes: int, bw: float,  # noqa: ANN001
                  rows: list) -> tuple[str, int, float]:
    """The largest batch of moa-flex with ``plan`` and cache dtype ``kv_name`` at ``--max-batch``
    tokens (a row appended): (method name, batch, step ms)."""
    dev, N, steps = args.device, args.max_batch, args.steps
    storage = storage_dtype(kv_name, args.dtype)
    use_plan(model, plan, args.mode, args.fuse_linear, kv_name)
    model.moa_flex.release_cache()
    torch.cuda.empty_cache()

    def moa_try(B: int) -> float:
        cache = random_moa_cache(plan, B, N + steps, N, args.dtype, dev, storage)
        try:
            return decode_steps(model, cache, B, N, steps, dev)
        finally:
            del cache

    # the first guess: this cache dtype's own bytes per row (FP8: values and scales)
    row_moa = cache_bytes(plan, N + steps, 1, storage, D)
    moa_B, moa_ms = search(moa_try, int(free_memory(dev) * 0.8 / (row_moa * 1.1)))
    name = f"moa-flex d=0.25{kv_suffix(kv_name)}"
    kv = cache_bytes(plan, N + steps, moa_B, storage, D)
    rows.append(dict(case=f"max batch @{N}", method=f"{name} B={moa_B}", density=plan.kv_density(N + steps),
                     ms=moa_ms, peak=0, floor=(wbytes + kv) / bw * 1e3, batch=moa_B))
    print(rows[-1], flush=True)
    return name, moa_B, moa_ms


def table(rows: list) -> str:
    lines = ["| case | method | KV density | step (ms) | tok/s | floor (ms) | x floor | peak (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        B = r.get("batch") or int(r["case"].split("x")[0])
        lines.append(f"| {r['case']} | {r['method']} | {r['density']:.3f} | {r['ms']:.2f} | {B * 1e3 / r['ms']:.0f} | "
                     f"{r['floor']:.2f} | {r['ms'] / r['floor']:.2f} | {r['peak'] / 2**30:.1f} |".replace("| 0.0 |", "| |"))
    return "\n".join(lines)


def bars(rows: list, densities: list[float], kv_dtypes: list[str]) -> list[str]:
    """Per same-batch case, density and cache dtype: x floor, x HF eager, x the dense plan of
    the same cache dtype; then each other cache dtype's step against the first's."""
    out = []
    by = {(r["case"], r["method"]): r for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows if "x" in r["case"]):
        hf = by.get((case, "HF eager sdpa"))
        for d in densities:
            for kv_name in kv_dtypes:
                sfx = kv_suffix(kv_name)
                r = by.get((case, f"moa-flex d={d}{sfx}"))
                dense = by.get((case, f"moa-flex dense plan{sfx}"))
                if r is None:
                    continue
                vs_hf = f"{hf['ms'] / r['ms']:.2f}x HF eager; " if hf else ""
                vs_dense = f"{dense['ms'] / r['ms']:.2f}x dense plan{sfx}" if dense else ""
                out.append(f"{case} d={d}{sfx}: {r['ms'] / r['floor']:.2f}x floor (bar <= 1.5); {vs_hf}{vs_dense}")
        out += kv_ratios(by, case, ["moa-flex dense plan", *(f"moa-flex d={d}" for d in densities)], kv_dtypes)
    return out


def kv_ratios(by: dict, case: str, methods: list[str], kv_dtypes: list[str]) -> list[str]:
    """Each other cache dtype's generate() step against the first's, per method (same batch)."""
    out = []
    for method in methods:
        first = by.get((case, f"{method}{kv_suffix(kv_dtypes[0])}"))
        for kv_name in kv_dtypes[1:]:
            r = by.get((case, f"{method}{kv_suffix(kv_name)}"))
            if first is None or r is None:
                continue
            out.append(f"{case} {method.removeprefix('moa-flex ')}: {kv_name} {r['ms']:.2f} ms vs {kv_dtypes[0]} "
                       f"{first['ms']:.2f} ms a step: {first['ms'] / r['ms']:.2f}x the tokens/s, floor "
                       f"{r['floor']:.2f} vs {first['floor']:.2f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=["8x16384", "4x65536"], help="BATCHxTOKENS (planned length)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--kv-dtypes", nargs="+", choices=KV_CHOICES, default=["bf16"],
                    help="cache dtypes of the moa-flex rows, each row once per dtype (fp8: FP8 values + scales)")
    ap.add_argument("--steps", type=int, default=24, help="decode steps per generate")
    ap.add_argument("--mode", default="reduce-overhead", help="inductor mode of moa_flex.compile (decode)")
    ap.add_argument("--max-batch", type=int, default=0, help="also run the largest-batch case at this length")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF eager baseline rows")
    ap.add_argument("--no-dense", dest="dense", action="store_false", help="skip the moa-flex dense plan rows")
    ap.add_argument("--no-fuse-linear", dest="fuse_linear", action="store_false",
                    help="decode steps without the fused q/k/v and gate/up kernels (moa_flex.compile fuse_linear=False)")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.dtype, args.layers, args.mode = "cpu", torch.float32, 2, None
        args.cases, args.steps = ["2x400"] if args.cases else [], 8
        args.max_batch = SMOKE_MAX_BATCH_N if args.max_batch else 0
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
    notes = checks + bars(rows, args.densities, args.kv_dtypes)
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
            "Step = median time of one decode step, each timed alone."
            + (f" moa-flex cache dtypes: {', '.join(args.kv_dtypes)} (fp8 rows: FP8 values with a float32 scale per "
               "slot; their floor and max-batch sizing count values and scales)." if args.kv_dtypes != ["bf16"] else ""),
        )


if __name__ == "__main__":
    main()
