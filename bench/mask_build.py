"""Time and peak extra memory of building a plan's BlockMask, N from 8K to 128K tokens.

    python bench/mask_build.py [--heads 32] [--device cpu|cuda] [--repeats 3] [--record]

The plan has one distinct span per query head (the worst case for sharing). Memory is the
peak growth of the process RSS on CPU (sampled by a thread every 1 ms) or the CUDA
allocator's peak on GPU. ``--record`` appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from moa_flex.masks import BLOCK_MASK_CACHE, block_mask
from moa_flex.plan import ModelShape, Plan

LENGTHS = (8192, 16384, 32768, 65536, 131072)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS growth (bytes) over a block, sampled by a background thread."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def worst_case_plan(heads: int) -> Plan:
    """One layer, `heads` query heads (8 KV heads), every head a different (alpha, beta)."""
    alphas = [[float(512 * (h - heads // 2)) for h in range(heads)]]
    betas = [[(h % 9) / 8 for h in range(heads)]]
    return Plan(ModelShape(1, heads, 8, 128, "bench"), alphas, betas, granularity="head")


def measure(plan: Plan, N: int, device: str, repeats: int) -> tuple[float, float, float]:
    """(median build seconds, peak extra bytes, block density) for one length."""
    times, peak = [], 0
    for _ in range(repeats):
        BLOCK_MASK_CACHE.clear()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            bm = block_mask(plan, 0, N, device=device)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            with PeakRSS() as rss:
                t = time.perf_counter()
                bm = block_mask(plan, 0, N, device=device)
                times.append(time.perf_counter() - t)
            peak = max(peak, rss.extra)
        density = 1 - bm.sparsity() / 100
        del bm
    BLOCK_MASK_CACHE.clear()
    return sorted(times)[len(times) // 2], peak, density


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    plan = worst_case_plan(args.heads)
    block_mask(plan, 0, 1024, device=args.device)  # warm-up: first-call overheads
    rows = []
    for N in LENGTHS:
        sec, extra, density = measure(plan, N, args.device, args.repeats)
        rows.append((N, sec, extra, density))
    lines = [
        "| N (tokens) | build (ms) | peak extra memory (MiB) | block density |",
        "|---:|---:|---:|---:|",
        *(f"| {N} | {sec * 1e3:.0f} | {extra / 2**20:.0f} | {d:.3f} |" for N, sec, extra, d in rows),
    ]
    table = "\n".join(lines)
    print(table)
    if args.record:
        # imported here, not at the top: tests/test_masks.py loads this file by path, bench/ not on sys.path
        from harness import record

        record(f"Block-mask build, H={args.heads} distinct spans, {args.device}", table, device=args.device,
               details=f"Torch threads {torch.get_num_threads()}; median of {args.repeats}.")


if __name__ == "__main__":
    main()
