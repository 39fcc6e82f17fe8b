"""Stage 1, data: calibration samples (:mod:`.samples`), the synthetic long-context tasks
(:mod:`.synthetic`) and calibration sets answered by the dense model itself (:mod:`.calibration`)."""

from .calibration import answer_samples, calibration_set, code_samples, synthetic_samples
from .samples import Sample, format_sample, load_jsonl

__all__ = ["Sample", "answer_samples", "calibration_set", "code_samples", "format_sample", "load_jsonl", "synthetic_samples"]
