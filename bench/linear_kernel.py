"""Skinny linear kernels against cuBLAS at decode batch sizes (Llama-3-8B projections, bf16).

    python bench/linear_kernel.py [--ms 1 4 8 16 32 85] [--repeats 50] [--record]
    python bench/linear_kernel.py --sweep      # also a grid of (block_n, split_k) per launch
    TRITON_INTERPRET=1 python bench/linear_kernel.py --smoke   # tiny shapes, CPU interpreter: checks the script

One decoder layer of Llama-3-8B (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336): the
projections q, k, v [4096|1024|1024, 4096], o [4096, 4096], gate, up [14336, 4096] and down
[4096, 14336], 436 MB of bf16 weights, at M tokens per step. Per layer part three methods:

* (a) cuBLAS per projection: ``F.linear`` per weight (gate/up followed by ``silu * mul``);
* (b) cuBLAS on concatenated weights: qkv as one [6144, 4096], gate_up as one [28672, 4096]
  followed by ``silu(y[:, :N]) * y[:, N:]`` (o and down: as (a));
* (c) moa-flex: ``grouped_linear_triton`` (qkv in one launch; o and down alone) and
  ``gated_mlp_triton`` (gate, up and the activation in one launch), tiles from
  ``linear_config`` unless overridden on the command line.

Timing as bench/decode_kernel.py (harness.Timer): each call is captured in a CUDA graph and
replayed, a 256 MiB buffer is read before every replay (L2 flushed, clean: the weights come from
HBM), CUDA events around the replay, median of ``--repeats``. Bandwidth = weight bytes / time,
and its share of the copy bandwidth measured in the same run (harness.copy_bandwidth: read +
write of a ``--copy-gib`` GiB ``copy_``, 4 GiB by default).
Before timing, every (M, part) of (c) is checked against the fp32 twin on the GPU (and
cuBLAS too, for scale), and a captured graph is replayed on new inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from harness import COPY_GIB, Timer, copy_bandwidth, record
from moa_flex.kernels import linear
from moa_flex.kernels.triton_support import sm_count as _sm_count
from moa_flex.kernels.linear import (
    LinearConfig,
    gated_mlp_reference,
    gated_mlp_triton,
    grouped_linear_reference,
    grouped_linear_triton,
    linear_config,
)

LLAMA = {"hidden": 4096, "q": 4096, "kv": 1024, "mlp": 14336}
SMOKE = {"hidden": 64, "q": 64, "kv": 16, "mlp": 96}
PROJECTIONS = {  # name: (output dim key, input dim key)
    "q": ("q", "hidden"), "k": ("kv", "hidden"), "v": ("kv", "hidden"), "o": ("hidden", "q"),
    "gate": ("mlp", "hidden"), "up": ("mlp", "hidden"), "down": ("hidden", "mlp"),
}
PARTS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
SWEEP_BLOCK_N = (32, 64, 128)
SWEEP_SPLIT_K = (1, 2, 4, 8)


# ---------------------------------------------------------------------------------- set-up
def make_weights(dims: dict, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's weights [out, in] (scaled by in^-0.5, outputs O(1)) and the concatenated qkv, gate_up."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = {}
    for name, (n, k) in PROJECTIONS.items():
        w[name] = (torch.randn(dims[n], dims[k], generator=gen, device=device) * dims[k] ** -0.5).to(dtype)
    w["qkv"] = torch.cat([w["q"], w["k"], w["v"]])
    w["gate_up"] = torch.cat([w["gate"], w["up"]])
    return w


def part_input(part: str, M: int, dims: dict, device: str, dtype: torch.dtype) -> torch.Tensor:
    """x [M, in] of a part: the hidden state, the attention output (o) or the MLP activation (down)."""
    k = PROJECTIONS[PARTS[part][0]][1]
    return torch.randn(M, dims[k], device=device, dtype=dtype)


def part_widths(part: str, w: dict) -> list[int]:
    """Output columns per launch of a part (a gated pair counts once)."""
    names = PARTS[part][:1] if part == "gate_up" else PARTS[part]
    return [w[n].shape[0] for n in names]


def config(x: torch.Tensor, widths: list[int], gated: bool, tuning: dict) -> LinearConfig:
    """The kernel's tiles: the rule, with the command line's block_n/split_k/... overrides."""
    fixed = {k: tuning[k] for k in ("block_n", "split_k") if k in tuning}
    cfg = linear_config(x.shape[0], widths, x.shape[1], x.dtype, _sm_count(x.device), gated, **fixed)
    return dataclasses.replace(cfg, **{k: v for k, v in tuning.items() if k not in fixed})


def part_config(part: str, x: torch.Tensor, w: dict, tuning: dict) -> LinearConfig:
    return config(x, part_widths(part, w), part == "gate_up", tuning)


def methods(part: str, x: torch.Tensor, w: dict, cfg: LinearConfig) -> dict[str, Callable[[], object]]:
    """(a) cuBLAS per projection, (b) cuBLAS concatenated (qkv, gate_up only), (c) moa-flex."""
    names = PARTS[part]
    if part == "gate_up":
        n = w["gate"].shape[0]

        def cat() -> torch.Tensor:
            y = F.linear(x, w["gate_up"])
            return F.silu(y[:, :n]) * y[:, n:]

        return {
            "a": lambda: F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]),
            "b": cat,
            "c": lambda: gated_mlp_triton(x, w["gate"], w["up"], config=cfg),
        }
    out = {"a": lambda: [F.linear(x, w[k]) for k in names]}
    if part == "qkv":
        out["b"] = lambda: F.linear(x, w["qkv"])
    out["c"] = lambda: grouped_linear_triton(x, [w[k] for k in names], config=cfg)
    return out


def part_bytes(part: str, w: dict) -> int:
    return sum(w[k].numel() * w[k].element_size() for k in PARTS[part])


# ---------------------------------------------------------------------------------- checks
def twin(part: str, x: torch.Tensor, w: dict) -> list[torch.Tensor]:
    if part == "gate_up":
        return [gated_mlp_reference(x, w["gate"], w["up"])]
    return grouped_linear_reference(x, [w[k] for k in PARTS[part]])


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Max abs error over the output scale (max |want|, at least 1), over a part's outputs."""
    err = 0.0
    for g, r in zip(got, want):
        scale = max(1.0, r.float().abs().max().item())
        err = max(err, (g.float() - r.float()).abs().max().item() / scale)
    return err


