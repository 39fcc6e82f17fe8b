"""The tests' oracles: :mod:`moa_flex.reference` (shared with the support matrix)."""

from moa_flex.reference import greedy, planned_logits, reference_attention, reference_logits

__all__ = ["greedy", "planned_logits", "reference_attention", "reference_logits"]
