"""Where a whole-model decode step's time goes: GPU kernels by family, gaps, host overhead.

    python bench/decode_breakdown.py [--case 4x65536] [--densities 1.0 0.25] [--generate-case 4x2048] [--record]
    python bench/decode_breakdown.py --layers 8 --densities 0.5 --generate-case "" --host-ops   # host work too

Llama-3-8B shape (32 layers, random bf16 weights), moa_flex.compile(mode="reduce-overhead").
For each plan (density 1.0 = the dense plan): a MoA cache filled with random keys and values,
a few forwards so the step is captured as a CUDA graph (moa_flex.runtime.step_graph), then

* step (sync): one forward, synchronized before and after (as bench/decode.py's "(forward)");
* replay: the captured graph replayed back to back, CUDA events around 20 replays (the GPU
  time of a step with no host gaps);
* kernels: torch.profiler over 5 replays, kernel time per step by family (the ragged decode
  kernel, moa-flex linear kernels, cuBLAS, inductor's fused kernels, the append kernel).

``--host-ops``: per plan also torch.profiler's operators by self CPU time over 6 forwards
queued back to back (the host's work per step: input preparation, the replay, its launch).

``--generate-case``: the host side of ``generate()`` over a MoA cache (a short prompt, so that
the prefill is quick): step time with a synchronizing logits processor, as bench/decode.py
times it, against the replay's GPU time, and a host timeline of each step between the
clock's synchronize, the model's forward (when the decoding loop calls it), the graph replay
call and its return (token selection, stopping criteria and the launch are what lie between).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import statistics
import sys
import time

import torch

import moa_flex
from decode import StepClock, decode_steps, random_moa_cache, weight_bytes
from decode_kernel import plan_at_kv_density
from harness import copy_bandwidth, llama3_8b_config, record
from moa_flex import MoaCache
from moa_flex.plan import ModelShape, Plan

FAMILIES = (
    ("ragged decode (partial)", ("_decode_partial",)),
    ("ragged decode (combine)", ("_decode_combine",)),
    ("cache append", ("_append",)),
    ("moa-flex linear", ("_linear_kernel", "_splitk_reduce")),
    ("cuBLAS", ("gemm", "gemv", "nvjet", "cutlass", "sm90_", "cublas")),
    ("inductor fused", ("triton_",)),
)


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def kernel_table(run, steps: int) -> tuple[dict, dict]:  # noqa: ANN001
    """Per-step kernel µs by family and the top kernels, from torch.profiler over `steps` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    fams: dict = {}
    names: dict = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = evt.device_time / steps if hasattr(evt, "device_time") else evt.cuda_time / steps
        fam = family(evt.name)
        n, t = fams.get(fam, (0, 0.0))
        fams[fam] = (n + 1 / steps, t + us)
        n, t = names.get(evt.name, (0, 0.0))
        names[evt.name] = (n + 1 / steps, t + us)
    return fams, names