def as_list(y: object) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (list, tuple)) else [y]


def check_against_twin(ms: list[int], dims: dict, w: dict, dev: str, tuning: dict) -> list[str]:
    """Per (M, part): moa-flex and cuBLAS per projection vs the fp32 twin, relative max error."""
    lines = []
    for M in ms:
        errs = []
        for part in PARTS:
            x = part_input(part, M, dims, dev, w["q"].dtype)
            fns = methods(part, x, w, part_config(part, x, w, tuning))
            want = twin(part, x, w)
            errs.append((part, rel_error(as_list(fns["c"]()), want), rel_error(as_list(fns["a"]()), want)))
        ok = all(e <= 2e-2 for _, e, _ in errs)
        text = ", ".join(f"{p} {e:.1e} (cuBLAS {c:.1e})" for p, e, c in errs)
        lines.append(f"M={M} vs fp32 twin, max abs error / output scale: {text} [{'pass' if ok else 'FAIL'}]")
    return lines


def check_graph_replay(dims: dict, w: dict, dev: str) -> str:
    """Capture the ops once at M=8 (split and unsplit launches), replay on new x: outputs follow."""
    x = part_input("qkv", 8, dims, dev, w["q"].dtype)
    xd = part_input("down", 8, dims, dev, w["q"].dtype)

    def step() -> list[torch.Tensor]:
        q, k, v = torch.ops.moa_flex.grouped_linear(x, [w["q"], w["k"], w["v"]])
        return [q, k, v, torch.ops.moa_flex.gated_mlp(x, w["gate"], w["up"]), *torch.ops.moa_flex.grouped_linear(xd, [w["down"]])]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    x.copy_(torch.randn_like(x))
    xd.copy_(torch.randn_like(xd))
    g.replay()
    torch.cuda.synchronize()
    want = twin("qkv", x, w) + twin("gate_up", x, w) + twin("down", xd, w)
    err = rel_error(outs, want)
    return f"CUDA-graph replay on new x (qkv, gate_up, down at M=8): max error / scale {err:.1e} [{'pass' if err <= 2e-2 else 'FAIL'}]"


