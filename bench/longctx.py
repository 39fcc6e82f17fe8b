"""Long contexts at B=1: first-token time, decode step, peak memory and cache bytes, against HF.

    python bench/longctx.py [--lengths 131072 262144] [--plans 262k d0.25] [--hf] [--steps 32] [--record]
    python bench/longctx.py --lengths 131072 --chunks 4096 8192 16384 32768 --plans 262k   # chunk size sweep
    python bench/longctx.py --lengths 524288 --plans d0.25 262k                            # real chunked prefill
    python bench/longctx.py --filled 1048576 --plans d0.25 262k    # cache of random K/V, then a real 16K chunk
    python bench/longctx.py --longest d0.25                        # longest context that fits (random K/V)
    python bench/longctx.py --lengths --longest 262k d0.25 --kv-dtypes bf16 fp8   # ... per cache dtype
    python bench/longctx.py --smoke [--kv-dtypes bf16 fp8] [--longest]   # tiny model on the CPU: the script runs

Llama-3-8B shape (32 layers, 32 query / 8 KV heads of 128, bf16, random weights). Plans: the
shipped ``Llama-3-8B-Instruct-262k.moa`` ("262k", MoA's own per-query-head plan) and a kv_head
plan at KV density 0.25 at the measured length ("d0.25", ``decode_kernel.plan_at_kv_density``).
Each case is one ``model.generate`` of ``--steps`` greedy tokens from a random prompt of N -
steps tokens (so planned for N), after one warm-up request of ``--warmup`` tokens that compiles
the graphs: moa-flex compiled once with ``mode="reduce-overhead"``, plans switched with
``set_plan`` and chunk sizes with ``model.moa_flex.prefill_chunk`` (neither recompiles);
HF with eager sdpa and its DynamicCache. A logits processor synchronizes and timestamps every
token: first token = from the call to the first timestamp (the prefill); decode step = the
median gap between later timestamps. Peak = ``torch.cuda.max_memory_allocated`` during the
call; "work" = peak - weights - cache (the working set the chunk bounds). Floor of a decode
step = (weight bytes + cache bytes) / copy bandwidth measured in the same run.
``--filled N``: the cache holds random K/V for the first N - 16384 tokens (no prefill of
them), then a real chunked prefill of the last 16384 and the decode steps run (at 1M tokens a
dense cache alone is 128 GiB). ``--longest``: the largest N (in steps of 64K) whose cache
fits beside the weights and a 7 GiB working set, then run as with ``--filled``; a length that
runs out of memory anyway is tried again one step (64K) lower, up to four times, and the
out-of-memory rows stay in the table with the allocator's message in the notes.

``--kv-dtypes bf16 fp8`` (``--kv-dtype``; default bf16): every moa-flex case once per cache dtype,
side by side ("moa-flex 262k fp8, chunk 16384"; bf16 rows keep their names): moa_flex.compile's
``kv_dtype`` for the first, the compiled model's switched for the others (torch.compile traces
the graphs again for the new cache tensors); a ``--filled`` cache is built in that dtype
(FP8: random bf16 values through the cache's quantizer, with their scales). "cache" and the
floor count what ``MoaCache.memory_bytes`` counts: FP8 values and scales. ``--longest`` sizes
its search by the cache dtype's bytes (``harness.cache_bytes``: FP8 D + 4 bytes a vector
against 2D), so FP8 searches further. HF rows stay bf16. ``--smoke`` runs in float32 on the
CPU ("bf16" is a float32 cache there); with ``--longest`` it searches from 256 tokens in steps
of 256 against a nominal ``SMOKE_FREE`` bytes of free memory and no working-set reserve (the
search's arithmetic on a size a CPU runs).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from transformers import LlamaForCausalLM, LogitsProcessorList

import moa_flex
from decode import StepClock
from decode_kernel import plan_at_kv_density
from harness import (
    KV_CHOICES, LLAMA3_8B, cache_bytes, copy_bandwidth, fill_random, kv_storage, kv_suffix, llama3_8b_config, record,
    set_kv_dtype, storage_dtype,
)
from moa_flex import MoaCache
from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime.compile import DEFAULT_PREFILL_CHUNK

GiB = 2**30
FILLED_TAIL = 16384  # tokens of real prefill after a random-filled cache
# --longest: (first N, step, working set kept free) of the search; --smoke: a CPU-sized one
LONGEST_SEARCH = (1 << 20, 1 << 16, 7 * GiB)
LONGEST_RETRIES = 4  # --longest: lengths tried one step down after an out-of-memory
SMOKE_LONGEST_SEARCH = (256, 256, 0)
SMOKE_FREE = 2 << 20  # --smoke --longest: the "free memory" (bytes) the search sizes by: 256-3072 tokens of the tiny model


def plan_named(name: str, shape: ModelShape, N: int, smoke: bool) -> Plan:
    if name == "262k":
        return Plan.uniform(shape, alpha=0, beta=0.69) if smoke else moa_flex.plans.load("Llama-3-8B-Instruct-262k.moa")
    if name.startswith("d"):
        return plan_at_kv_density(shape, N, float(name[1:]), seed=1, alpha_fraction=0.0)
    raise SystemExit(f"unknown plan {name!r}: 262k or d<density>")


def timed(model, ids: torch.Tensor, steps: int, dev: str, cache: MoaCache | None = None) -> dict:  # noqa: ANN001
    """First-token seconds, median decode ms, peak bytes of one generate."""
    clock = StepClock(dev)
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    kw = {} if cache is None else {"past_key_values": cache}
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]), **kw)
    gaps = sorted((b - a) * 1e3 for a, b in zip(clock.stamps[1:], clock.stamps[2:]))
    return dict(first_s=clock.stamps[0] - t0, step_ms=gaps[len(gaps) // 2] if gaps else float("nan"),
                peak=torch.cuda.max_memory_allocated() if dev == "cuda" else 0)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def random_prompt(model, n: int, dev: str) -> torch.Tensor:  # noqa: ANN001
    return torch.randint(1, model.config.vocab_size, (1, n), device=dev, generator=torch.Generator(dev).manual_seed(n))


def hf_case(model, N: int, steps: int, dev: str) -> dict:  # noqa: ANN001
    if getattr(model, "moa_flex", None) is not None:
        moa_flex.uncompile(model)
    try:
        r = timed(model, random_prompt(model, N - steps, dev), steps, dev)
    except torch.OutOfMemoryError as e:
        r = dict(first_s=float("nan"), step_ms=float("nan"), peak=float("nan"), oom=True, why=str(e)[:300])
    gc.collect()
    torch.cuda.empty_cache() if dev == "cuda" else None
    return r


def moa_case(model, plan: Plan, N: int, args, chunk: int | None, filled: int | None = None,  # noqa: ANN001
             kv: str = "bf16") -> dict:
    """One moa-flex request planned for N with cache dtype ``kv``: a prompt of N - steps tokens
    (or a random-filled cache of ``filled`` tokens and a real prefill of the rest)."""
    dev = args.device
    warm_s = 0.0
    if getattr(model, "moa_flex", None) is None:  # compiled once; plans, chunk sizes, cache dtypes change without recompiling
        moa_flex.compile(model, plan, mode="reduce-overhead", prefill_chunk=chunk, regional=args.regional == "on",
                         kv_dtype=kv_storage(kv))
        warm = random_prompt(model, args.warmup, dev)
        t0 = time.perf_counter()
        with torch.no_grad():  # compiles the prefill and decode graphs
            model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, pad_token_id=0)
        warm_s = time.perf_counter() - t0
    model.moa_flex.set_plan(plan)
    set_kv_dtype(model, kv)
    model.moa_flex.prefill_chunk = chunk
    model.moa_flex.release_cache()
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    ids = random_prompt(model, N - args.steps, dev)
    cache = None
    try:
        if filled:
            cache = fill_random(MoaCache(plan, 1, N, dtype=args.dtype, devices=dev, kv_dtype=kv_storage(kv)), filled)
            model.moa_flex.cache = cache
        r = timed(model, ids, args.steps, dev, cache)
    except torch.OutOfMemoryError as e:
        r = dict(first_s=float("nan"), step_ms=float("nan"), peak=float("nan"), oom=True, why=str(e)[:300])
    r.update(cache=model.moa_flex.cache.memory_bytes() if model.moa_flex.cache is not None else 0,
             dense=2 * LLAMA3_8B.num_layers * LLAMA3_8B.num_kv_heads * N * LLAMA3_8B.head_dim * 2, warm_s=warm_s,
             kv_density=plan.kv_density(N))
    model.moa_flex.release_cache()
    del cache
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return r


def longest(plan_name: str, shape: ModelShape, wbytes: int, dev: str, smoke: bool,
            storage: torch.dtype) -> tuple[int, Plan] | None:
    """The largest N (from 1M in steps of 64K) whose cache, stored in ``storage`` (FP8: values
    and scales), fits beside the weights and a 7 GiB working set; None if not even the first."""
    start, step, reserve = SMOKE_LONGEST_SEARCH if smoke else LONGEST_SEARCH
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated() - wbytes if dev == "cuda" else SMOKE_FREE
    N = start
    best = None
    while True:
        plan = plan_named(plan_name, shape, N, smoke)
        if cache_bytes(plan, N, 1, storage, shape.head_dim) + reserve > free:
            return best
        best = (N, plan)
        N += step


def filled_picks(args: argparse.Namespace, shape: ModelShape, wbytes: int,
                 notes: list) -> list[tuple[int, str, Plan, str]]:
    """The random-filled cases, (N, plan name, plan, cache dtype): ``--longest``'s, each plan
    and cache dtype sized by its own cache bytes, then ``--filled``'s."""
    picks = []
    if args.longest is not None:
        for name in args.longest or args.plans:
            for kv in args.kv_dtypes:
                storage = storage_dtype(kv, args.dtype)
                found = longest(name, shape, wbytes, args.device, args.smoke, storage)
                if found:
                    picks.append((found[0], name, found[1], kv, True))
                    notes.append(f"--longest {name}{kv_suffix(kv)}: N = {found[0]}, cache "
                                 f"{cache_bytes(found[1], found[0], 1, storage, shape.head_dim) / GiB:.2f} GiB")
                else:
                    notes.append(f"--longest {name}{kv_suffix(kv)}: not even the search's first length fits")
    for N in args.filled:
        for name in args.plans:
            for kv in args.kv_dtypes:
                picks.append((N, name, plan_named(name, shape, N, args.smoke), kv, False))
    return picks


