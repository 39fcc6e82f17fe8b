"""Several GPUs: a Llama-3-70B-shaped model over two GPUs, tensor-parallel or by layers, with
moa-flex's shipped 70B-262k plan against HF eager on the same placement.

    torchrun --nproc_per_node 2 bench/multigpu.py --placement tp [--cases 1x131072 8x32768]
             [--first-token 131072] [--steps 16] [--mode reduce-overhead] [--record]
    python bench/multigpu.py --placement layers [--gpus 2] [...]
    torchrun --nproc_per_node 2 bench/multigpu.py --placement tp --smoke   # tiny Llama on the CPU (gloo)
    python bench/multigpu.py --placement layers --smoke

The model: 80 layers, 64 query / 8 KV heads of 128, hidden 8192, MLP 28672, vocabulary 128256,
random bf16 weights (std 0.02, norms 1), built on the meta device and materialized where the
placement puts it (a 70B checkpoint of random weights would not fit the machine's disk):

* ``tp``: ``torch.distributed.tensor.parallel.parallelize_module`` with q/k/v and gate/up
  colwise (``Shard(0)``) and o/down rowwise, the sharding transformers' ``tp_plan="auto"``
  gives Llama's decoder layers (DTensor weights, local tensors between them); embeddings and LM
  head are replicated here (transformers shards them too: 2.1 GB more per GPU here). Each
  rank's ``moa_flex.compile`` runs its shard of the plan (``moa_flex/runtime/parallel.py``).
* ``layers``: decoder layers split evenly over ``--gpus`` GPUs, embeddings on the first, final
  norm and LM head on the last, dispatched by accelerate (``dispatch_model``: its
  AlignDevicesHook), which ``moa_flex.compile`` replaces by device moves
  (``moa_flex/runtime/placement.py``).

Rows, per case B x N: the caches hold N - 1 tokens of random K/V (no prefill), then
``--steps`` single-token forwards, each synchronized on every GPU and timed alone (median, the
first 3 dropped): moa-flex over a MoaCache, HF eager (sdpa) over a DynamicCache of the whole
context. First token: one forward of a random prompt of ``--first-token`` tokens (moa-flex:
prefill onto a MoaCache in ``--prefill-chunk`` chunks; HF: sdpa, ``logits_to_keep=1``), after a
short one that compiles. Peak memory: the largest ``max_memory_allocated`` over the GPUs during
the row. Out of memory: the row says so. A check line compares a dense plan's logits with the
stock model's on the same placement (64 tokens).

Floor of a decode step: ``tp``: the bytes one GPU reads (its weights but the embedding table,
of which a step reads one row per sequence, and the KV its cache keeps) over its copy bandwidth, plus the all-reduce bytes of the step (2 per layer of B x hidden
bf16 values, x 2 (n - 1) / n on the bus) over the all-reduce bus bandwidth measured in the same
run (256 MiB); ``layers``: every GPU's bytes over the copy bandwidth (the GPUs run one after
another). Bar: the TP=2 moa-flex step within 1.3x its floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import moa_flex
from decode import stock
from decode_kernel import plan_at_kv_density
from harness import LLAMA3_70B, copy_bandwidth, fill_random, record
from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime.generate import new_cache

BAR = 1.3  # TP=2 moa-flex decode step <= BAR x its floor
SHIPPED = "Llama-3-70B-Instruct-262k.moa"
SMOKE_CASES, SMOKE_FIRST = ["1x64", "2x32"], 64


def llama3_70b_config(smoke: bool) -> LlamaConfig:
    """Llama-3-70B's config (random weights); ``smoke``: a tiny Llama of the same form."""
    if smoke:
        return LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                           intermediate_size=128, vocab_size=256, max_position_embeddings=1 << 20)
    s = LLAMA3_70B
    return LlamaConfig(num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                       num_key_value_heads=s.num_kv_heads, hidden_size=s.num_heads * s.head_dim,
                       intermediate_size=28672, vocab_size=128256, max_position_embeddings=1 << 20,
                       rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)


def _init_random(model: torch.nn.Module, seed: int) -> None:
    """Weights N(0, 0.02), norms 1; replicated weights alike on every rank, shards differ by rank."""
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            gen = torch.Generator(device=local.device).manual_seed(seed + (rank + 1) * isinstance(p, DTensor))
            if "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=gen)


def _fresh_rotary(model: torch.nn.Module, config: LlamaConfig, device: torch.device | str) -> None:
    """The rotary embedding's buffers computed again (``to_empty`` leaves them uninitialized)."""
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)


def _meta_model(config: LlamaConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)


