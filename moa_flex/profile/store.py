"""The Profile: influence histograms of one model per profiled length, and their file format.

A profile file is safetensors (no pickle): tensors ``hist/N`` float64 [L, H, ceil(N /
span_multiple)] and ``sink/N`` float64 [L, H] per length N, and a JSON header (format
``moa-flex.profile/1``) with the model shape, binning, sample counts, the calibration data's
hash and the model's fingerprint (docs/DESIGN.md, "Profiling").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from moa_flex.data.samples import Sample
from moa_flex.plan import ModelShape

from .influence import check_binning, dropped_loss, num_bins

FORMAT = "moa-flex.profile/1"
HEADER_KEY = "moa-flex.profile"


@dataclass
class Profile:
    """Influence histograms of one model: per length N (tokens), ``hist[N]`` float64
    [L, H, ceil(N / span_multiple)] and ``sink_share[N]`` float64 [L, H] (query heads, loss
    units, averaged over ``num_samples[N]`` samples)."""

    model: ModelShape
    sink: int
    span_multiple: int
    hist: dict[int, torch.Tensor] = field(default_factory=dict)
    sink_share: dict[int, torch.Tensor] = field(default_factory=dict)
    num_samples: dict[int, int] = field(default_factory=dict)
    data_hash: str = ""
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_binning(self.sink, self.span_multiple)
        L, H = self.model.num_layers, self.model.num_heads
        if set(self.hist) != set(self.sink_share) or set(self.hist) != set(self.num_samples):
            raise ValueError("profile: hist, sink_share and num_samples must have the same lengths")
        for N, h in self.hist.items():
            expect = (L, H, num_bins(N, self.span_multiple))
            if tuple(h.shape) != expect:
                raise ValueError(f"profile.hist[{N}] has shape {tuple(h.shape)}, expected {expect}")
            if tuple(self.sink_share[N].shape) != (L, H):
                raise ValueError(f"profile.sink_share[{N}] has shape {tuple(self.sink_share[N].shape)}, expected {(L, H)}")

    @property
    def lengths(self) -> list[int]:
        """Profiled lengths (tokens), ascending."""
        return sorted(self.hist)

    def dropped_loss(self, N: int, spans: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """[L, H, R]: loss of each query head under each of R candidate spans (tokens) at length N."""
        if N not in self.hist:
            raise ValueError(f"length N={N} was not profiled; profiled: {self.lengths}")
        return dropped_loss(self.hist[N], spans, N=N, sink=self.sink, span_multiple=self.span_multiple)

    def head_loss(self, N: int, head_spans: torch.Tensor) -> torch.Tensor:
        """[L, H]: loss of each query head under its own span (e.g. ``plan.head_spans(N)``)."""
        L, H = self.model.num_layers, self.model.num_heads
        if tuple(head_spans.shape) != (L, H):
            raise ValueError(f"head_spans must be [{L}, {H}], got {tuple(head_spans.shape)}")
        per = self.dropped_loss(N, head_spans.reshape(-1))  # [L, H, L*H]
        return per.reshape(L * H, L * H).diagonal().reshape(L, H)

    def check_model(self, model: Any) -> None:
        """ValueError naming the field if ``model`` (HF model, config or ModelShape) is not the
        profiled one: attention shape always; weights fingerprint when given a model."""
        fp = ""
        if isinstance(model, ModelShape):
            shape = model
        elif isinstance(model, torch.nn.Module):
            shape = ModelShape.from_config(model.config)
            fp = model_fingerprint(model)
        else:
            shape = ModelShape.from_config(model)
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "layer_indices"):
            mine, theirs = getattr(self.model, name), getattr(shape, name)
            if mine != theirs:
                raise ValueError(f"profile is for another model: model.{name} is {theirs}, the profile has {mine} "
                                 f"(profiled model {self.model.name!r})")
        if fp and self.fingerprint and fp != self.fingerprint:
            raise ValueError(f"profile is for another model: weights fingerprint {fp} differs from the profile's "
                             f"{self.fingerprint} (profiled model {self.model.name!r})")

    def header(self) -> dict:
        """The JSON header stored with the tensors."""
        m = self.model
        return {
            "format": FORMAT,
            "model": {"num_layers": m.num_layers, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
                      "head_dim": m.head_dim, "name": m.name,
                      **({} if m.layers is None else {"layers": list(m.layers), "total_layers": m.total_layers})},
            "sink": self.sink, "span_multiple": self.span_multiple, "lengths": self.lengths,
            "num_samples": {str(n): self.num_samples[n] for n in self.lengths},
            "data_hash": self.data_hash, "fingerprint": self.fingerprint, "dtype": "float64",
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors (``hist/N``, ``sink/N``) with the JSON header; atomic (temp + rename)."""
        from safetensors.torch import save_file

        tensors = {}
        for N in self.lengths:
            tensors[f"hist/{N}"] = self.hist[N].detach().to("cpu", torch.float64).contiguous()
            tensors[f"sink/{N}"] = self.sink_share[N].detach().to("cpu", torch.float64).contiguous()
        tmp = f"{os.fspath(path)}.tmp"
        save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(self.header())})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read a profile written by :meth:`save` (no pickle); ValueError if it is not one."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if HEADER_KEY not in meta:
                raise ValueError(f"{path} is not a moa-flex profile (no {HEADER_KEY!r} header)")
            header = json.loads(meta[HEADER_KEY])
            if header.get("format") != FORMAT:
                raise ValueError(f"{path}: format must be {FORMAT!r}, got {header.get('format')!r}")
            lengths = [int(n) for n in header["lengths"]]
            keys = set(f.keys())
            for N in lengths:
                for key in (f"hist/{N}", f"sink/{N}"):
                    if key not in keys:
                        raise ValueError(f"{path}: tensor {key!r} missing for length {N}")
            hist = {N: f.get_tensor(f"hist/{N}") for N in lengths}
            sink_share = {N: f.get_tensor(f"sink/{N}") for N in lengths}
        return cls(
            _shape(header["model"]), int(header["sink"]), int(header["span_multiple"]), hist, sink_share,
            {int(n): int(c) for n, c in header["num_samples"].items()}, header.get("data_hash", ""),
            header.get("fingerprint", ""), header.get("meta", {}),
        )


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of the model's attention shape and a few weight values (first 64 of the first
    and last parameters), to tell apart models of the same shape."""
    s = ModelShape.from_config(model.config)
    h = hashlib.sha256(repr((s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim)).encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]):
        h.update(p.detach().reshape(-1)[:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def data_hash(samples: Mapping[int, Sequence[Sample]]) -> str:
    """Hash of the calibration data: lengths and every sample's tokens, in order."""
    h = hashlib.sha256()
    for N in sorted(samples):
        h.update(f"N={N};".encode())
        for s in samples[N]:
            for part in (s.head, s.context, s.question, s.answer):
                h.update(part.to(torch.int64).numpy().tobytes())
                h.update(b"|")
    return h.hexdigest()[:16]


def _shape(model: dict) -> ModelShape:
    """The ModelShape of a profile header (a hybrid's layers as a tuple)."""
    layers = model.get("layers")
    return ModelShape(**{**model, "layers": None if layers is None else tuple(layers)})
