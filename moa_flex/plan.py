"""The plan: one elastic sparse-attention rule per head group, as data.

A plan is JSON (format ``moa-flex.plan/1``, see docs/DESIGN.md), never code. Each group ``g`` of
layer ``l`` gets a rule ``(alpha, beta)``; for a request planned for ``N`` tokens its span is

    span(l, g, N) = min(N, max(min_span, ceil_to_multiple(alpha + beta * N, span_multiple)))

and query head ``h`` of that group keeps key ``j`` for query ``i`` iff
``j <= i and (j < sink or i - j < span - sink)``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from moa_flex.architecture import (
    VARIES, attention_layers, cached_key_dim, cached_value_dim, key_bias_columns, call_kv_heads, call_slots,
    index_ring_width, latent_attention, layer_config_value, text_config,
)

FORMAT = "moa-flex.plan/1"
PLAN_FILE = "moa_plan.json"  # a plan beside a model's config.json (Plan.save_pretrained)
GRANULARITIES = ("kv_head", "head")
DEFAULT_SINK = 64
DEFAULT_SPAN_MULTIPLE = 64
DEFAULT_MIN_SPAN = 128


def _not_a_decoder(config: Any) -> str:
    """Why ``config`` gives no decoder shape (no layer count or no attention heads)."""
    name = type(config).__name__
    stacks = _stacks(config)
    if len(stacks) > 1:
        return (f"config {name} has no num_hidden_layers/num_attention_heads: it describes a model of several stacks "
                f"({', '.join(stacks)}), each with layers and heads of its own (BLT: local byte encoder and decoder "
                "around a global transformer over patches), and a moa-flex plan covers one decoder stack")
    if getattr(config, "num_hidden_layers", None) is not None:
        return (f"config {name} has no num_attention_heads: its layers have no softmax-attention heads (a recurrent "
                "model: RWKV, xLSTM), so a MoA plan has nothing to rule")
    return f"config {name} has no num_hidden_layers/num_attention_heads; expected a transformers decoder config"


def _stacks(config: Any) -> list[str]:
    """The sub-configs of ``config`` that have layers or attention heads of their own."""
    subs = getattr(config, "sub_configs", None) or {}
    return [name for name in subs if any(hasattr(getattr(config, name, None), f)
                                         for f in ("num_hidden_layers", "num_attention_heads"))]


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of a decoder model: layers, query heads, KV heads, head dim.

    ``num_kv_heads`` and ``head_dim`` are the MoA cache's: the heads and width of a cached key
    (a model with latent attention caches one latent per token: one KV head, as wide as the
    latent and the rotary key, ``architecture.latent_attention``).

    ``num_layers`` counts the softmax-attention layers, the ones a plan gives rules. In a
    hybrid (layers of linear attention, Mamba or convolutions between them) ``layers`` names
    the model's decoder-layer index of each of them and ``total_layers`` counts all decoder
    layers; for a model whose every layer attends both are None. ``value_dim``: the width of a
    cached value per head where it is not ``head_dim`` (MiMo-V2-Flash's narrower values,
    DiffLlama's two halves side by side: ``architecture.cached_value_dim``); budgets in bytes
    count it. ``call_slots``: for a model that runs a section of its decoder layers several times
    per forward, each loop on cache slots of its own (Dory), the plan's layers are the cache slots,
    and this is the slot of each attention call of one forward in call order
    (``architecture.call_slots``); None where calls map to layers by module or in call order.
    ``index_dim``: the width of the indexer key the cache keeps beside each kept token of a
    DeepSeek Sparse Attention model (``index_head_dim``, stored in the model's dtype); budgets in
    bytes count it. None for every other model. ``layer_heads``: the query heads of every planned
    layer, where layers differ in them (dots3's sliding layers); then ``num_heads`` is the most a
    layer has. Only latent attention may differ so: its layers cache one latent (one KV head,
    one rule a layer under granularity 'kv_head') whatever their heads.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    name: str = ""
    layers: tuple[int, ...] | None = None
    total_layers: int | None = None
    value_dim: int | None = None
    call_slots: tuple[int, ...] | None = None
    index_dim: int | None = None
    layer_heads: tuple[int, ...] | None = None

    def heads_of(self, layer: int) -> int:
        """Query heads of planned layer ``layer``."""
        return self.num_heads if self.layer_heads is None else self.layer_heads[layer]

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """The model's decoder-layer index of every planned layer, in plan order."""
        return self.layers if self.layers is not None else tuple(range(self.num_layers))

    @property
    def model_layers(self) -> int:
        """Decoder layers of the model, planned or not."""
        return self.total_layers if self.total_layers is not None else self.num_layers

    def plan_layer(self, model_layer: int) -> int:
        """The plan's layer index of the model's decoder layer ``model_layer``; ValueError for a
        layer without softmax attention (or past the model)."""
        if self.layers is None:
            if 0 <= model_layer < self.num_layers:
                return model_layer
        elif model_layer in self.layers:
            return self.layers.index(model_layer)
        raise ValueError(f"decoder layer {model_layer} is not a planned attention layer (the plan covers decoder "
                         f"layers {list(self.layer_indices)})")

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """Read the shape from a transformers ``PretrainedConfig`` (text config if nested)."""
        config = text_config(config)
        try:
            num_layers = int(config.num_hidden_layers)
            layers = attention_layers(config, num_layers)
            planned = layers if layers is not None else range(num_layers)
            heads = per_layer_value(config, "num_attention_heads", planned,
                                    varies_ok=latent_attention(config) is not None)
            layer_heads = None
            if heads is VARIES:  # latent attention: one latent a layer, whatever its heads
                layer_heads = tuple(int(layer_config_value(config, "num_attention_heads", i)) for i in planned)
                heads = max(layer_heads)
            if heads is None:  # RWKV, xLSTM: the field exists, unset
                raise AttributeError("num_attention_heads")
            num_heads = int(heads)
        except AttributeError as e:
            raise TypeError(_not_a_decoder(config)) from e
        num_kv_heads = call_kv_heads(config, num_heads, 1 if layer_heads else
                                     per_layer_value(config, "num_key_value_heads", planned) or num_heads)
        head_dim = per_layer_value(config, "head_dim", planned, varies_ok=True)
        if head_dim is VARIES:  # each layer's cache takes its own (MoaCache reads it from the config)
            head_dim = None
        elif head_dim is None and getattr(config, "hidden_size", None):
            head_dim = int(config.hidden_size) // num_heads
        name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "")
        head_dim = cached_key_dim(config, head_dim)  # latent attention: the latent and rotary key
        if head_dim is VARIES:  # latent widths that differ between layers: each layer's cache takes its own
            head_dim = None
        value_dim = _value_dim(config, head_dim)
        index_dim = index_ring_width(config)
        slots = call_slots(config)
        if slots is not None:
            if layers is not None:
                raise TypeError(f"{type(config).__name__} loops decoder layers with cache slots of their own and has "
                                "layers without softmax attention; moa-flex models either, not both")
            return cls(len(slots), num_heads, int(num_kv_heads), head_dim, str(name), value_dim=value_dim,
                       call_slots=slots, index_dim=index_dim, layer_heads=layer_heads)
        if layers is None:
            return cls(num_layers, num_heads, int(num_kv_heads), head_dim, str(name), value_dim=value_dim,
                       index_dim=index_dim, layer_heads=layer_heads)
        return cls(len(layers), num_heads, int(num_kv_heads), head_dim, str(name), layers=layers,
                   total_layers=num_layers, value_dim=value_dim, index_dim=index_dim, layer_heads=layer_heads)


