"""One decoded token per row into the ragged MoA cache, as a single Triton kernel.

``moa_flex::cache_append`` (``moa_flex/cache.py``) writes the new token's key and value into
its slot of every KV group and advances the row's length. Its torch implementation (the
twin, :func:`moa_flex.cache.cache_append_reference`) takes about fifteen small kernels per
layer; on the GPU, inside a decode step's CUDA graph, those launches cost more than the
write itself. :func:`cache_append_triton` does the same in one launch: one program per row
loads the new K and V of all groups, the groups' caps and the row's position at once, writes
K and V into each group's slot (slot map of docs/DESIGN.md, "The KV cache"), then stores
``length + 1``; no other program touches the row,
so there is no race on ``length``.

On CPU tensors the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is first imported), which is how the tests compare it with the twin.
"""

from __future__ import annotations

import contextlib

import torch

from .triton_support import interpreting, pow2, tl, triton

if triton is not None:

    @triton.jit
    def _append_kernel(
        keys_ptr, values_ptr, length_ptr, k_ptr, v_ptr, caps_ptr, offsets_ptr,
        stride_kb, stride_ks, stride_kd,
        stride_vb, stride_vs, stride_vd,
        stride_nkb, stride_nkg, stride_nkd,
        stride_nvb, stride_nvg, stride_nvd,
        stride_cb, stride_cg,
        G, sink,
        G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    ):
        """One row: all G groups at once (one [G, D] load and store each for K and V), so the
        row costs a few memory round trips, not a few per group."""
        b = tl.program_id(0)
        g = tl.arange(0, G_PAD)
        g_ok = g < G
        d = tl.arange(0, D_PAD)
        dv = tl.arange(0, DV_PAD)
        # independent of the position: issued together with the length load
        k = tl.load(k_ptr + b * stride_nkb + g[:, None] * stride_nkg + d[None, :] * stride_nkd,
                    mask=g_ok[:, None] & (d[None, :] < D))
        v = tl.load(v_ptr + b * stride_nvb + g[:, None] * stride_nvg + dv[None, :] * stride_nvd,
                    mask=g_ok[:, None] & (dv[None, :] < DV))
        cap = tl.load(caps_ptr + b * stride_cb + g * stride_cg, mask=g_ok, other=1).to(tl.int64)
        base = tl.load(offsets_ptr + g, mask=g_ok, other=0).to(tl.int64)
        p = tl.load(length_ptr + b)  # logical position of the new token
        ring = tl.maximum(cap - sink, 1)
        slot = tl.where(p < sink, p, sink + (p - sink) % ring)
        flat = base + slot  # [G_PAD], slots of the flat cache
        tl.store(keys_ptr + b * stride_kb + flat[:, None] * stride_ks + d[None, :] * stride_kd,
                 k.to(keys_ptr.dtype.element_ty), mask=g_ok[:, None] & (d[None, :] < D))
        tl.store(values_ptr + b * stride_vb + flat[:, None] * stride_vs + dv[None, :] * stride_vd,
                 v.to(values_ptr.dtype.element_ty), mask=g_ok[:, None] & (dv[None, :] < DV))
        tl.store(length_ptr + b, p + 1)


def cache_append_triton(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    caps: torch.Tensor, offsets: torch.Tensor, sink: int,
) -> None:
    """The kernel: same arguments and effect as ``moa_flex::cache_append`` (``spans`` aside).

    ``keys`` [B, S, D], ``values`` [B, S, Dv] (the layer's flat cache), ``length`` int64 [B],
    ``k_new`` [B, G, 1, D], ``v_new`` [B, G, 1, Dv], ``caps`` [B, G], ``offsets`` [G + 1].
    """
    if triton is None:
        raise RuntimeError("cache_append_triton needs triton (pip install 'moa-flex[dev]')")
    B, G = caps.shape
    if k_new.dim() != 4 or k_new.shape[:3] != (B, G, 1) or v_new.shape[:3] != (B, G, 1):
        raise ValueError(f"k_new/v_new must be [B, G, 1, D] = [{B}, {G}, 1, D], got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if keys.shape[2] != k_new.shape[3] or values.shape[2] != v_new.shape[3]:
        raise ValueError(f"head dims differ: cache {keys.shape[2]}/{values.shape[2]}, new {k_new.shape[3]}/{v_new.shape[3]}")
    if length.dtype != torch.int64 or length.shape != (B,):
        raise ValueError(f"length must be int64 [B={B}], got {length.dtype} {tuple(length.shape)}")
    if offsets.shape != (G + 1,):
        raise ValueError(f"offsets must be [G + 1 = {G + 1}], got {tuple(offsets.shape)}")
    dev = keys.device
    if any(t.device != dev for t in (values, length, k_new, v_new, caps, offsets)):
        raise ValueError("cache_append_triton: all tensors must be on one device")
    if dev.type == "cpu" and not interpreting():
        raise RuntimeError("cache_append_triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if B == 0:
        return
    D, Dv = keys.shape[2], values.shape[2]
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _append_kernel[(B,)](
            keys, values, length, k_new, v_new, caps, offsets,
            *keys.stride(), *values.stride(),
            k_new.stride(0), k_new.stride(1), k_new.stride(3),
            v_new.stride(0), v_new.stride(1), v_new.stride(3),
            *caps.stride(), G, sink,
            G_PAD=pow2(G, 1), D=D, D_PAD=pow2(D, 16), DV=Dv, DV_PAD=pow2(Dv, 16), num_warps=1,
        )
