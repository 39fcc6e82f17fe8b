"""moa-flex: MoA (Mixture of Sparse Attention) as a PyTorch-native compiler pass on FlexAttention."""

from .cache import MoaCache
from .compile import backend, compile, uncompile
from .masks import block_mask, mask_mod, reference_mask
from .plan import FORMAT, ModelShape, Plan

__all__ = [
    "FORMAT", "ModelShape", "MoaCache", "Plan", "backend", "block_mask", "compile", "mask_mod", "reference_mask", "uncompile",
]
__version__ = "0.1.0"
