"""Start-up: where the first request of a fresh process spends its time, cold and warm.

    python bench/startup.py                                  # CPU: 2 and 16 layers (8 heads, hidden 128), cold + warm
    python bench/startup.py --layers 2 16 --prompt 300 --new 8
    python bench/startup.py --device cuda --llama3-8b --batch 4 --prompt 65536 --new 24 --mode reduce-overhead
    python bench/startup.py --smoke                          # one tiny cold+warm pair (checks the script)

Each case runs in a fresh Python process (``--child``) so nothing of an earlier compile is
in memory. "cold": the process gets an empty compile-cache folder (``MOA_FLEX_CACHE_DIR``,
which moa-flex points inductor's and Triton's caches at; see docs/DESIGN.md "Start-up");
"warm": a second process with the folder the cold run filled. The child times import,
model build, ``moa_flex.compile`` and the first ``generate`` (to its first token and to its
end), then a second identical ``generate`` (the work alone, no compile). The compile phases
come from torch's own compilation metrics (``torch._dynamo.utils.get_compilation_metrics``),
summed over frames: Dynamo tracing, AOTAutograd, inductor (of which code generation and
Triton compilation), CUDA-graph capture and autotuning, with FX-graph cache hits / misses.
Graphs compiled through AOT precompile (the compile cache's default, docs/DESIGN.md
"Start-up") are not in those metrics: "traced" sums moa-flex's own "traced ... in s" lines,
and "graphs read" counts the precompiled graphs a warm process read instead of tracing.
"Start-up" = first request - second request: what compiling costs on top of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()  # before torch is imported: import time counts

PHASES = (  # (column, CompilationMetrics field, scale to seconds)
    ("dynamo", "dynamo_cumulative_compile_time_us", 1e-6),
    ("aot", "aot_autograd_cumulative_compile_time_us", 1e-6),
    ("inductor", "inductor_cumulative_compile_time_us", 1e-6),
    ("codegen", "inductor_code_gen_cumulative_compile_time_us", 1e-6),
    ("triton", "triton_compile_time_us", 1e-6),
    ("cudagraph", "runtime_cudagraphify_time_us", 1e-6),
    ("autotune", "runtime_triton_autotune_time_us", 1e-6),
)


def child(args: argparse.Namespace) -> dict:
    """One fresh process: the timings of its first and second request (seconds)."""
    import torch
    from torch._dynamo.utils import get_compilation_metrics
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    import moa_flex
    from decode import StepClock
    from harness import llama3_8b_config

    out = {"import_s": time.perf_counter() - T0}
    t = time.perf_counter()
    if args.llama3_8b:
        config = llama3_8b_config(32)
    else:
        config = LlamaConfig(num_hidden_layers=args.layers[0], num_attention_heads=args.heads,
                             num_key_value_heads=args.heads, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             vocab_size=1024, max_position_embeddings=max(4096, args.prompt + args.new))
    config.num_hidden_layers = args.layers[0]
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    plan = moa_flex.Plan.uniform(config, alpha=64, beta=args.beta) if args.beta < 1 else moa_flex.Plan.dense(config)
    out["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    moa_flex.compile(model, plan, mode=args.mode, max_length=args.prompt + args.new, regional=args.regional[0] == "on")
    out["compile_call_s"] = time.perf_counter() - t
    ids = torch.randint(1, config.vocab_size, (args.batch, args.prompt), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(1))

    def request() -> tuple[float, float]:
        clock = StepClock(args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False, pad_token_id=0,
                           logits_processor=LogitsProcessorList([clock]))
        return clock.stamps[0] - t0, clock.stamps[-1] - t0

    out["first_token_s"], out["first_request_s"] = request()
    for field, key, scale in PHASES:
        out[field + "_s"] = sum((getattr(m, key, None) or 0) * scale for m in get_compilation_metrics())
    out["fx_cache_hits"] = sum(getattr(m, "inductor_fx_local_cache_hit_count", 0) or 0 for m in get_compilation_metrics())
    out["fx_cache_misses"] = sum(getattr(m, "inductor_fx_local_cache_miss_count", 0) or 0
                                 for m in get_compilation_metrics())
    out["frames"] = len(get_compilation_metrics())
    # AOT precompile's tracing is not in torch's compilation metrics: moa-flex's own phase lines say it
    lines = model.moa_flex.log.lines
    out["traced_s"] = sum(float(m.group(1)) for m in (re.search(r"traced \d+ nodes in ([0-9.]+) s", x) for x in lines) if m)
    out["graphs_read"] = sum(getattr(g, "loaded", 0) for g in (model.moa_flex.compiled_forward, model.moa_flex.compiled_decode))
    out["second_token_s"], out["second_request_s"] = request()
    return out


def run_child(args: argparse.Namespace, layers: int, cache_dir: str, regional: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--layers", str(layers), "--regional", regional, "--heads", str(args.heads), "--hidden",
           str(args.hidden), "--prompt", str(args.prompt), "--new", str(args.new), "--batch", str(args.batch),
           "--device", args.device, "--beta", str(args.beta)]
    cmd += ["--mode", args.mode] if args.mode else []
    cmd += ["--llama3-8b"] if args.llama3_8b else []
    env = {**os.environ, "MOA_FLEX_CACHE_DIR": cache_dir, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "inductor"),
           "TRITON_CACHE_DIR": os.path.join(cache_dir, "triton")}
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"child failed ({done.returncode}): {' '.join(cmd)}")
    if args.verbose:
        sys.stderr.write(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=300, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=8, help="generated tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.5, help="uniform plan alpha 64 + beta N; 1: dense plan")
    ap.add_argument("--mode", default=None, help="inductor mode (reduce-overhead: CUDA graphs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--llama3-8b", action="store_true", help="Llama-3-8B shape (--layers still sets the depth)")
    ap.add_argument("--smoke", action="store_true", help="2 layers, 40-token prompt: the script runs")
    ap.add_argument("--regional", nargs="+", default=["on"], choices=["on", "off"],
                    help="moa_flex.compile(regional=...): on (one compile per distinct layer), off (whole graphs), or both")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show the children's stderr (moa-flex's progress lines)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.smoke:
        args.layers, args.prompt, args.new = [2], 40, 4
    cols = ["import", "compile_call", "first_token", "first_request", "second_token", "second_request", "traced", "dynamo", "aot",
            "inductor", "codegen", "triton", "cudagraph", "autotune"]
    lines = ["| layers | regional | caches | " + " | ".join(c.replace("_", " ") + " (s)" for c in cols)
             + " | start-up (s) | FX cache hit/miss | graphs read |", "|---|---|---|" + "---:|" * (len(cols) + 3)]
    rows, notes = {}, []
    for regional in args.regional:
        for layers in args.layers:
            with tempfile.TemporaryDirectory(prefix="moa-flex-startup-") as cache_dir:
                for which in ("cold", "warm"):
                    r = run_child(args, layers, cache_dir, regional)
                    rows[layers, regional, which] = r
                    start = r["first_request_s"] - r["second_request_s"]
                    lines.append(f"| {layers} | {regional} | {which} | " + " | ".join(f"{r[c + '_s']:.1f}" for c in cols)
                                 + f" | {start:.1f} | {r['fx_cache_hits']}/{r['fx_cache_misses']} | {r['graphs_read']} |")
                    print(lines[-1], flush=True)
                    # the start-up bars: from moa_flex.compile to the first token, less the prefill's own time
                    # (the second request's first token: the same prefill with nothing left to compile)
                    first = r["compile_call_s"] + r["first_token_s"]
                    notes.append(f"{layers} layers, regional {regional}, {which}: moa_flex.compile to the first token "
                                 f"{first:.1f} s = the prefill's own {r['second_token_s']:.1f} s + "
                                 f"{first - r['second_token_s']:.1f} s")
    def to_first(r: dict) -> float:  # the bars' measure: moa_flex.compile (which settles the CPU's ISA probe) to the first token
        return r["compile_call_s"] + r["first_token_s"]

    for regional in args.regional:
        if len(args.layers) >= 2:
            lo, hi = min(args.layers), max(args.layers)
            notes.append(f"regional {regional}: compile to the first token, cold: {hi} layers / {lo} layers = "
                         f"{to_first(rows[hi, regional, 'cold']) / to_first(rows[lo, regional, 'cold']):.2f}x")
        for layers in args.layers:
            notes.append(f"regional {regional}, {layers} layers: compile to the first token, warm / cold = "
                         f"{to_first(rows[layers, regional, 'warm']) / to_first(rows[layers, regional, 'cold']):.2f}x")
    text = "\n".join(lines + [""] + [f"- {n}" for n in notes])
    print(text)
    if args.record:
        from harness import record
        record("Start-up: the first request of a fresh process", text, device=args.device,
               details=f"Llama shape, {'Llama-3-8B' if args.llama3_8b else f'{args.heads} heads, hidden {args.hidden}'}; "
                       f"B={args.batch}, prompt {args.prompt}, {args.new} new tokens, mode {args.mode}; each row one "
                       "fresh process; cold = empty MOA_FLEX_CACHE_DIR, warm = the folder the cold run filled.")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