def build_tp(config: LlamaConfig, device: str) -> torch.nn.Module:
    """The model sharded over this process group's ranks (module docstring, ``tp``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _meta_model(config)
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    styles = {}
    for i in range(config.num_hidden_layers):
        styles.update({f"model.layers.{i}.self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")})
        styles.update({f"model.layers.{i}.mlp.{n}": ColwiseParallel() for n in ("gate_proj", "up_proj")})
        styles[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        styles[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, styles)
    model.to_empty(device=device)
    _init_random(model, seed=0)
    _fresh_rotary(model, config, device)
    return model.eval()


def layer_devices(config: LlamaConfig, gpus: int, device: str) -> dict[str, str]:
    """accelerate device map: layers split evenly, embeddings first, norm and LM head last."""
    names = [f"{device}:{g}" if device == "cuda" else device for g in range(gpus)]
    L = config.num_hidden_layers
    mapping = {"model.embed_tokens": names[0], "model.rotary_emb": names[0]}
    mapping.update({f"model.layers.{i}": names[i * gpus // L] for i in range(L)})
    mapping.update({"model.norm": names[-1], "lm_head": names[-1]})
    return mapping


def build_layers(config: LlamaConfig, gpus: int, device: str) -> torch.nn.Module:
    """The model's layers over ``gpus`` GPUs with accelerate's hooks (module docstring, ``layers``)."""
    from accelerate import dispatch_model

    model = _meta_model(config)
    mapping = layer_devices(config, gpus, device)
    for name, where in mapping.items():
        model.get_submodule(name).to_empty(device=where)
    _init_random(model, seed=0)
    _fresh_rotary(model, config, mapping["model.rotary_emb"])
    return dispatch_model(model.eval(), device_map=mapping, force_hooks=True)  # hooks on one device too (--smoke)


def devices_of(model: torch.nn.Module) -> list[torch.device]:
    return sorted({p.device for p in model.parameters()}, key=str)


def synchronize(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def reset_peaks(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)


def peak_gb(devices: list[torch.device]) -> float:
    """Largest max_memory_allocated over this process's GPUs and, under torchrun, every rank's."""
    peak = max((torch.cuda.max_memory_allocated(d) for d in devices if d.type == "cuda"), default=0) / 1e9
    if dist.is_initialized():
        every = [0.0] * dist.get_world_size()
        dist.all_gather_object(every, peak)
        peak = max(every)
    return peak


def step_ms(model: torch.nn.Module, cache: object, B: int, start: int, steps: int,
            devices: list[torch.device]) -> float:
    """Median ms of ``steps`` single-token forwards over ``cache`` (positions from ``start``)."""
    dev = devices[0]
    tok = torch.ones(B, 1, dtype=torch.long, device=dev)
    times = []
    with torch.no_grad():
        for t in range(steps):
            pos = torch.full((B, 1), start + t, dtype=torch.long, device=dev)
            synchronize(devices)
            t0 = time.perf_counter()
            out = model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1).to(dev)
            synchronize(devices)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[3:])


def dynamic_cache(model: torch.nn.Module, B: int, filled: int, kv_heads: int, head_dim: int) -> DynamicCache:
    """HF's cache holding ``filled`` tokens of random K/V, each layer on its layer's device."""
    cache = DynamicCache()
    for i, layer in enumerate(model.model.layers):
        w = layer.self_attn.k_proj.weight
        k = torch.randn(B, kv_heads, filled, head_dim, dtype=torch.bfloat16, device=w.device)
        cache.update(k, torch.randn_like(k), i)
    return cache


def guarded(fn: Callable[[], object]) -> object:
    """``fn()``, or the string "OOM" if a GPU ran out of memory (the row says so)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def allreduce_busbw(device: str, mib: int = 256, repeats: int = 20) -> float:
    """All-reduce bus bandwidth (bytes/s) of this process group: 2 (n - 1) / n x bytes / time."""
    n = dist.get_world_size()
    x = torch.ones(mib * 2**20 // 2, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        dist.all_reduce(x)
    times = []
    for _ in range(repeats):
        synchronize([x.device])
        t0 = time.perf_counter()
        dist.all_reduce(x)
        synchronize([x.device])
        times.append(time.perf_counter() - t0)
    return 2 * (n - 1) / n * x.numel() * 2 / statistics.median(times)


def floor_ms(placement: str, wbytes: int, kvbytes: int, bw: float, B: int, config: LlamaConfig,
             busbw: float | None) -> float:
    """The decode step's floor (module docstring): bytes per GPU over copy bandwidth, plus
    under TP the step's all-reduce bytes over the measured bus bandwidth."""
    ms = (wbytes + kvbytes) / bw * 1e3
    if placement == "tp" and busbw:
        n = dist.get_world_size()
        ms += 2 * config.num_hidden_layers * 2 * (n - 1) / n * B * config.hidden_size * 2 / busbw * 1e3
    return ms


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads in this process (a DTensor's local shard): all it holds
    but the embedding table, of which a step reads one row per sequence."""
    from torch.distributed.tensor import DTensor

    held = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
    table = model.get_input_embeddings().weight
    return held if table is model.get_output_embeddings().weight else held - table.nbytes  # tied: the LM head reads it


def moa_step(model: torch.nn.Module, B: int, N: int, steps: int, devices: list[torch.device]) -> tuple:
    cache = fill_random(new_cache(model, model.moa_flex, B, N + steps, None), N - 1)
    kv = cache.memory_bytes()
    ms = step_ms(model, cache, B, N - 1, steps, devices)
    del cache
    return ms, kv


def hf_step(model: torch.nn.Module, B: int, N: int, steps: int, devices: list[torch.device],
            kv_heads: int, head_dim: int) -> tuple:
    with stock(model) as plain:
        cache = dynamic_cache(plain, B, N - 1, kv_heads, head_dim)
        kv = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        ms = step_ms(plain, cache, B, N - 1, steps, devices)
    del cache
    return ms, kv


def first_token_s(model: torch.nn.Module, P: int, devices: list[torch.device], moa: bool) -> float:
    """Seconds of one forward over a random prompt of ``P`` tokens (moa: onto a MoaCache)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, P), generator=gen).to(devices[0])

    def run(n: int) -> float:
        with torch.no_grad():
            synchronize(devices)
            t0 = time.perf_counter()
            if moa:
                model(input_ids=ids[:, :n], past_key_values=new_cache(model, model.moa_flex, 1, n + 1, None),
                      use_cache=True, logits_to_keep=1)
            else:
                with stock(model) as plain:
                    plain(input_ids=ids[:, :n], use_cache=True, logits_to_keep=1)
            synchronize(devices)
            return time.perf_counter() - t0

    run(min(P, 2 * (model.moa_flex.prefill_chunk or P) if moa else min(P, 1024)))  # compile / warm up
    return run(P)