def _value_dim(config: Any, head_dim: int | None) -> int | None:
    """A cached value's width per head where it differs from ``head_dim``, else None."""
    if head_dim is None:
        return None
    v = getattr(config, "v_head_dim", None)
    width = cached_value_dim(config, v if isinstance(v, int) and v > 0 else head_dim - key_bias_columns(config))
    return None if width == head_dim else int(width)


def per_layer_value(config: Any, name: str, layers: Iterable[int], varies_ok: bool = False) -> Any:
    """``config.<name>``, or for a config with per-layer values (transformers' heterogeneous
    configs: Gemma 4, dots3) the planned layers' common value. Where they differ: :data:`VARIES`
    for ``varies_ok`` (head_dim: each layer's cache takes its own), else TypeError (a plan has
    one head layout)."""
    value = layer_config_value(config, name)
    if value is not VARIES:
        return value
    values = {i: layer_config_value(config, name, i) for i in layers}
    if len(set(values.values())) == 1:  # the planned layers agree (others, e.g. Mamba layers, may not)
        return next(iter(values.values()))
    if varies_ok:
        return VARIES
    raise TypeError(f"{type(config).__name__}'s {name} differs between attention layers ({values}); a moa-flex "
                    "plan has one head layout for every layer (layers may differ in query heads only with latent "
                    "attention, which caches one latent a layer)")