# ---------------------------------------------------------------------------------- bench
def bench_projections(args: argparse.Namespace, w: dict, timer: Timer) -> list[dict]:
    """Each projection alone: cuBLAS F.linear vs the kernel with one weight."""
    rows = []
    for M in args.ms:
        for name, (_, k) in PROJECTIONS.items():
            x = torch.randn(M, args.dims[k], device=args.device, dtype=args.dtype)
            cfg = config(x, [w[name].shape[0]], False, args.tuning)
            t_a, _ = timer(lambda: F.linear(x, w[name]))
            t_c, mode = timer(lambda: grouped_linear_triton(x, [w[name]], config=cfg))
            rows.append({"M": M, "name": name, "shape": tuple(w[name].shape), "bytes": w[name].numel() * w[name].element_size(),
                         "a": t_a, "c": t_c, "mode": mode, "cfg": cfg})
    return rows


def bench_parts(args: argparse.Namespace, w: dict, timer: Timer) -> list[dict]:
    """Each layer part with methods (a), (b), (c), then the layer total per method."""
    rows = []
    for M in args.ms:
        total = {"M": M, "part": "layer", "bytes": 0, "a": 0.0, "b": 0.0, "c": 0.0, "cfg": None}
        for part in PARTS:
            x = part_input(part, M, args.dims, args.device, args.dtype)
            cfg = part_config(part, x, w, args.tuning)
            row = {"M": M, "part": part, "bytes": part_bytes(part, w), "cfg": cfg}
            for key, fn in methods(part, x, w, cfg).items():
                row[key], _ = timer(fn)
            row.setdefault("b", row["a"])  # o, down: nothing to concatenate
            rows.append(row)
            for key in ("bytes", "a", "b", "c"):
                total[key] += row[key]
        rows.append(total)
    return rows


def sweep(args: argparse.Namespace, w: dict, timer: Timer) -> list[dict]:
    """Per (M, part): the rule's tiles vs the best of a (block_n, split_k) grid."""
    rows = []
    for M in args.ms:
        for part in PARTS:
            x = part_input(part, M, args.dims, args.device, args.dtype)
            rule = part_config(part, x, w, {})
            t_rule, _ = timer(methods(part, x, w, rule)["c"])
            best = (t_rule, rule)
            for bn in SWEEP_BLOCK_N:
                for split in SWEEP_SPLIT_K:
                    cfg = part_config(part, x, w, {"block_n": bn, "split_k": split})
                    if cfg == rule or -(-x.shape[1] // linear._k_chunk(x.shape[1], split, cfg.block_k)) != split:
                        continue  # the rule's own, or a split that the K chunking rounds to another
                    t, _ = timer(methods(part, x, w, cfg)["c"])
                    best = min(best, (t, cfg), key=lambda b: b[0])
            rows.append({"M": M, "part": part, "bytes": part_bytes(part, w), "rule": t_rule, "rule_cfg": rule,
                         "best": best[0], "best_cfg": best[1]})
    return rows


# ---------------------------------------------------------------------------------- tables
def tiles(cfg: LinearConfig | None) -> str:
    if cfg is None:
        return ""
    return f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}"


def bw(nbytes: int, ms: float, copy_bw: float) -> str:
    """'TB/s (% of copy bandwidth)' of reading nbytes in ms."""
    rate = nbytes / (ms * 1e-3)
    return f"{rate / 1e12:.2f} ({100 * rate / copy_bw:.0f}%)"


def projection_table(rows: list[dict], copy_bw: float) -> str:
    lines = [
        "| M | projection | [N, K] | cuBLAS (µs) | cuBLAS TB/s (% copy) | moa-flex (µs) | moa-flex TB/s (% copy) | speed-up | tiles |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['M']} | {r['name']} | {list(r['shape'])} | {1e3 * r['a']:.1f} | {bw(r['bytes'], r['a'], copy_bw)} | "
            f"{1e3 * r['c']:.1f} | {bw(r['bytes'], r['c'], copy_bw)} | {r['a'] / r['c']:.2f} | {tiles(r['cfg'])} |"
        )
    return "\n".join(lines)


