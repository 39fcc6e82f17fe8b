"""moa-flex: MoA (Mixture of Sparse Attention) as a PyTorch-native compiler pass on FlexAttention."""

from .plan import FORMAT, ModelShape, Plan
from .masks import block_mask, mask_mod, reference_mask

__all__ = ["FORMAT", "ModelShape", "Plan", "block_mask", "mask_mod", "reference_mask"]
__version__ = "0.1.0"

from .compile import backend, compile, uncompile  # noqa: E402

__all__ += ["backend", "compile", "uncompile"]