def _ceil_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    return torch.ceil(x / m) * m


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_layers(model: ModelShape) -> None:
    """ValueError unless a hybrid's ``layers`` / ``total_layers`` are consistent: both or
    neither, ``num_layers`` distinct increasing indices below ``total_layers``."""
    if model.layers is None and model.total_layers is None:
        return
    if model.layers is None or model.total_layers is None:
        raise ValueError("plan.model.layers and plan.model.total_layers come together (a hybrid model's planned "
                         "layers and its decoder-layer count)")
    total = _check_int("plan.model.total_layers", model.total_layers, 1)
    layers = list(model.layers)
    if len(layers) != model.num_layers:
        raise ValueError(f"plan.model.layers has {len(layers)} entries, expected num_layers = {model.num_layers}")
    for i in layers:
        _check_int("plan.model.layers[]", i, 0)
    if layers != sorted(set(layers)) or layers[-1] >= total:
        raise ValueError(f"plan.model.layers must be increasing decoder-layer indices below total_layers = {total}, "
                         f"got {layers}")


def _check_layer_heads(model: ModelShape, granularity: str) -> None:
    """ValueError unless a shape whose layers differ in query heads (``layer_heads``) is latent
    attention's (one KV head) under granularity 'kv_head', with one count per layer whose
    largest is ``num_heads``."""
    if model.layer_heads is None:
        return
    heads = list(model.layer_heads)
    if len(heads) != model.num_layers:
        raise ValueError(f"plan.model.layer_heads has {len(heads)} entries, expected num_layers = {model.num_layers}")
    for h in heads:
        _check_int("plan.model.layer_heads[]", h, 1)
    if max(heads) != model.num_heads:
        raise ValueError(f"plan.model.num_heads ({model.num_heads}) must be the most of plan.model.layer_heads "
                         f"({max(heads)})")
    if model.num_kv_heads != 1 or granularity != "kv_head":
        raise ValueError("a plan whose layers differ in query heads (plan.model.layer_heads) must have one KV head "
                         f"(latent attention) and granularity 'kv_head', got {model.num_kv_heads} KV heads and "
                         f"granularity {granularity!r}: one rule a layer, which every head of it takes")


