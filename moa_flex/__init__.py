"""moa-flex: MoA (Mixture of Sparse Attention) as a PyTorch-native compiler pass on FlexAttention."""

from .cache import MoaCache
from .calibration import Sample, calibration_set, load_jsonl, synthetic_samples
from .compile import backend, compile, uncompile
from .masks import block_mask, mask_mod, reference_mask
from .optimize import Budget, rule_grid
from .plan import FORMAT, ModelShape, Plan
from .profile import Profile, dropped_loss, profile_model

__all__ = [
    "Budget", "FORMAT", "ModelShape", "MoaCache", "Plan", "Profile", "Sample", "backend", "block_mask", "calibration_set", "compile",
    "dropped_loss", "load_jsonl", "mask_mod", "profile_model", "reference_mask", "rule_grid", "synthetic_samples", "uncompile",
]
__version__ = "0.1.0"
