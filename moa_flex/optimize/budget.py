"""The KV-cache budget of the optimizer: a density, or an absolute size in tokens or GB."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from moa_flex.plan import ModelShape

GB = 10**9  # bytes in the GB of absolute budgets


@dataclass(frozen=True)
class Budget:
    """A KV-cache budget: a density, or an absolute size in tokens or GB at a given length.

    - ``density``: KV slots <= density * (dense slots), at ``length`` if given, else at every
      profiled length. Measured as :meth:`Plan.kv_density` (``measure="memory"``).
    - ``tokens``: total KV slots per sequence, summed over layers and KV heads, at ``length``.
    - ``gb``: cache bytes (10**9 per GB) for ``batch_size`` sequences of ``length`` tokens:
      ``2 (K and V) * head_dim * dtype_bytes * batch_size * slots``.
    """

    density: float | None = None
    tokens: float | None = None
    gb: float | None = None
    length: int | None = None
    batch_size: int = 1
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        given = [k for k in ("density", "tokens", "gb") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of budget density, tokens, gb; got {given or 'none'}")
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"budget {given[0]} must be a finite number > 0, got {value!r}")
        if self.density is not None and self.density > 1:
            raise ValueError(f"budget density must be in (0, 1], got {self.density}")
        if self.length is not None and (isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1):
            raise ValueError(f"budget length must be an integer >= 1 (tokens), got {self.length!r}")
        if self.density is None and self.length is None:
            raise ValueError(f"budget {given[0]} needs a length (tokens) at which it holds")
        for k in ("batch_size", "dtype_bytes"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"budget {k} must be an integer >= 1, got {v!r}")

    def slot_limits(self, lengths: Sequence[int], model: ModelShape, cache_groups: int) -> dict[int, float]:
        """{length: max KV slots per sequence summed over layers and cache groups}."""
        if self.density is not None:
            at = [self.length] if self.length is not None else list(lengths)
            return {n: self.density * n * model.num_layers * cache_groups for n in at}
        if self.tokens is not None:
            return {self.length: float(self.tokens)}
        if model.head_dim is None:
            raise ValueError("a budget in GB needs model.head_dim")
        per_slot = 2 * model.head_dim * self.dtype_bytes * self.batch_size
        return {self.length: self.gb * GB / per_slot}

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}