def part_table(rows: list[dict], copy_bw: float) -> str:
    lines = [
        "| M | part | MB | (a) cuBLAS per proj. µs | TB/s (% copy) | (b) cuBLAS concat. µs | TB/s (% copy) | "
        "(c) moa-flex µs | TB/s (% copy) | (c) vs (a) | (c) vs (b) | tiles |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{1e3 * r[k]:.1f} | {bw(r['bytes'], r[k], copy_bw)}" for k in ("a", "b", "c"))
        lines.append(
            f"| {r['M']} | {r['part']} | {r['bytes'] / 1e6:.0f} | {cells} | {r['a'] / r['c']:.2f} | "
            f"{r['b'] / r['c']:.2f} | {tiles(r['cfg'])} |"
        )
    return "\n".join(lines)


def sweep_table(rows: list[dict], copy_bw: float) -> str:
    lines = [
        "| M | part | rule µs | rule TB/s (% copy) | rule tiles | best µs | best TB/s (% copy) | best tiles |",
        "|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['M']} | {r['part']} | {1e3 * r['rule']:.1f} | {bw(r['bytes'], r['rule'], copy_bw)} | {tiles(r['rule_cfg'])} | "
            f"{1e3 * r['best']:.1f} | {bw(r['bytes'], r['best'], copy_bw)} | {tiles(r['best_cfg'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 4, 8, 16, 32, 85], help="tokens per step")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--copy-gib", type=float, default=COPY_GIB, help="copy bandwidth buffer (GiB)")
    ap.add_argument("--block-n", type=int, default=None, help="kernel: output columns per program (default: the rule)")
    ap.add_argument("--split-k", type=int, default=None, help="kernel: K splits (default: the rule)")
    ap.add_argument("--block-k", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--sweep", action="store_true", help="also time a (block_n, split_k) grid per (M, part)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args()
    names = {"block_n": args.block_n, "split_k": args.split_k, "block_k": args.block_k,
             "num_warps": args.num_warps, "num_stages": args.num_stages}
    args.tuning = {k: v for k, v in names.items() if v is not None}
    args.dtype = torch.bfloat16
    if args.smoke:
        if not linear.interpreting():
            sys.exit("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        args.device, args.dims, args.ms, args.repeats, args.copy_gib = "cpu", SMOKE, [1, 5], 2, 0.01
    elif not torch.cuda.is_available():
        sys.exit("bench/linear_kernel.py needs a CUDA GPU (TRITON_INTERPRET=1 ... --smoke checks the script on the CPU)")
    else:
        args.device, args.dims = "cuda", LLAMA
    start = time.perf_counter()
    w = make_weights(args.dims, args.device, args.dtype)
    checks = check_against_twin(args.ms, args.dims, w, args.device, args.tuning)
    if args.device == "cuda":
        checks.append(check_graph_replay(args.dims, w, args.device))
    for line in checks:
        print("check:", line)

    timer = Timer(args.device, args.repeats)
    copy_bw = copy_bandwidth(args.device, args.copy_gib, args.repeats)
    print(f"copy bandwidth: {copy_bw / 1e12:.2f} TB/s")
    tables = [
        "Layer parts (weights read from HBM; 'layer' is the sum of the four parts):\n\n"
        + part_table(bench_parts(args, w, timer), copy_bw),
        "Each projection alone (moa-flex: the kernel with one weight):\n\n"
        + projection_table(bench_projections(args, w, timer), copy_bw),
    ]
    if args.sweep:
        tables.append("Tile sweep, moa-flex: the rule vs the best (block_n, split_k) of the grid:\n\n"
                      + sweep_table(sweep(args, w, timer), copy_bw))
    for text in tables:
        print("\n" + text)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")

    if args.record:
        tuning = ", ".join(f"{k}={v}" for k, v in args.tuning.items()) or "the rule (linear_config)"
        record(
            "Skinny linear kernels vs cuBLAS at decode batch sizes (Llama-3-8B projections, bf16)",
            "\n".join([*[f"- check: {c}" for c in checks], "", "\n\n".join(tables)]),
            device=args.device,
            details=("Smoke run: tiny shapes on the CPU, Triton's interpreter. " if args.smoke else "")
            + f"Median of {args.repeats}, L2 flushed by a read, CUDA-graph replay. Copy bandwidth {copy_bw / 1e12:.2f} TB/s "
            f"({args.copy_gib:g} GiB). Kernel tiles: {tuning}; tiles column: "
            "m/n/k = block_m/n/k, s = K splits, w = warps, st = pipeline stages.",
        )


if __name__ == "__main__":
    main()
