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

An FP8 cache (``keys.dtype`` float8_e4m3fn) is quantized on write, per token and group, into
the same bits as :func:`moa_flex.kernels.quant.quantize_fp8` (the scale by the same float32
multiplication, the quotient by round-to-nearest division), and the scales go to
``k_scale``/``v_scale`` [B, S].

On CPU tensors the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is first imported), which is how the tests compare it with the twin.
"""

from __future__ import annotations

import contextlib

import torch

from .quant import FP8_MAX, INV_FP8_MAX, SCALE_DTYPE, SCALE_MIN, is_quantized
from .triton_support import interpreting, pow2, tl, triton

if triton is not None:
    _FP8_MAX = tl.constexpr(FP8_MAX)
    _INV_FP8_MAX = tl.constexpr(INV_FP8_MAX)
    _SCALE_MIN = tl.constexpr(SCALE_MIN)

    @triton.jit
    def _quantize(x, ok, QUANT: tl.constexpr):
        """(values to store, scale) of [G, D] vectors ``x``: as quantize_fp8 (QUANT), else (x, 1).
        One return: Triton's compiler (3.6) also generates a return that follows a taken constexpr
        branch's return, and refuses returns of different types; its interpreter does not."""
        if QUANT:
            amax = tl.max(tl.where(ok, tl.abs(x.to(tl.float32)), 0.0), axis=1)
            scale = amax * _INV_FP8_MAX
            scale = tl.where(scale >= _SCALE_MIN, scale, 1.0)
            y = tl.math.div_rn(x.to(tl.float32), scale[:, None])
            out = _round_e4m3(tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX))
        else:
            out = x
            scale = tl.full([x.shape[0]], 1.0, tl.float32)
        return out, scale

    @triton.jit
    def _round_e4m3(y):
        """``y`` (float32, |y| <= 448) rounded to nearest even on the e4m3 grid, still float32,
        so the cast to FP8 that follows is exact. The GPU's conversion rounds the same way
        itself; Triton's interpreter (how CI runs this kernel) does not when the rounding
        carries into the exponent (124.7 becomes 64), so the kernel rounds first everywhere."""
        e = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # exponent; subnormals: -6
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # grid spacing 2^(e-3): 3 mantissa bits
        inv = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
        t = y * inv  # exact (a power of two), |t| <= 16
        r = ((t + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: float32 addition rounds t to an integer, ties even
        return tl.where(r == 0.0, y * 0.0, r)  # a zero keeps y's sign, as the cast does (-0 is code 128)

    @triton.jit
    def _append_kernel(
        keys_ptr, values_ptr, length_ptr, k_ptr, v_ptr, caps_ptr, offsets_ptr, ks_ptr, vs_ptr,
        stride_kb, stride_ks, stride_kd,
        stride_vb, stride_vs, stride_vd,
        stride_nkb, stride_nkg, stride_nkd,
        stride_nvb, stride_nvg, stride_nvd,
        stride_cb, stride_cg, stride_ksb, stride_vsb,
        G, sink,
        G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        QUANT: tl.constexpr,
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
        k_ok = g_ok[:, None] & (d[None, :] < D)
        v_ok = g_ok[:, None] & (dv[None, :] < DV)
        k, k_scale = _quantize(k, k_ok, QUANT)
        v, v_scale = _quantize(v, v_ok, QUANT)
        if QUANT:
            tl.store(ks_ptr + b * stride_ksb + flat, k_scale, mask=g_ok)
            tl.store(vs_ptr + b * stride_vsb + flat, v_scale, mask=g_ok)
        tl.store(keys_ptr + b * stride_kb + flat[:, None] * stride_ks + d[None, :] * stride_kd,
                 k.to(keys_ptr.dtype.element_ty), mask=g_ok[:, None] & (d[None, :] < D))
        tl.store(values_ptr + b * stride_vb + flat[:, None] * stride_vs + dv[None, :] * stride_vd,
                 v.to(values_ptr.dtype.element_ty), mask=g_ok[:, None] & (dv[None, :] < DV))
        tl.store(length_ptr + b, p + 1)


def cache_append_triton(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    caps: torch.Tensor, offsets: torch.Tensor, sink: int,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """The kernel: same arguments and effect as ``moa_flex::cache_append`` (``spans`` aside).

    ``keys`` [B, S, D], ``values`` [B, S, Dv] (the layer's flat cache), ``length`` int64 [B],
    ``k_new`` [B, G, 1, D], ``v_new`` [B, G, 1, Dv], ``caps`` [B, G], ``offsets`` [G + 1];
    an FP8 cache also ``k_scale``/``v_scale`` float32 [B, S] (contiguous slots).
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
    quant = is_quantized(keys.dtype)
    if quant != is_quantized(values.dtype):
        raise ValueError(f"keys and values must both be FP8 or neither, got {keys.dtype} and {values.dtype}")
    if quant:
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            if t is None or t.shape != keys.shape[:2] or t.dtype != SCALE_DTYPE or t.stride(1) != 1 or t.device != dev:
                raise ValueError(f"an FP8 cache needs {name} float32 [B, S] = {list(keys.shape[:2])} with unit slot "
                                 f"stride on {dev}, got {None if t is None else (t.dtype, tuple(t.shape), t.stride())}")
    if B == 0:
        return
    D, Dv = keys.shape[2], values.shape[2]
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _append_kernel[(B,)](
            keys, values, length, k_new, v_new, caps, offsets,
            k_scale if quant else length, v_scale if quant else length,
            *keys.stride(), *values.stride(),
            k_new.stride(0), k_new.stride(1), k_new.stride(3),
            v_new.stride(0), v_new.stride(1), v_new.stride(3),
            *caps.stride(), k_scale.stride(0) if quant else 0, v_scale.stride(0) if quant else 0, G, sink,
            G_PAD=pow2(G, 1), D=D, D_PAD=pow2(D, 16), DV=Dv, DV_PAD=pow2(Dv, 16), QUANT=quant, num_warps=1,
        )
