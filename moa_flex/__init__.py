"""moa-flex: MoA (Mixture of Sparse Attention) as a PyTorch-native compiler pass on FlexAttention.

The pipeline, one subpackage per stage: :mod:`moa_flex.data` (calibration samples) ->
:mod:`moa_flex.profile` (attention influence by distance) -> :mod:`moa_flex.optimize` (one rule
per head under a KV budget) -> :mod:`moa_flex.runtime` (``compile``, the ragged cache,
``generate``), with the Triton kernels in :mod:`moa_flex.kernels` and the graph passes in
:mod:`moa_flex.passes`. :func:`compress` runs the first three stages in one call.
docs/DESIGN.md fixes the semantics every module agrees on.
"""

from . import masks, plans
from .optimize.budget import Budget
from .pipeline import compress
from .plan import Plan
from .profile.store import Profile
from .runtime.cache import MoaCache
from .runtime.compile import backend, compile, uncompile

__all__ = ["Budget", "MoaCache", "Plan", "Profile", "backend", "compile", "compress", "masks", "plans", "uncompile"]
__version__ = "0.2.0"