def check_dense(model: torch.nn.Module, plan: Plan, devices: list[torch.device]) -> str:
    """A dense plan's logits against the stock model's on this placement (64 tokens)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    ids = ids.to(devices[0])
    with torch.no_grad(), stock(model) as plain:
        want = plain(input_ids=ids).logits.float()
    model.moa_flex.set_plan(Plan.dense(model.config))
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    model.moa_flex.set_plan(plan)
    diff = float((got - want).abs().max())
    ok = diff <= 0.05 * float(want.abs().max()) + 1e-3
    return f"check: dense plan vs the stock model on this placement (64 tokens): max abs {diff:.3g} [{'pass' if ok else 'FAIL'}]"


def first_layers(plan: Plan, layers: int) -> Plan:
    """The plan's rules of its first ``layers`` layers (``--layers``)."""
    shape = dataclasses.replace(plan.model, num_layers=layers)
    return Plan(shape, plan.alpha[:layers].tolist(), plan.beta[:layers].tolist(), granularity=plan.granularity,
                sink=plan.sink, span_multiple=plan.span_multiple, min_span=plan.min_span,
                meta={**plan.meta, "layers_kept": layers})


def parse_case(text: str) -> tuple[int, int]:
    b, n = text.lower().split("x")
    return int(b), int(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--placement", choices=("tp", "layers"), required=True)
    ap.add_argument("--gpus", type=int, default=2, help="layers: GPUs to spread the layers over")
    ap.add_argument("--cases", nargs="*", default=["1x131072", "8x32768"], help="decode cases BxN")
    ap.add_argument("--first-token", type=int, default=131072, help="prompt tokens of the first-token row (0: none)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--mode", default=None, help="torch.compile mode for moa-flex (reduce-overhead: CUDA graphs)")
    ap.add_argument("--plan", default=SHIPPED, help="a shipped plan's name or a plan file")
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer decoder layers (the plan's first ones): a check of the script on one GPU")
    ap.add_argument("--no-hf", action="store_true", help="without the HF eager rows")
    ap.add_argument("--smoke", action="store_true", help="tiny Llama on the CPU: the script runs")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    distributed = args.placement == "tp"
    device = "cpu" if args.smoke else "cuda"
    if distributed:
        dist.init_process_group("gloo" if args.smoke else "nccl")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = f"cuda:{torch.cuda.current_device()}"
    rank0 = not distributed or dist.get_rank() == 0
    say = print if rank0 else (lambda *a, **k: None)
    cases = [parse_case(c) for c in (SMOKE_CASES if args.smoke else args.cases)]
    first = SMOKE_FIRST if args.smoke else args.first_token
    config = llama3_70b_config(args.smoke)
    if args.layers:
        config.num_hidden_layers = args.layers
    shape = ModelShape.from_config(config)
    plan = (plan_at_kv_density(shape, 64, 0.25) if args.smoke else
            Plan.load(args.plan) if os.path.exists(args.plan) else moa_flex.plans.load(args.plan))
    if plan.num_layers > config.num_hidden_layers:
        plan = first_layers(plan, config.num_hidden_layers)
    say(f"building the model ({args.placement}) on the meta device, then in place ...", flush=True)
    model = build_tp(config, device) if distributed else build_layers(config, args.gpus, device)
    devices = devices_of(model)
    bw = copy_bandwidth("cuda") if device != "cpu" else 1e11  # the current GPU (Timer times "cuda" by events)
    busbw = allreduce_busbw(str(devices[0])) if distributed else None
    moa_flex.compile(model, plan, mode=args.mode, prefill_chunk=args.prefill_chunk, progress=rank0,
                     backend="eager" if args.smoke else "inductor")
    checks = [check_dense(model, plan, devices)]
    model.moa_flex.warmup()  # a short request first: its prefill and decode graphs, with the first-call check
    kv_heads = model.moa_flex.plan.num_kv_heads  # this rank's (its shard under TP)
    wbytes = step_weight_bytes(model)
    rows = []
    for B, N in cases:
        methods = [("moa-flex", lambda: moa_step(model, B, N, args.steps, devices))]
        if not args.no_hf:
            methods.append(("HF eager", lambda: hf_step(model, B, N, args.steps, devices, kv_heads, shape.head_dim)))
        for method, fn in methods:
            say(f"{method}: decode steps at {B}x{N} ...", flush=True)
            reset_peaks(devices)
            got = guarded(fn)
            peak = peak_gb(devices)
            if got == "OOM":
                rows.append((method, f"{B}x{N}", "OOM", "", "", f"{peak:.1f}"))
                continue
            ms, kv = got
            floor = floor_ms(args.placement, wbytes, kv, bw, B, config, busbw)
            rows.append((method, f"{B}x{N}", f"{ms:.2f}", f"{floor:.2f}", f"{ms / floor:.2f}", f"{peak:.1f}"))
    firsts = []
    if first:
        for method, moa in [("moa-flex", True)] + ([] if args.no_hf else [("HF eager", False)]):
            say(f"{method}: first token of {first} tokens ...", flush=True)
            reset_peaks(devices)
            got = guarded(lambda: first_token_s(model, first, devices, moa))
            firsts.append((method, first, got if got == "OOM" else f"{got:.2f}", f"{peak_gb(devices):.1f}"))
    if not rank0:
        dist.destroy_process_group()
        return
    where = (f"TP={dist.get_world_size()} (torch parallelize_module, {'gloo' if args.smoke else 'NCCL'})"
             if distributed else f"layers over {len(devices)} device(s) (accelerate dispatch_model; "
             f"{len(model.moa_flex.accelerate_hooks)} hooks replaced by device moves)")
    text = [f"Placement: {where}. Model: {config.num_hidden_layers} layers. Plan: "
            f"{'random d=0.25' if args.smoke else args.plan}; "
            f"copy bandwidth {bw / 1e12:.2f} TB/s" + (f", all-reduce bus bandwidth {busbw / 1e9:.1f} GB/s" if busbw else ""),
            "", *[f"- {c}" for c in checks], "",
            "| method | B x N | step (ms) | floor (ms) | x floor | peak GB per GPU |", "|---|---|---:|---:|---:|---:|"]
    text += [f"| {' | '.join(r)} |" for r in rows]
    if firsts:
        text += ["", "| method | first-token prompt | first token (s) | peak GB per GPU |", "|---|---:|---:|---:|"]
        text += [f"| {m} | {p} | {s} | {g} |" for m, p, s, g in firsts]
    if args.placement == "tp":
        for method, case, ms, floor, ratio, _ in rows:
            if method == "moa-flex" and ratio:
                text.append(f"- bar: TP moa-flex {case} step {ms} ms = {ratio}x its floor {floor} ms: "
                            f"{'pass' if float(ratio) <= BAR else 'FAIL'} (<= {BAR}x)")
    print("\n".join(text))
    if args.record:
        record(f"Several GPUs: Llama-3-70B shape, {where}", "\n".join(text), device=devices[0])
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
