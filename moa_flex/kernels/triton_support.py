"""What every Triton kernel module of moa-flex shares: the optional triton import, whether
kernels run in Triton's interpreter, tile-size rounding and the GPU's multiprocessor count.

triton is a dev extra: the pure-torch twins and the ops' CPU paths never need it. For the
interpreter (CPU tensors in the tests), ``TRITON_INTERPRET=1`` must be set before triton is
first imported: triton 3.9 reads it when ``@triton.jit`` decorates, its own library included.
"""

from __future__ import annotations

import functools

import torch

try:  # triton is a dev extra; the twins and the ops' CPU paths do not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if triton is not None:

    @triton.jit
    def _probe() -> None:
        """Jitted only to learn whether ``@triton.jit`` builds interpreted functions."""


def interpreting() -> bool:
    """True when the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


def pow2(n: int, least: int) -> int:
    """The smallest power of two >= n and >= least (tile sizes)."""
    return max(least, 1 << max(0, (n - 1).bit_length()))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (8 for the CPU interpreter); read once per device,
    not per kernel call."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
