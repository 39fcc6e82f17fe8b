"""Diagnostic: attention time at one length for the q/k/v layouts HF hands to attention.

    python bench/diag_attention_layout.py [--N 65536]

HF computes q/k/v as [B, N, H, D] projections transposed to [B, H, N, D] (strided, not
contiguous). Times SDPA flash (enable_gqa and repeated KV), FlexAttention on contiguous and on
HF-layout inputs, and the moa-flex op (dense plan) on HF-layout inputs; median ms. Also SDPA
with its default backend choice (what HF eager gets) and cuDNN.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from moa_flex.masks import block_mask
from moa_flex.plan import ModelShape, Plan
from moa_flex.runtime.attention import MoaRuntime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=65536)
    N = ap.parse_args().N
    H, KVH, D, dt = 32, 8, 128, torch.bfloat16
    q = torch.randn(1, N, H, D, device="cuda", dtype=dt).transpose(1, 2)
    k = torch.randn(1, N, KVH, D, device="cuda", dtype=dt).transpose(1, 2)
    v = torch.randn(1, N, KVH, D, device="cuda", dtype=dt).transpose(1, 2)
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    flex = torch.compile(flex_attention, dynamic=False)
    plan = Plan.dense(ModelShape(1, H, KVH, D))
    bm = block_mask(plan, 0, N, device="cuda")
    rt = MoaRuntime(plan)

    def flash(qq, kk, vv, gqa):  # noqa: ANN001, ANN202
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            if gqa:
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(qq, kk.repeat_interleave(4, 1), vv.repeat_interleave(4, 1), is_causal=True)

    def sdpa_backend(backends):  # noqa: ANN001, ANN202
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    cases = {
        "sdpa default backend (as HF eager), HF layout": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa cudnn, HF layout": lambda: sdpa_backend([SDPBackend.CUDNN_ATTENTION]),
        "sdpa flash, enable_gqa, HF layout": lambda: flash(q, k, v, True),
        "sdpa flash, repeated KV, HF layout": lambda: flash(q, k, v, False),
        "flex causal, contiguous": lambda: flex(qc, kc, vc, block_mask=bm, enable_gqa=True),
        "flex causal, HF layout": lambda: flex(q, k, v, block_mask=bm, enable_gqa=True),
        "moa-flex op (dense plan), HF layout": lambda: rt.attention(q, k, v, None, -1.0, 0, 0.0),
    }
    print(f"| N={N} | median ms |\n|---|---:|")
    for name, fn in cases.items():
        fn()
        print(f"| {name} | {triton.testing.do_bench(fn, warmup=25, rep=200, return_mode='median'):.2f} |")


if __name__ == "__main__":
    main()