def layer_timeline(run, steps: int = 3) -> list[tuple[str, float, float]]:  # noqa: ANN001
    """One decoder layer's kernels in launch order, averaged over the middle layers of
    `steps` calls: (name, mean us, mean idle gap before it in us). A layer runs from one
    ragged decode partial kernel to the next."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    starts = [i for i, k in enumerate(kernels) if "_decode_partial" in k[2]]
    segments = [kernels[a - 1:b] for a, b in zip(starts, starts[1:]) if a > 0]  # the kernel before, for the first gap
    segments = segments[2:-2] if len(segments) > 8 else segments
    width = min(len(seg) for seg in segments)
    segments = [seg for seg in segments if len(seg) == width]
    rows = []
    for pos in range(1, width):
        durs = [seg[pos][1] - seg[pos][0] for seg in segments]
        gaps = [seg[pos][0] - seg[pos - 1][1] for seg in segments]
        rows.append((segments[0][pos][2], statistics.mean(durs), statistics.mean(gaps)))
    return rows


def host_ops(model: torch.nn.Module, cache: MoaCache, B: int, start: int, steps: int = 6) -> str:
    """torch.profiler over `steps` forwards queued back to back (one synchronize at the end,
    positions from `start`): its table of operators by self CPU time, the host's work around
    the graph replay (input preparation, the replay call, cudaGraphLaunch)."""
    from torch.profiler import ProfilerActivity, profile

    tok = torch.ones(B, 1, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for t in range(steps):
            pos = torch.full((B, 1), start + t, dtype=torch.long, device="cuda")
            model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)


def replay_ms(graph: torch.cuda.CUDAGraph, n: int = 20) -> float:
    """GPU ms per replay, `n` replays queued back to back."""
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def use(model, plan: Plan) -> None:  # noqa: ANN001
    if getattr(model, "moa_flex", None) is None:
        moa_flex.compile(model, plan, mode="reduce-overhead")
    else:
        model.moa_flex.set_plan(plan)


def plan_for(shape: ModelShape, N: int, density: float) -> Plan:
    return Plan.dense(shape) if density >= 1.0 else plan_at_kv_density(shape, N, density, seed=1, alpha_fraction=0.0)


def forward_breakdown(model, shape: ModelShape, B: int, N: int, density: float, bw: float,  # noqa: ANN001
                      wbytes: int, with_host_ops: bool = False) -> tuple[int, float]:
    """Prints the step's breakdown; returns (kept KV bytes, ragged decode ms per step)."""
    plan = plan_for(shape, N, density)
    use(model, plan)
    filled = N - 64
    cache = random_moa_cache(plan, B, N, filled, torch.bfloat16, "cuda")
    sync_ms = decode_steps(model, cache, B, filled, 12, "cuda")
    graph = cache.step_graph
    if graph is None:
        raise SystemExit("no step graph was captured")
    rep = replay_ms(graph.graph)
    fams, names = kernel_table(graph.graph.replay, 5)
    kv = cache.memory_bytes()
    floor = (wbytes + kv) / bw * 1e3
    total = sum(t for _, t in fams.values()) / 1e3
    print(f"\n## {B}x{N} density {density} (kv density {plan.kv_density(N):.3f})")
    print(f"floor {floor:.2f} ms (weights {wbytes / bw * 1e3:.2f} + KV {kv / bw * 1e3:.2f}); step (sync) {sync_ms:.2f} ms; "
          f"replay {rep:.2f} ms; kernels {total:.2f} ms; gaps in the graph {rep - total:.2f} ms; "
          f"host+sync over replay {sync_ms - rep:.2f} ms")
    print("| family | kernels/step | ms/step |")
    print("|---|---:|---:|")
    for fam, (n, t) in sorted(fams.items(), key=lambda kv_: -kv_[1][1]):
        print(f"| {fam} | {n:.0f} | {t / 1e3:.3f} |")
    print("top kernels:")
    for name, (n, t) in sorted(names.items(), key=lambda kv_: -kv_[1][1])[:14]:
        print(f"  {t / 1e3:8.3f} ms  x{n:4.0f}  {t / max(n, 1):7.1f} us each  {name[:110]}")
    print("one layer's kernels in launch order (mean over the middle layers):")
    print("| kernel | us | idle before (us) |")
    print("|---|---:|---:|")
    timeline = layer_timeline(graph.graph.replay)
    for name, us, gap in timeline:
        print(f"| {name[:80]} | {us:.1f} | {gap:.1f} |")
    print(f"| layer total | {sum(r[1] + r[2] for r in timeline):.1f} | {sum(r[2] for r in timeline):.1f} |")
    attn = sum(fams.get(f, (0, 0.0))[1] for f in ("ragged decode (partial)", "ragged decode (combine)")) / 1e3
    print(f"ragged decode: {attn:.3f} ms for {kv / 2**30:.2f} GiB kept KV -> {kv / (attn * 1e-3) / 1e12:.2f} TB/s "
          f"({kv / (attn * 1e-3) / bw:.0%} of copy)")
    if with_host_ops:
        steps = 6
        print(f"host: operators by self CPU time over {steps} forwards queued back to back (totals over the {steps}; "
              "torch.profiler):")
        print(host_ops(model, cache, B, filled + 12, steps))  # after decode_steps' 12 positions
    del cache, graph
    model.moa_flex.release_cache()
    torch.cuda.empty_cache()
    return kv, attn


