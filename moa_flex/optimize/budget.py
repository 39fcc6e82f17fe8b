"""The KV-cache budget of the optimizer: a density, or an absolute size in tokens or GB."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from moa_flex.kernels.quant import KV_DTYPES, bytes_per_vector, kv_dtype as parse_kv_dtype
from moa_flex.plan import ModelShape

GB = 10**9  # bytes in the GB of absolute budgets
DEFAULT_DTYPE_BYTES = 2  # bf16/fp16 values, no scales: the byte count before kv_dtype existed
KV_DTYPE_NAMES = {d: name for name, d in KV_DTYPES.items()}  # torch dtype -> "bf16", "fp8", ...


@dataclass(frozen=True)
class Budget:
    """A KV-cache budget: a density, or an absolute size in tokens or GB at a given length.

    - ``density``: KV slots <= density * (dense slots), at ``length`` if given, else at every
      profiled length. Measured as :meth:`Plan.kv_density` (``measure="memory"``).
    - ``tokens``: total KV slots per sequence, summed over layers and KV heads, at ``length``.
    - ``gb``: cache bytes (10**9 per GB) for ``batch_size`` sequences of ``length`` tokens:
      ``2 (K and V) * bytes_per_vector * batch_size * slots``, where a stored head vector (one
      token x one KV head) takes ``head_dim * dtype_bytes`` bytes, or, with ``kv_dtype``, what
      the runtime's cache of that dtype stores (:func:`moa_flex.kernels.quant.bytes_per_vector`):
      ``head_dim * 2`` for bf16/fp16, ``head_dim * 4`` for fp32, ``head_dim + 4`` for fp8
      (one byte per value plus a float32 scale), so fp8 buys ``2 * head_dim / (head_dim + 4)``
      times the slots of bf16. A DeepSeek Sparse Attention model's cache also keeps the
      indexer's key of each kept token (``model.index_dim`` values in the model's dtype:
      ``dtype_bytes`` each, or with ``kv_dtype`` 4 for an fp32 cache and 2 for any other, the
      model dtype of an fp8/bf16/fp16 cache being bf16 or fp16), counted per slot of its
      single latent group.

    ``kv_dtype``: the cache's storage dtype (a torch dtype or ``"bf16"``, ``"fp16"``, ``"fp32"``,
    ``"fp8"``; stored as the torch dtype), as passed to ``moa_flex.compile(..., kv_dtype=)``.
    None (default): ``dtype_bytes`` per value and no scales. Give ``kv_dtype`` or a non-default
    ``dtype_bytes``, not both. Density and token budgets count slots, not bytes: there
    ``kv_dtype`` is validated and recorded (:meth:`to_dict`) but changes no limit.
    """

    density: float | None = None
    tokens: float | None = None
    gb: float | None = None
    length: int | None = None
    batch_size: int = 1
    dtype_bytes: int = DEFAULT_DTYPE_BYTES
    kv_dtype: torch.dtype | str | None = None

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
        if self.kv_dtype is not None:
            if self.dtype_bytes != DEFAULT_DTYPE_BYTES:
                # two sources for one byte count: refuse rather than silently prefer one
                raise ValueError(f"give budget kv_dtype or dtype_bytes, not both (got kv_dtype={self.kv_dtype!r}, "
                                 f"dtype_bytes={self.dtype_bytes})")
            object.__setattr__(self, "kv_dtype", parse_kv_dtype(self.kv_dtype))  # frozen: normalize once

    def vector_bytes(self, head_dim: int) -> int:
        """Bytes of one stored head vector (a key or a value of one token and KV head)."""
        if self.kv_dtype is None:
            return head_dim * self.dtype_bytes
        return bytes_per_vector(self.kv_dtype, head_dim)

    def index_value_bytes(self) -> int:
        """Bytes of one value of an indexer's cached key (the model's dtype, see the class)."""
        if self.kv_dtype is None:
            return self.dtype_bytes
        return 4 if self.kv_dtype == torch.float32 else 2

    def slot_bytes(self, head_dim: int, value_dim: int | None = None, index_dim: int | None = None) -> int:
        """Cache bytes of one KV slot (K and V of one token and KV head) over the whole batch;
        ``value_dim``: a value's width where it is not ``head_dim``; ``index_dim``: the width of
        an indexer key kept beside it (DeepSeek Sparse Attention)."""
        index = (index_dim or 0) * self.index_value_bytes()
        return (self.vector_bytes(head_dim) + self.vector_bytes(value_dim or head_dim) + index) * self.batch_size

    def slot_limits(self, lengths: Sequence[int], model: ModelShape, cache_groups: int) -> dict[int, float]:
        """{length: max KV slots per sequence summed over layers and cache groups}."""
        if self.density is not None:
            at = [self.length] if self.length is not None else list(lengths)
            return {n: self.density * n * model.num_layers * cache_groups for n in at}
        if self.tokens is not None:
            return {self.length: float(self.tokens)}
        if model.head_dim is None:
            raise ValueError("a budget in GB needs model.head_dim")
        if model.index_dim is not None and cache_groups != 1:
            # one indexer key per token and layer: per slot only where a layer has one group (latent)
            raise ValueError(f"a GB budget for a model with indexer keys expects one cache group (latent attention), "
                             f"got {cache_groups}: the cache keeps one indexer entry per kept token (Qwen4-Exp), not "
                             "one per KV slot as a GB budget counts; give the budget as a density or in tokens")
        return {self.length: self.gb * GB / self.slot_bytes(model.head_dim, model.value_dim, model.index_dim)}

    def to_dict(self) -> dict:
        """The given fields, JSON-clean (``kv_dtype`` by name; ``dtype_bytes`` left out when
        ``kv_dtype`` replaces it); ``Budget(**to_dict())`` is the same budget."""
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.kv_dtype is not None:
            out["kv_dtype"] = KV_DTYPE_NAMES[self.kv_dtype]
            del out["dtype_bytes"]
        return out