def oom_note(method: str, N: int, r: dict) -> str:
    """What an out-of-memory row ran into: the allocator's own first sentences."""
    why = " ".join(r.get("why", "").split())
    return f"{method} at N = {N}: out of memory: {why.split(' Of the allocated')[0]}"



def row(method: str, N: int, r: dict, wbytes: int, bw: float) -> str:
    if r.get("oom"):
        return f"| {N} | {method} | out of memory | | | | | | |"
    cache = r.get("cache", 0)
    kv = cache if cache else r.get("hf_kv", 0)
    floor = (wbytes + kv) / bw * 1e3
    work = (r["peak"] - wbytes - kv) / GiB
    dens = f"{r['kv_density']:.2f}" if "kv_density" in r else "1.00"
    return (f"| {N} | {method} | {dens} | {r['first_s']:.2f} | {r['step_ms']:.2f} | {r['step_ms'] / floor:.2f} | "
            f"{r['peak'] / GiB:.1f} | {kv / GiB:.1f} | {work:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[131072, 262144], help="planned lengths N (tokens)")
    ap.add_argument("--plans", nargs="+", default=["262k", "d0.25"], help="262k (shipped) and/or d<density>")
    ap.add_argument("--plans-at", nargs=2, action="append", default=[], metavar=("N", "PLANS"),
                    help="the plans (comma-separated) at length N instead of --plans, e.g. --plans-at 524288 d0.25 "
                         "('' for none: HF eager alone with --hf)")
    ap.add_argument("--hf", action="store_true", help="also HF eager sdpa at every length")
    ap.add_argument("--steps", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                    help="prefill_chunk (tokens); 0: one chunk")
    ap.add_argument("--chunks", type=int, nargs="*", default=[], help="a sweep of prefill_chunk values instead")
    ap.add_argument("--chunks-at", type=int, nargs="*", default=None,
                    help="the lengths the --chunks sweep runs at (default: all); others use --chunk")
    ap.add_argument("--filled", type=int, nargs="*", default=[], help="lengths with a random-filled cache")
    ap.add_argument("--longest", nargs="*", default=None, metavar="PLAN",
                    help="the longest context that fits (random-filled cache) for these plans (default: --plans)")
    ap.add_argument("--kv-dtypes", "--kv-dtype", nargs="+", choices=KV_CHOICES, default=["bf16"],
                    help="cache dtypes of the moa-flex cases, each case once per dtype (fp8: FP8 values + scales)")
    ap.add_argument("--warmup", type=int, default=8192, help="tokens of the warm-up request")
    ap.add_argument("--regional", choices=["on", "off"], default="on", help="moa_flex.compile(regional=...)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:  # a tiny model, lengths a CPU runs in seconds
        args.warmup, args.steps, args.lengths = 64, 4, [640]
        args.chunk, args.filled = 128, [1024] if args.filled else []
    config = llama3_8b_config(args.layers, smoke=args.smoke)
    config._attn_implementation = "sdpa"
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(config, dtype=args.dtype).eval()
    shape = ModelShape.from_config(config)
    wbytes = weight_bytes(model)
    bw = copy_bandwidth(args.device) if not args.smoke else 1e10
    lines = ["| N | method | KV density | first token (s) | decode step (ms) | x floor | peak (GiB) | cache (GiB) | "
             "work (GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = [f"weights {wbytes / GiB:.1f} GiB; copy bandwidth {bw / 1e12:.2f} TB/s"]
    if args.kv_dtypes != ["bf16"]:
        notes.append(f"moa-flex cache dtypes: {', '.join(args.kv_dtypes)} (rows without a dtype: bf16; fp8: FP8 values "
                     "with a float32 scale per token and KV head, counted in cache, floor and the --longest search)")

    def show(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    chunk = args.chunk or None
    plans_at = {int(n): [p for p in names.split(",") if p] for n, names in args.plans_at}  # "": none (--hf alone)
    for N in args.lengths:
        if args.hf:
            r = hf_case(model, N, args.steps, args.device)
            r["hf_kv"] = 2 * shape.num_layers * shape.num_kv_heads * N * shape.head_dim * 2
            show(row("HF eager sdpa", N, r, wbytes, bw))
            if r.get("oom"):
                notes.append(oom_note("HF eager sdpa", N, r))
        for name in plans_at.get(N, args.plans):
            plan = plan_named(name, shape, N, args.smoke)
            sweep = args.chunks if args.chunks and (args.chunks_at is None or N in args.chunks_at) else [chunk]
            for kv in args.kv_dtypes:
                for c in sweep:
                    r = moa_case(model, plan, N, args, c, kv=kv)
                    method = f"moa-flex {name}{kv_suffix(kv)}, chunk {c or 'none'}"
                    show(row(method, N, r, wbytes, bw))
                    if r.get("oom"):
                        notes.append(oom_note(method, N, r))
                    if r["warm_s"]:
                        notes.append(f"compile and warm-up request ({args.warmup} tokens): {r['warm_s']:.0f} s")
    step = (SMOKE_LONGEST_SEARCH if args.smoke else LONGEST_SEARCH)[1]
    reached: dict[str, dict[str, int]] = {}  # --longest: plan -> cache dtype -> the N that ran
    for N, name, plan, kv, search in filled_picks(args, shape, wbytes, notes):
        for _ in range(1 + (LONGEST_RETRIES if search else 0)):  # --longest: one step down after an out-of-memory
            tail = min(FILLED_TAIL, N // 4)
            method = f"moa-flex {name}{kv_suffix(kv)}, random K/V for {N - args.steps - tail}, prefill {tail}"
            r = moa_case(model, plan, N, args, chunk, filled=N - args.steps - tail, kv=kv)
            show(row(method, N, r, wbytes, bw))
            if not r.get("oom"):
                if search:
                    reached.setdefault(name, {})[kv] = N
                break
            notes.append(oom_note(method, N, r))
            N -= step
            plan = plan_named(name, shape, N, args.smoke)
    for name, lengths in reached.items():
        (first, n0), *others = lengths.items()
        notes += [f"--longest {name}: {kv} reaches {n / n0:.2f}x the tokens of {first}" for kv, n in others]
    text = "\n".join(lines + [""] + [f"- {n}" for n in notes])
    print(text)
    if args.record:
        caches = "" if args.kv_dtypes == ["bf16"] else f", {' and '.join(args.kv_dtypes)} caches"
        record(f"Long contexts at B=1 (Llama-3-8B shape{caches})", text, device=args.device,
               details="First token: from generate() to the first token's logits (the prefill); decode step: "
                       "median gap between tokens; work = peak - weights - cache.")


if __name__ == "__main__":
    main()