def _rule_matrix(name: str, value: Any, rows: int, cols: int, why: str) -> torch.Tensor:
    """Validate a nested [rows][cols] list of finite numbers and return float64 [rows, cols]."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"plan.{name} must be a list of {rows} lists (one per layer), got {type(value).__name__}")
    if len(value) != rows:
        raise ValueError(f"plan.{name} has {len(value)} layers, expected {rows} (model.num_layers)")
    for layer, row in enumerate(value):
        if not isinstance(row, (list, tuple)):
            raise ValueError(f"plan.{name}[{layer}] must be a list of {cols} numbers, got {type(row).__name__}")
        if len(row) != cols:
            raise ValueError(f"plan.{name}[{layer}] has {len(row)} entries, expected {cols} ({why})")
        for g, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"plan.{name}[{layer}][{g}] must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"plan.{name}[{layer}][{g}] must be finite, got {v!r}")
    return torch.tensor(value, dtype=torch.float64).reshape(rows, cols)


class Plan:
    """Per-group elastic sink + sliding-window rules for every attention layer of a model.

    Construct through :meth:`from_dict`, :meth:`load`, :meth:`dense`, :meth:`uniform` or
    :meth:`from_moa_json`; every constructor validates the whole plan first, so a bad plan
    is never half-built.
    """

    def __init__(
        self,
        model: ModelShape,
        alpha: Sequence[Sequence[float]],
        beta: Sequence[Sequence[float]],
        *,
        granularity: str = "kv_head",
        sink: int = DEFAULT_SINK,
        span_multiple: int = DEFAULT_SPAN_MULTIPLE,
        min_span: int = DEFAULT_MIN_SPAN,
        meta: dict | None = None,
    ) -> None:
        _check_int("plan.model.num_layers", model.num_layers, 1)
        _check_int("plan.model.num_heads", model.num_heads, 1)
        _check_int("plan.model.num_kv_heads", model.num_kv_heads, 1)
        if model.head_dim is not None:
            _check_int("plan.model.head_dim", model.head_dim, 1)
        if model.value_dim is not None:
            _check_int("plan.model.value_dim", model.value_dim, 1)
        if model.index_dim is not None:
            _check_int("plan.model.index_dim", model.index_dim, 1)
        if not isinstance(model.name, str):
            raise ValueError(f"plan.model.name must be a string, got {model.name!r}")
        _check_layers(model)
        if model.num_heads % model.num_kv_heads:
            raise ValueError(
                f"plan.model.num_heads ({model.num_heads}) must be divisible by "
                f"plan.model.num_kv_heads ({model.num_kv_heads})"
            )
        if granularity not in GRANULARITIES:
            raise ValueError(f"plan.granularity must be one of {GRANULARITIES}, got {granularity!r}")
        _check_layer_heads(model, granularity)
        _check_int("plan.sink", sink, 0)
        _check_int("plan.span_multiple", span_multiple, 1)
        _check_int("plan.min_span", min_span, 1)
        if min_span <= sink:
            raise ValueError(f"plan.min_span ({min_span}) must be > plan.sink ({sink})")
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(f"plan.meta must be a JSON object (dict), got {type(meta).__name__}")
        groups = model.num_kv_heads if granularity == "kv_head" else model.num_heads
        why = (
            "G = model.num_kv_heads for granularity 'kv_head'"
            if granularity == "kv_head"
            else "G = model.num_heads for granularity 'head'"
        )
        a = _rule_matrix("alpha", alpha, model.num_layers, groups, why)
        b = _rule_matrix("beta", beta, model.num_layers, groups, why)
        bad = ((b < 0) | (b > 1)).nonzero()
        if len(bad):
            layer, g = (int(x) for x in bad[0])
            raise ValueError(f"plan.beta[{layer}][{g}] must be in [0, 1], got {float(b[layer, g])}")
        self.model = model
        self.granularity = granularity
        self.sink = sink
        self.span_multiple = span_multiple
        self.min_span = min_span
        self.alpha = a
        self.beta = b
        self.meta = copy.deepcopy(meta or {})

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_heads(self) -> int:
        return self.model.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.model.num_kv_heads

    @property
    def num_groups(self) -> int:
        """G: rules per layer (KV heads for 'kv_head', query heads for 'head')."""
        return self.alpha.shape[1]

    def group_of_head(self) -> torch.Tensor:
        """LongTensor [H]: the rule group of every query head."""
        h = torch.arange(self.num_heads)
        if self.granularity == "head":
            return h
        return h // (self.num_heads // self.num_kv_heads)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """Build a plan from its JSON object, validating format, shapes and values."""
        if not isinstance(data, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise ValueError(
                f"plan.format must be {FORMAT!r}, got {fmt!r}"
                + (" (an upstream MoA file? use Plan.from_moa_json)" if "alphas" in data else "")
            )
        required = ("model", "granularity", "sink", "span_multiple", "min_span", "alpha", "beta")
        for key in required:
            if key not in data:
                raise ValueError(f"plan.{key} is missing")
        unknown = set(data) - set(required) - {"format", "meta"}
        if unknown:
            raise ValueError(f"plan has unknown fields {sorted(unknown)}; expected {['format', *required, 'meta']}")
        m = data["model"]
        if not isinstance(m, dict):
            raise ValueError(f"plan.model must be an object, got {type(m).__name__}")
        for key in ("num_layers", "num_heads", "num_kv_heads"):
            if key not in m:
                raise ValueError(f"plan.model.{key} is missing")
        unknown = set(m) - {"num_layers", "num_heads", "num_kv_heads", "head_dim", "name", "layers", "total_layers",
                            "value_dim", "call_slots", "index_dim", "layer_heads"}
        if unknown:
            raise ValueError(f"plan.model has unknown fields {sorted(unknown)}")
        layers = m.get("layers")
        if layers is not None and not isinstance(layers, list):
            raise ValueError(f"plan.model.layers must be a list of decoder-layer indices, got {type(layers).__name__}")
        layer_heads = m.get("layer_heads")
        if layer_heads is not None and not isinstance(layer_heads, list):
            raise ValueError("plan.model.layer_heads must be a list of query-head counts, one per layer, got "
                             f"{type(layer_heads).__name__}")
        slots = m.get("call_slots")
        if slots is not None and (not isinstance(slots, list) or sorted(slots) != list(range(m["num_layers"]))):
            raise ValueError("plan.model.call_slots must list every layer of the plan once (the cache slot of each "
                             f"attention call in call order), got {slots!r}")
        shape = ModelShape(
            m["num_layers"], m["num_heads"], m["num_kv_heads"], m.get("head_dim"), m.get("name", ""),
            layers=None if layers is None else tuple(layers), total_layers=m.get("total_layers"),
            value_dim=m.get("value_dim"), call_slots=None if slots is None else tuple(slots),
            index_dim=m.get("index_dim"),
            layer_heads=None if layer_heads is None else tuple(layer_heads),
        )
        return cls(
            shape,
            data["alpha"],
            data["beta"],
            granularity=data["granularity"],
            sink=data["sink"],
            span_multiple=data["span_multiple"],
            min_span=data["min_span"],
            meta=data.get("meta", {}),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Load a plan from a JSON file (no pickle)."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    @staticmethod
    def _shape(model: ModelShape | Any) -> ModelShape:
        return model if isinstance(model, ModelShape) else ModelShape.from_config(model)

    @classmethod
    def uniform(
        cls,
        model: ModelShape | Any,
        *,
        alpha: float,
        beta: float,
        granularity: str | None = None,
        sink: int = DEFAULT_SINK,
        span_multiple: int = DEFAULT_SPAN_MULTIPLE,
        min_span: int = DEFAULT_MIN_SPAN,
        meta: dict | None = None,
    ) -> "Plan":
        """The same rule ``(alpha tokens, beta)`` for every head: the StreamingLLM-style baseline.

        ``model`` is a :class:`ModelShape` or a transformers config. Granularity defaults to
        'kv_head' for GQA models and 'head' for MHA.
        """
        shape = cls._shape(model)
        if granularity is None:
            granularity = "kv_head" if shape.num_kv_heads < shape.num_heads else "head"
        groups = shape.num_kv_heads if granularity == "kv_head" else shape.num_heads
        rows = lambda v: [[float(v)] * groups for _ in range(shape.num_layers)]  # noqa: E731
        meta = {"source": f"uniform(alpha={alpha}, beta={beta})", **(meta or {})}
        return cls(
            shape, rows(alpha), rows(beta), granularity=granularity, sink=sink,
            span_multiple=span_multiple, min_span=min_span, meta=meta,
        )

    @classmethod
    def dense(cls, model: ModelShape | Any, *, granularity: str | None = None, **kwargs: Any) -> "Plan":
        """Every head keeps everything (alpha 0, beta 1): exactly dense causal attention."""
        meta = {"source": "dense", **kwargs.pop("meta", {})}
        return cls.uniform(model, alpha=0.0, beta=1.0, granularity=granularity, meta=meta, **kwargs)

    @classmethod
    def from_moa_json(
        cls,
        path: str | os.PathLike,
        num_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        name: str = "",
        sink: int = DEFAULT_SINK,
        span_multiple: int = DEFAULT_SPAN_MULTIPLE,
        min_span: int = DEFAULT_MIN_SPAN,
        meta: dict | None = None,
    ) -> "Plan":
        """Load an upstream MoA plan file ``{"alphas": [[...]], "betas": [[...]]}``.

        Upstream rules are per query head (alpha in tokens), profiled on models converted to
        MHA, so the plan has granularity 'head'. ``num_kv_heads`` is the real model's KV
        head count (default: as many as query heads, i.e. the MHA-converted model); each KV
        group's cache then holds the largest span among its query heads.
        """
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or "alphas" not in data or "betas" not in data:
            raise ValueError(f"{path}: an upstream MoA plan needs the fields 'alphas' and 'betas'")
        alphas, betas = data["alphas"], data["betas"]
        if not isinstance(alphas, list) or not alphas or not isinstance(alphas[0], list):
            raise ValueError(f"{path}: 'alphas' must be a non-empty list of per-layer lists")
        num_layers, num_heads = len(alphas), len(alphas[0])
        kvh = num_heads if num_kv_heads is None else num_kv_heads
        shape = ModelShape(num_layers, num_heads, kvh, head_dim, name)
        info = {
            "source": f"MoA upstream plan {os.path.basename(os.fspath(path))}",
            "upstream_granularity": "per query head of the model converted to MHA",
            **(meta or {}),
        }
        try:
            return cls(
                shape, alphas, betas, granularity="head", sink=sink,
                span_multiple=span_multiple, min_span=min_span, meta=info,
            )
        except ValueError as e:
            raise ValueError(f"{path}: {str(e).replace('plan.alpha', 'alphas').replace('plan.beta', 'betas')}") from e

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        """The plan's JSON object."""
        m = self.model
        return {
            "format": FORMAT,
            "model": {
                "num_layers": m.num_layers,
                "num_heads": m.num_heads,
                "num_kv_heads": m.num_kv_heads,
                "head_dim": m.head_dim,
                "name": m.name,
                **({} if m.layers is None else {"layers": list(m.layers), "total_layers": m.total_layers}),
                **({} if m.value_dim is None else {"value_dim": m.value_dim}),
                **({} if m.call_slots is None else {"call_slots": list(m.call_slots)}),
                **({} if m.index_dim is None else {"index_dim": m.index_dim}),
                **({} if m.layer_heads is None else {"layer_heads": list(m.layer_heads)}),
            },
            "granularity": self.granularity,
            "sink": self.sink,
            "span_multiple": self.span_multiple,
            "min_span": self.min_span,
            "alpha": self.alpha.tolist(),
            "beta": self.beta.tolist(),
            "meta": copy.deepcopy(self.meta),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as indented JSON (UTF-8)."""
        text = json.dumps(self.to_dict(), indent=1)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    def save_pretrained(self, model_dir: str | os.PathLike) -> str:
        """Write the plan beside a model's weights, as ``model_dir/moa_plan.json``, so that it
        travels with the model (``Plan.from_pretrained``, ``moa_flex.compile(model)`` without a
        plan). The folder must exist. Returns the file's path."""
        folder = os.fspath(model_dir)
        if not os.path.isdir(folder):
            raise ValueError(f"{folder} is not a folder (save the model there first, or create it)")
        path = os.path.join(folder, PLAN_FILE)
        self.save(path)
        return path

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Plan":
        """The plan saved in a model's folder by :meth:`save_pretrained` (``moa_plan.json``);
        ValueError saying so when the folder has none."""
        folder = os.fspath(model_dir)
        path = os.path.join(folder, PLAN_FILE)
        if not os.path.isfile(path):
            what = "is not a folder" if not os.path.isdir(folder) else f"has no {PLAN_FILE}"
            raise ValueError(f"{folder} {what}: no moa-flex plan travels with this model; make one with "
                             f"`moa-flex compress {folder}` (or moa_flex.compress(model, ...).save_pretrained(folder))")
        return cls.load(path)

    def shard(self, index: int, count: int) -> "Plan":
        """The plan of shard ``index`` of ``count`` under tensor parallelism (heads split in
        contiguous slices, as colwise-sharded q/k/v projections split them): the shard's query
        and KV heads and its groups' rules. ValueError unless the heads split evenly."""
        _check_int("count", count, 1)
        if not 0 <= index < count:
            raise ValueError(f"shard index must be in [0, {count}), got {index}")
        if self.num_heads % count or self.num_kv_heads % count:
            raise ValueError(f"a plan of {self.num_heads} query / {self.num_kv_heads} KV heads cannot be split evenly "
                             f"over {count} tensor-parallel shards")
        g = self.num_groups // count
        cols = slice(index * g, (index + 1) * g)
        shape = dataclasses.replace(self.model, num_heads=self.num_heads // count,
                                    num_kv_heads=self.num_kv_heads // count)
        meta = {**copy.deepcopy(self.meta), "shard": [index, count]}
        return Plan(shape, self.alpha[:, cols].tolist(), self.beta[:, cols].tolist(), granularity=self.granularity,
                    sink=self.sink, span_multiple=self.span_multiple, min_span=self.min_span, meta=meta)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"Plan(model={self.model.name or '?'}, L={self.num_layers}, H={self.num_heads}, "
            f"KVH={self.num_kv_heads}, granularity={self.granularity!r}, sink={self.sink})"
        )

    # ------------------------------------------------------------------ spans
    @staticmethod
    def _check_length(N: Any) -> int:
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(f"N (planned length in tokens) must be an integer >= 1, got {N!r}")
        return N

    def spans(self, N: int) -> torch.Tensor:
        """LongTensor [L, G]: every group's span (tokens) for a request planned for N tokens."""
        N = self._check_length(N)
        raw = _ceil_to_multiple(self.alpha + self.beta * N, self.span_multiple)
        return raw.clamp(min=self.min_span).clamp(max=N).to(torch.long)

    def span(self, layer: int, group: int, N: int) -> int:
        """Span (tokens) of one group of one layer at planned length N."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group must be in [0, {self.num_groups}), got {group}")
        return int(self.spans(N)[layer, group])

    def head_spans(self, N: int) -> torch.Tensor:
        """LongTensor [L, H]: the span (tokens) that masks each query head."""
        return self.spans(N)[:, self.group_of_head()]

    def cache_spans(self, N: int) -> torch.Tensor:
        """LongTensor [L, KVH]: KV-cache slots per KV head (the largest span of its query heads)."""
        hs = self.head_spans(N)
        return hs.view(self.num_layers, self.num_kv_heads, -1).amax(dim=-1)

    def kv_density(self, N: int) -> float:
        """KV-cache memory at length N relative to a dense cache: mean over KV heads of C/N."""
        return float(self.cache_spans(N).double().mean() / N)

    def attention_density(self, N: int) -> float:
        """Kept causal (i, j) pairs over all causal pairs at length N, over all query heads."""
        N = self._check_length(N)
        kept = kept_pairs(self.head_spans(N), self.sink, N)
        return float(kept.sum() / (kept.numel() * N * (N + 1) / 2))

    # ------------------------------------------------------------------ model check
    def check_model(self, config: Any) -> None:
        """Raise ValueError if the plan does not fit a model (transformers config or ModelShape)."""
        shape = self._shape(config)
        pairs = [
            ("num_layers", "cache slots" if shape.call_slots else "num_hidden_layers", self.num_layers,
             shape.num_layers),
            ("num_heads", "num_attention_heads", self.num_heads, shape.num_heads),
            ("num_kv_heads", "num_key_value_heads", self.num_kv_heads, shape.num_kv_heads),
        ]
        if self.model.head_dim is not None and shape.head_dim is not None:
            pairs.append(("head_dim", "head_dim", self.model.head_dim, shape.head_dim))
        if self.model.layer_indices != shape.layer_indices:
            pairs.append(("layers", "attention layers", list(self.model.layer_indices), list(shape.layer_indices)))
        if self.model.call_slots != shape.call_slots:
            pairs.append(("call_slots", "cache slots in call order", self.model.call_slots, shape.call_slots))
        if self.model.layer_heads != shape.layer_heads:
            pairs.append(("layer_heads", "query heads per attention layer", self.model.layer_heads, shape.layer_heads))
        wrong = [
            f"plan.model.{mine} = {ours} but the model has {theirs_name} = {theirs}"
            for mine, theirs_name, ours, theirs in pairs
            if ours != theirs
        ]
        if wrong:
            raise ValueError(
                f"plan {self.model.name or '(unnamed)'} does not fit model {shape.name or '(unnamed)'}: "
                + "; ".join(wrong)
            )

    # ------------------------------------------------------------------ summary
    def summary(self, lengths: Iterable[int] = (4096, 16384, 65536)) -> str:
        """A readable table: per layer, its distinct rules and spans/densities at a few lengths."""
        lengths = [self._check_length(n) for n in lengths]
        spans = {n: self.spans(n) for n in lengths}
        cache = {n: self.cache_spans(n) for n in lengths}
        lines = [
            f"moa-flex plan: {self.model.name or '(unnamed)'}",
            f"  layers {self.num_layers}, heads {self.num_heads}, KV heads {self.num_kv_heads}, "
            f"head_dim {self.model.head_dim}, granularity {self.granularity} (G={self.num_groups})",
            f"  sink {self.sink}, span_multiple {self.span_multiple}, min_span {self.min_span}",
        ]
        if self.meta.get("source"):
            lines.append(f"  source: {self.meta['source']}")
        head = f"{'layer':>5} {'rules':>5}  {'alpha/beta (count)':<34}" + "".join(
            f" {'spans@' + _fmt_len(n):>17} {'kv':>5}" for n in lengths
        )
        lines += ["", head, "-" * len(head)]
        for layer in range(self.num_layers):
            rules = sorted(
                {(float(a), float(b)) for a, b in zip(self.alpha[layer], self.beta[layer])}
            )
            counts = {
                r: sum(1 for a, b in zip(self.alpha[layer], self.beta[layer]) if (float(a), float(b)) == r)
                for r in rules
            }
            text = ", ".join(f"{a:g}/{b:g}({counts[(a, b)]})" for a, b in rules)
            if len(text) > 34:
                text = text[:31] + "..."
            row = f"{layer:>5} {len(rules):>5}  {text:<34}"
            for n in lengths:
                s = spans[n][layer]
                rng = f"{int(s.min())}-{int(s.max())}" if s.min() != s.max() else f"{int(s.min())}"
                row += f" {rng:>17} {float(cache[n][layer].double().mean()) / n:>5.2f}"
            lines.append(row)
        lines.append("")
        lines.append(f"{'length':>8} {'kv_density':>11} {'attention_density':>18}")
        for n in lengths:
            lines.append(f"{n:>8} {self.kv_density(n):>11.3f} {self.attention_density(n):>18.3f}")
        return "\n".join(lines)


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def kept_pairs(spans: torch.Tensor, sink: int, N: int) -> torch.Tensor:
    """Number of (i, j) pairs kept by the keep rule over N queries, for each span (closed form).

    Row i keeps min(i + 1, sink) sink keys plus min(W, i - sink + 1) window keys (W = span - sink).
    """
    s = min(sink, N)
    sink_part = s * (s + 1) // 2 + (N - s) * s
    w = (spans.to(torch.long) - sink).clamp(min=0)
    m = N - s  # rows with i >= sink; each keeps min(W, t) for t = 1..m
    wm = torch.minimum(w, torch.full_like(w, m))
    window_part = wm * (wm + 1) // 2 + (m - wm) * wm
    return (sink_part + window_part).to(torch.float64)
