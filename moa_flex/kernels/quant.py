"""FP8 storage of the ragged MoA cache: the quantizer every write uses and its inverse.

A quantized cache keeps K and V as ``float8_e4m3fn`` (one byte per value) and, beside them,
one float32 scale per stored vector: per token and KV head, separately for K and V
(``k_scale``/``v_scale`` ``[B, S]`` beside ``keys``/``values`` ``[B, S, D]``). A vector ``x``
[D] is stored as

    scale = amax(|x|) * (1 / 448)      (1.0 if below float32's smallest normal: x all zeros,
                                        or so small that e4m3 stores it as zeros anyway)
    x8    = fp8(clamp(x / scale, -448, 448))     (round to nearest even)

and read back as ``x8 * scale``. Per-vector scales need no calibration and follow RoPE'd keys
and values whatever their magnitude (the measurement behind the choice is in
docs/DESIGN.md, "FP8 cache"); they cost 4 bytes per 128-value head vector (3%).

Every writer produces the same bits: :func:`quantize_fp8` here (the torch twin, used by the
prefill writes and on the CPU) and the Triton append kernel (``kernels/append.py``), which
computes the scale by the same multiplication and the quotient with round-to-nearest division.
Readers (decode and chunk kernels and their twins) fold the scales into the scores
(``(q . x8) * scale``) and into the probabilities (``p * scale``), so no dequantized copy of
the cache exists anywhere.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INV_FP8_MAX = 1.0 / 448.0  # the scale is amax times this float32 constant (no division)
SCALE_DTYPE = torch.float32
# smaller scales (vectors of amax < 448 * 2^-126) are taken as 1: no division by a subnormal
# (or, flushed to zero, by 0); such vectors are all below e4m3's smallest value and store zeros
SCALE_MIN = torch.finfo(torch.float32).tiny
SCALE_BYTES = 4  # per stored vector (token x KV head), for K and for V each
KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": FP8}


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether a cache stored in ``dtype`` keeps scales beside its values."""
    return dtype == FP8


def kv_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A cache storage dtype from a dtype or a name (``bf16``, ``fp16``, ``fp32``, ``fp8``);
    None stays None (the model's dtype). ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        key = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
               "float8_e4m3fn": "fp8", "e4m3": "fp8"}.get(key, key)
        if key not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_DTYPES)} (or a torch dtype), got {value!r}")
        return KV_DTYPES[key]
    if value not in KV_DTYPES.values():
        raise ValueError(f"kv_dtype must be one of {[str(d) for d in KV_DTYPES.values()]}, got {value!r}")
    return value


def bytes_per_vector(dtype: torch.dtype, head_dim: int) -> int:
    """Cache bytes of one stored head vector (a key or a value of one token and KV head):
    the values, plus the scale of a quantized cache."""
    elem = torch.empty((), dtype=dtype).element_size()
    return head_dim * elem + (SCALE_BYTES if is_quantized(dtype) else 0)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the vectors along the last axis of ``x`` [..., D]: (x8 [..., D] fp8, scale [...]
    float32), so that ``x8 * scale`` approximates ``x`` (relative error <= 2^-4 per element
    of the vector's largest magnitude, see the module docstring)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = amax * INV_FP8_MAX
    scale = torch.where(scale >= SCALE_MIN, scale, torch.ones_like(scale))
    x8 = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, scale


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x8 * scale`` in ``dtype`` (the values a reader sees), [..., D]."""
    return x8.to(dtype) * scale.to(dtype).unsqueeze(-1)
