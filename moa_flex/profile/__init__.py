"""Stage 2, profile: how much the loss depends on each attention distance, per head.

:mod:`.influence` holds the math (the influence formula binned by distance, reference and
tiled implementations, the loss a span drops); :mod:`.instrument` runs it inside a
transformers model on calibration samples (:func:`profile_model`); :mod:`.store` is the
:class:`Profile` and its safetensors file format. docs/DESIGN.md, "Profiling", fixes the formula.
"""

from .influence import dropped_loss, influence_histogram
from .instrument import answer_loss, profile_model
from .store import Profile

__all__ = ["Profile", "answer_loss", "dropped_loss", "influence_histogram", "profile_model"]