class HostTimeline:
    """Host timestamps around each generate() decode step: the step clock (after its
    synchronize), entry into the compiled model's forward (when the decoding loop calls it:
    it replays a captured step directly), the graph replay call, and the forward's return.
    Installed by wrapping ``moa_flex.compile``'s forward and CUDAGraph.replay."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def installed(self, model):  # noqa: ANN001, ANN201
        forward, replay = model.forward, torch.cuda.CUDAGraph.replay
        marks = self.marks

        @functools.wraps(forward)  # HF reads the forward's signature (logits_to_keep, ...)
        def timed_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            marks.append(("forward", time.perf_counter()))
            out = forward(*args, **kwargs)
            marks.append(("return", time.perf_counter()))
            return out

        def timed_replay(graph):  # noqa: ANN001, ANN202
            marks.append(("replay", time.perf_counter()))
            replay(graph)
            marks.append(("replayed", time.perf_counter()))

        model.forward, torch.cuda.CUDAGraph.replay = timed_forward, timed_replay
        try:
            yield self
        finally:
            model.forward, torch.cuda.CUDAGraph.replay = forward, replay

    def segments(self, skip: int) -> dict[str, float]:
        """Median ms of each segment between consecutive marks, over steps after the first `skip`."""
        clocks = [i for i, (name, _) in enumerate(self.marks) if name == "clock"]
        out: dict[str, list[float]] = {}
        for a, b in zip(clocks[skip:], clocks[skip + 1:]):
            part = self.marks[a:b + 1]
            for (n1, t1), (n2, t2) in zip(part, part[1:]):
                out.setdefault(f"{n1} -> {n2}", []).append((t2 - t1) * 1e3)
        return {k: statistics.median(v) for k, v in out.items()}


class TimelineClock(StepClock):
    def __init__(self, device: str, timeline: HostTimeline) -> None:
        super().__init__(device)
        self.timeline = timeline

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = super().__call__(input_ids, scores)
        self.timeline.marks.append(("clock", self.stamps[-1]))
        return out


def generate_host(model, shape: ModelShape, B: int, N: int, density: float) -> None:  # noqa: ANN001
    """Step time of generate() against the replay's GPU time, and where the host's time goes."""
    plan = plan_for(shape, N, density)
    use(model, plan)
    steps = 48
    ids = torch.randint(1, model.config.vocab_size, (B, N - steps), device="cuda")
    print(f"\n## generate() host side, {B}x{N} density {density}, {steps} greedy steps, as bench/decode.py runs it")
    print("(segments between host timestamps, median ms: the step clock after its synchronize, entry into the "
          "model's forward when the decoding loop calls it, the graph replay call and its return)")
    for run in range(3):
        timeline = HostTimeline()
        clock = TimelineClock("cuda", timeline)
        with torch.no_grad(), timeline.installed(model):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False, logits_processor=[clock], pad_token_id=0)
        step = clock.step_ms(skip=6)
        rep = replay_ms(model.moa_flex.cache.step_graph.graph)
        seg = timeline.segments(skip=6)
        if run == 0:
            print("| run | step (ms) | replay (ms) | host gap (ms) | " + " | ".join(seg) + " |")
            print("|---|---:|---:|---:|" + "---:|" * len(seg))
        print(f"| {run} | {step:.3f} | {rep:.3f} | {step - rep:.3f} | " + " | ".join(f"{v:.3f}" for v in seg.values()) + " |")
    model.moa_flex.release_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="4x65536")
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--generate-case", default="4x2048")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--host-ops", action="store_true",
                    help="also torch.profiler's operators by self CPU time over a few forwards per plan (host work)")
    ap.add_argument("--record", action="store_true", help="append what it prints to bench/RESULTS.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode_breakdown.py needs a GPU")
    printed = io.StringIO()
    with contextlib.redirect_stdout(Tee(sys.stdout, printed)):
        run(args)
    if args.record:
        record("Decode step breakdown (bench/decode_breakdown.py)", f"```\n{printed.getvalue().strip()}\n```",
               device="cuda", details="Kernel times from torch.profiler over 5 replays of the captured step; replay = "
               "GPU time of a step with no host gap; step (sync) = one forward, synchronized before and after. "
               "The script's output:")


class Tee(io.TextIOBase):
    """Writes to several text streams."""

    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def run(args: argparse.Namespace) -> None:
    from transformers import LlamaForCausalLM

    config = llama3_8b_config(args.layers, False)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    shape = ModelShape.from_config(config)
    bw = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    B, N = (int(x) for x in args.case.split("x"))
    t0 = time.perf_counter()
    attention = []
    for d in args.densities:
        attention.append(forward_breakdown(model, shape, B, N, d, bw, weight_bytes(model), args.host_ops))
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if len(attention) >= 2:  # ragged decode per layer = kept bytes / R + F, fitted on the two extremes
        (b1, t1), (b2, t2) = max(attention), min(attention)
        layers = shape.num_layers
        rate = (b1 - b2) / layers / ((t1 - t2) / layers * 1e-3)
        fixed = (t2 / layers * 1e-3 - b2 / layers / rate) * 1e6
        print(f"\nragged decode per layer = kept KV bytes / {rate / 1e12:.2f} TB/s + {fixed:.1f} us "
              f"(fitted on densities {max(args.densities)} and {min(args.densities)}: the fixed part is paid at "
              f"every density, {fixed * layers / 1e3:.2f} ms per step)")
    if args.generate_case:
        gB, gN = (int(x) for x in args.generate_case.split("x"))
        generate_host(model, shape, gB, gN, args.densities[-1])
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
