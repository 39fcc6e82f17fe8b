"""The ragged per-head MoA KV cache (docs/DESIGN.md, "The KV cache").

Per layer, per batch row, per KV-head group ``g``: ``C_g`` slots, ``C_g`` the group's cache
span at the row's planned length (the largest span of its query heads). Logical position
``p`` (0 = first real token of the row) lives in slot

    slot(p) = p                                   if p < sink
            = sink + (p - sink) mod (C_g - sink)  otherwise

so each group keeps its sink and its last ``C_g - sink`` tokens, and the cache holds no
pointers: the position a slot holds follows from the row's current position. Storage is one
flat K and one flat V tensor per layer, ``[B, sum_g W_g, D]``, group ``g`` at slots
``offsets[g] .. offsets[g + 1] - 1``; the widths ``W_g`` are the caps of the longest row, so
shapes are static for a whole request (torch.compile and CUDA graphs see no change from step
to step). Keys are stored after RoPE. An FP8 cache (``kv_dtype=torch.float8_e4m3fn``) stores
K and V at one byte per value with one float32 scale per slot beside each
(``k_scale``/``v_scale`` [B, S]; :mod:`moa_flex.kernels.quant`). Pad tokens are never cached: rows of a left-padded
batch start at their own first real token.

Writes go through two custom ops (:mod:`moa_flex.runtime.ops`): ``moa_flex::cache_extend``
(what the sinks and rings keep of a chunk of several tokens: a prompt, one of its chunks, a
later turn) and ``moa_flex::cache_append`` (one decoded token per row). Inside a graph
compiled by ``moa_flex.compile`` the passes find each layer's write and rewrite that layer's
attention: ``moa_flex::chunk_prefill`` (``passes/prefill_pass.py``: the chunk's attention over
the cache, then its write, in one op) or ``moa_flex::ragged_decode`` after the append
(``passes/decode_pass.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from moa_flex.architecture import (
    OWN_CACHE_TYPES, WITH_STATE_LAYER_TYPES, cached_key_dim, cached_value_dim, codebook_rows, decoder_layers,
    index_ring_width, key_bias_columns, key_bias_problem, kv_sources, latent_attention, layer_types,
    selecting_layers, text_config,
)
from moa_flex.kernels.decode import default_tiling, prepare_work
from moa_flex.kernels.quant import SCALE_DTYPE, is_quantized
from moa_flex.kernels.quant import kv_dtype as parse_kv_dtype
from moa_flex.plan import Plan

from . import ops  # noqa: F401  (registers torch.ops.moa_flex.cache_extend / cache_append)


class MoaCacheLayer(CacheLayerMixin):
    """One layer's ragged cache: flat ``keys``/``values`` [B, S, D] and its layout tensors.

    ``caps`` [B, G] slots per row and group, ``spans`` [B, H] per-row query-head spans,
    ``offsets`` [G + 1] group starts, ``length`` [B] real tokens cached per row (the logical
    position of the next token). The rows' left padding is the cache's (``MoaCache.pads``): the
    prefill pass reads each chunk's from its mask. ``dtype``: the storage dtype; FP8 adds
    ``k_scale``/``v_scale`` float32 [B, S] (None otherwise).
    """

    is_compileable = False  # HF must neither auto-compile nor build 4-D masks for it
    is_sliding = False
    is_croppable = False

    def __init__(self, caps: torch.Tensor, spans: torch.Tensor, sink: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, value_dim: int | None = None, latent: bool = False,
                 index: tuple[int, torch.dtype] | None = None) -> None:
        super().__init__()
        self.latent = latent  # latent attention: the model hands over (latent, rotary key), see update
        widths = caps.max(dim=0).values.long()
        B = caps.shape[0]
        self.batch_size = B
        self.sink = sink
        self.dtype, self.device = dtype, torch.device(device)
        self.offsets = torch.cat([widths.new_zeros(1), widths.cumsum(0)]).to(self.device, torch.int32)
        S = int(self.offsets[-1])
        self.keys = torch.zeros(B, S, head_dim, dtype=dtype, device=self.device)
        self.values = torch.zeros(B, S, value_dim or head_dim, dtype=dtype, device=self.device)
        quant = is_quantized(dtype)
        self.k_scale = torch.zeros(B, S, dtype=SCALE_DTYPE, device=self.device) if quant else None
        self.v_scale = torch.zeros(B, S, dtype=SCALE_DTYPE, device=self.device) if quant else None
        self.caps = caps.to(self.device, torch.int32).contiguous()
        self.spans = spans.to(self.device, torch.int32).contiguous()
        self.length = torch.zeros(B, dtype=torch.long, device=self.device)
        # an indexer's key of each kept token (index = (width, dtype)), with a count of its own:
        # DeepSeek Sparse Attention's in the latent's slots; Qwen4-Exp's (key and rotary terms) in
        # the first KV group's slots only, since an indexed layer's groups share one rule and so
        # one slot map (ring_caps, ring_offsets: that group's layout)
        self.index_keys = self.index_length = self.chunk_pads = None
        self.ring_caps, self.ring_offsets = self.caps[:, :1], self.offsets[:2]
        if index is not None:
            self.index_keys = torch.zeros(B, int(widths[0]), index[0], dtype=index[1], device=self.device)
            self.index_length = torch.zeros(B, dtype=torch.long, device=self.device)
            # a prefill chunk's leading left pads per row, set by the forward before a chunk over
            # tokens already cached (whose call carries no 2-D padding mask: runtime/forward.py)
            self.chunk_pads = torch.zeros(B, dtype=torch.long, device=self.device)
        self.filled = False
        self.is_initialized = True
        # layers that attend this layer's keys and values (KV sharing): each keeps its own MoA
        # cache of them, which this layer's update writes (in plan order) after its own
        self.readers: list[MoaCacheLayer] = []
        if not torch.compiler.is_compiling():
            for t in self.tensors():
                torch._dynamo.mark_static_address(t)
        if self.device.type == "cuda":
            prepare_work(self.offsets, B, default_tiling(head_dim, value_dim or head_dim, quant))

    def tensors(self) -> list[torch.Tensor]:
        """Storage (values, an FP8 cache's scales, an indexer's keys) and layout tensors."""
        scales = [] if self.k_scale is None else [self.k_scale, self.v_scale]
        index = [] if self.index_keys is None else [self.index_keys, self.index_length, self.chunk_pads]
        return [self.keys, self.values, *scales, *index, self.caps, self.spans, self.length, self.offsets]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocated up front (the planned length is known): nothing to do."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (decode): write it (``moa_flex::cache_append``) and return it; the
        decode pass turns the layer's attention into ragged decode over this cache. Several
        tokens (a prefill chunk, a later turn): record the write (``moa_flex::cache_extend``)
        and return the chunk's K/V; the prefill pass replaces the write and the layer's
        attention by one ``moa_flex::chunk_prefill`` (attention over the cache as it was, then
        the write). The branch depends on the shape only, so each graph is traced once.

        A latent-attention layer (``latent``) is handed the latent [B, 1, S, r] and the rotary key
        [B, 1, S, rope] instead, and caches them as one KV head: keys the two side by side, values
        the latent (passes/latent.py attends over them with the expansion absorbed); the model
        gets its two tensors back, as from transformers' cache.

        The layers that read this one's keys and values (:attr:`readers`, KV sharing) are written
        the same tokens, each into its own cache, after this layer's."""
        if not torch.compiler.is_compiling():
            raise RuntimeError(
                "a MoaCache is only usable by a model compiled with moa_flex.compile (its attention runs in the "
                "rewritten graph); this forward ran eagerly"
            )
        k_new, v_new = key_states, value_states
        if self.latent:
            k_new, v_new = torch.cat([key_states, value_states], dim=-1), key_states
        over = self.selects_over_cache(key_states)
        held = None
        if over:  # read before the write
            held = self.held_latent(key_states, value_states) if self.latent else self.held_keys_values(key_states)
        for layer in (self, *self.readers):
            layer.write(k_new, v_new, self.chunk_pads if over else None)
        if over:
            return torch.cat([held[0], key_states], dim=-2), torch.cat([held[1], value_states], dim=-2)
        return key_states, value_states

    def selects_over_cache(self, key_states: torch.Tensor) -> bool:
        """Whether this call is a prefill chunk of an indexed layer (DeepSeek Sparse Attention) over
        a cache that holds tokens: a Python flag (``filled``) Dynamo guards, so the first prefill and
        the later chunks each trace once. Such a call gets the cache's slots before its own tokens
        (see :meth:`held_latent`), so that the indexer scores every kept token."""
        return self.index_keys is not None and self.filled and key_states.shape[-2] > 1

    def held_latent(self, like_k: torch.Tensor, like_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent and rotary key of every slot, [B, 1, S, r] and [B, 1, S, rope] in the call's
        dtype (an FP8 cache's dequantized): the keys the model's expansion sees in a chunk over the
        cache. The prefill pass replaces that attention by the chunk kernel over the cache itself,
        so these copies are dead code in the compiled graph (passes/indexed.py)."""
        keys = self.keys.float() * self.k_scale.unsqueeze(-1) if self.k_scale is not None else self.keys
        keys = keys.to(like_k.dtype).unsqueeze(1)
        rank = like_k.shape[-1]
        return keys[..., :rank], keys[..., rank:rank + like_v.shape[-1]]

    def held_keys_values(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of every slot, [B, G, W, D] each in ``like``'s dtype (an FP8 cache's
        dequantized), for a layer of G KV groups of one layout (an indexed layer has one rule): what
        the model attends in a chunk over the cache, which the prefill pass replaces by the chunk
        kernel over the cache itself (dead code in the compiled graph, as :meth:`held_latent`)."""
        G = self.offsets.shape[0] - 1

        def held(t: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
            t = t.float() * scale.unsqueeze(-1) if scale is not None else t
            return t.to(like.dtype).view(t.shape[0], G, t.shape[1] // G, t.shape[2])

        return held(self.keys, self.k_scale), held(self.values, self.v_scale)

    @property
    def indexer_position_ids(self) -> None:
        """Qwen4-Exp keeps every past token's position ids on its first indexed layer's cache and
        rotates its queries over them all; a MoA cache keeps each kept token's rotary terms in
        the indexer's ring instead (moa_flex/runtime/traceable.py), so it hands back no history."""
        return None

    @indexer_position_ids.setter
    def indexer_position_ids(self, value: Any) -> None:
        """Dropped: see the getter."""

    def update_indexer(self, key_states: torch.Tensor) -> torch.Tensor:
        """An indexer's keys [B, T, D] (DeepSeek Sparse Attention), written into the ring beside
        the latent (``moa_flex::index_append`` / ``index_extend``, the same slot map). One token a
        row (decode): the whole ring [B, S, D] comes back, so that the indexer scores every slot
        (the decode pass masks the slots the rule does not keep, passes/indexed.py); several (the
        prefill of an empty cache): the chunk's own keys, as from transformers' cache."""
        if self.index_keys is None:
            raise ValueError("this MoA cache keeps no indexer keys: it was built without the model's config")
        if key_states.shape[-1] != self.index_keys.shape[-1]:
            raise ValueError(f"an indexer's keys of width {key_states.shape[-1]} for a ring of width "
                             f"{self.index_keys.shape[-1]} (architecture.index_ring_width)")
        if key_states.shape[-2] == 1:
            torch.ops.moa_flex.index_append(self.index_keys, self.index_length, key_states, self.ring_caps,
                                            self.ring_offsets, self.sink)
            return self.index_keys
        if self.selects_over_cache(key_states):  # the ring's slots, then the chunk's keys (read before the write)
            every = torch.cat([self.index_keys.to(key_states.dtype), key_states], dim=-2)
            torch.ops.moa_flex.index_extend(self.index_keys, self.index_length, key_states, self.chunk_pads,
                                            self.ring_caps, self.ring_offsets, self.sink)
            return every
        torch.ops.moa_flex.index_extend(self.index_keys, self.index_length, key_states,
                                        torch.zeros_like(self.index_length), self.ring_caps, self.ring_offsets,
                                        self.sink)
        return key_states

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor, chunk_pads: torch.Tensor | None = None) -> None:
        """Record the write of new tokens' K/V [B, G, T, D]: ``cache_append`` for one token a row,
        ``cache_extend`` for several (see :meth:`update`; ``chunk_pads`` [B]: the chunk's left
        pads where no padding mask gives them, else zeros that the prefill pass replaces)."""
        if k_new.shape[-2] == 1:
            torch.ops.moa_flex.cache_append(self.keys, self.values, self.length, k_new, v_new,
                                            self.spans, self.caps, self.offsets, self.sink, self.k_scale, self.v_scale)
        else:
            torch.ops.moa_flex.cache_extend(self.keys, self.values, self.length, k_new, v_new,
                                            torch.zeros_like(self.length) if chunk_pads is None else chunk_pads,
                                            self.spans, self.caps, self.offsets,
                                            self.sink, self.k_scale, self.v_scale)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks cover the call's own tokens only: prefill attends the prompt, decode the cache."""
        return query_length, 0

    def get_seq_length(self) -> int:
        raise NotImplementedError  # answered by MoaCache (a Python count, never read in graphs)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for t in (self.keys, self.values, self.k_scale, self.v_scale, self.length, self.index_keys, self.index_length,
                  self.chunk_pads):
            if t is not None:
                t.zero_()
        self.filled = False

    def memory_bytes(self) -> int:
        """Bytes of the K and V storage of this layer (an FP8 cache's scales and an indexer's keys included)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.k_scale, self.v_scale,
                                                          self.index_keys) if t is not None)


class MoaCache(Cache):
    """A transformers ``Cache`` holding a MoA plan's ragged per-group KV cache.

    Allocated once for the planned length ``planned_length`` (tokens: prompt + new tokens, or
    compile's ``max_length``) with static shapes. ``pads`` [B]: left-pad tokens of each row
    of the prompt; each row is planned for its own ``planned_length - pads[b]`` tokens.
    ``devices``: one device per planned layer (layers spread with device_map), or one for all.
    ``windows``: per planned layer the model's own pattern (``architecture.model_windows``: a
    sliding window > 0, chunked local attention < 0, None); such a layer keeps at most
    ``sink + |window|`` slots per group (spans clamped alike, which keeps exactly the same keys:
    no key farther than the window is ever attended), so its cache is bounded by the window.
    ``dtype``: the model's compute dtype; ``kv_dtype``: the storage dtype (a torch dtype or
    ``"bf16"``, ``"fp16"``, ``"fp32"``, ``"fp8"``; default ``dtype``): FP8 keeps K and V at one
    byte per value with per-slot float32 scales, read back dequantized by every attention.

    A hybrid model's cache (the plan names its attention layers, ``plan.model.layers``) holds
    one layer per decoder layer, as transformers indexes them: a :class:`MoaCacheLayer` for
    each planned layer, and transformers' own cache layer (built from ``config``, which is then
    required) for each linear-attention, Mamba or convolution layer, whose state moa-flex
    leaves to the model. :attr:`moa_layers` lists the planned ones in plan order.

    KV sharing (Gemma 3n, Gemma 4: layers that attend another layer's keys and values,
    ``architecture.kv_sources`` from ``config``): each such layer keeps a MoA cache of its own,
    under its own rules, of the keys and values it reads; the source layer's update writes it.
    So every planned layer holds a cache, as ``Plan.kv_density`` counts them (the stock model
    caches only the source layers). Without ``config`` the compiled model refuses to run.
    """

    def __new__(cls, *args: Any, config: Any = None, **kwargs: Any) -> "MoaCache":
        """A model whose forward accepts only its own cache class (MiniMax) gets a MoaCache that
        is also one (:func:`model_cache_class`)."""
        own = model_cache_class(config) if cls is MoaCache else None
        return super().__new__(own or cls)

    def __init__(self, plan: Plan, batch_size: int, planned_length: int, *, pads: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, devices: Sequence[torch.device | str] | torch.device | str = "cpu",
                 head_dim: int | None = None, config: Any = None, kv_dtype: torch.dtype | str | None = None,
                 windows: Sequence[int | None] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if planned_length < 1:
            raise ValueError(f"planned_length must be >= 1 tokens, got {planned_length}")
        pads = torch.zeros(batch_size, dtype=torch.long) if pads is None else pads.detach().to("cpu", torch.long)
        if pads.shape != (batch_size,) or bool((pads < 0).any()) or bool((pads >= planned_length).any()):
            raise ValueError(f"pads must be [batch_size={batch_size}] in [0, planned_length), got {pads.tolist()}")
        storage = parse_kv_dtype(kv_dtype) or dtype
        problem = key_bias_problem(config, planned_length, is_quantized(storage))
        if problem:
            raise ValueError(problem)
        head_dims = _head_dims(plan, head_dim, config)
        value_dims = _value_dims(config, head_dims, decoder_layers(config, plan.model))
        if isinstance(devices, (str, torch.device)):
            devices = [devices] * plan.num_layers
        if len(devices) != plan.num_layers:
            raise ValueError(f"devices: expected one per layer ({plan.num_layers}), got {len(devices)}")
        # "cuda" names the current GPU: the cache records the device its tensors live on ("cuda:0"),
        # which is what a model's parameters report
        concrete = {str(d): torch.empty(0, device=d).device for d in set(map(str, devices))}
        devices = [concrete[str(d)] for d in devices]
        rows = [planned_length - int(p) for p in pads]
        caps = torch.stack([plan.cache_spans(n) for n in rows], dim=1)  # [L, B, G]
        spans = torch.stack([plan.head_spans(n) for n in rows], dim=1)  # [L, B, H]
        caps, spans = _bounded_by_windows(caps, spans, plan.sink, windows)
        latent = config is not None and latent_attention(config) is not None
        width = index_ring_width(config) if config is not None else None
        index = (width, dtype) if width else None  # the indexer's keys stay in the model's dtype
        indexed = selecting_layers(config, decoder_layers(config, plan.model)) if index else [False] * plan.num_layers
        # a layer of fewer query heads than the plan's most (dots3) takes its first: one rule a layer
        self.moa_layers = [MoaCacheLayer(caps[l], spans[l][:, :plan.model.heads_of(l)], plan.sink, head_dims[l], storage,
                                         devices[l], value_dims[l], latent, index if indexed[l] else None)
                           for l in range(plan.num_layers)]
        self.kv_sources = kv_sources(config, plan.model) if config is not None else {}
        for reader, source in sorted(self.kv_sources.items()):
            self.moa_layers[source].readers.append(self.moa_layers[reader])
        Cache.__init__(self, layers=_model_layers(plan, self.moa_layers, config))  # not a mixed-in model cache's
        self.plan = plan
        self.planned_length = planned_length
        self.pads = pads
        self.codebook_rows = codebook_rows(config) if config is not None else 1  # input rows per cache row (MusicGen)
        self.head_dims = head_dims  # per planned layer: keys'
        self.value_dims = value_dims  # and values' (MiMo-V2's differ)
        self.dtype = dtype
        self.kv_dtype = storage
        self.seen_tokens = 0  # tokens (padded width) run through the model so far; Python-side only
        self.decode_steps = 0  # decode steps in a row with the same call signature (moa_flex.compile)
        self.decode_signature: tuple | None = None
        # the request's decode step captured as a CUDA graph (moa_flex.step_graph); it reads
        # everything from this cache's tensors, so it stays valid for the next request (reset)
        self.step_graph: Any = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of every layer (storage and layout)."""
        return [t for layer in self.moa_layers for t in layer.tensors()]

    def state_tensors(self) -> list[torch.Tensor]:
        """The conv and recurrent state tensors of a hybrid's layers (transformers' own, or beside
        the MoA K/V in a layer that has both; allocated by the model's first forward over the cache)."""
        return [t for layer in self.layers
                for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {}))
                for t in states.values() if isinstance(t, torch.Tensor)]

    @property
    def filled(self) -> bool:
        return all(layer.filled for layer in self.moa_layers)

    def update_indexer(self, key_states: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """An indexer's keys [B, T, D] for decoder layer ``layer_idx`` (DeepSeek Sparse Attention,
        Qwen4-Exp): :meth:`MoaCacheLayer.update_indexer` of its cache layer (by list index: traced
        graphs read the plan's layer list as symbolic integers, which ``plan_layer`` cannot match)."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, MoaCacheLayer):
            raise ValueError(f"decoder layer {layer_idx} has an indexer but no MoA cache layer (not planned)")
        return layer.update_indexer(key_states)

    def mark_filled(self, tokens: int) -> None:
        """Called after each forward by moa_flex's forward wrapper (outside any graph)."""
        for layer in self.moa_layers:
            layer.filled = True
        self.seen_tokens += tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far per row, pads included (as HF counts them)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.planned_length

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0
        self.decode_steps = 0
        self.decode_signature = None

    def memory_bytes(self) -> int:
        """Bytes of all K and V storage (with an FP8 cache's scales), measured on the tensors."""
        return sum(layer.memory_bytes() for layer in self.moa_layers)

    def dense_memory_bytes(self) -> int:
        """Bytes a dense cache of the same batch and planned length would take (K and V, and an
        indexer's key per token where the layers keep one)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        dims = sum(self.head_dims) + sum(self.value_dims)
        index = sum(l.index_keys.shape[-1] * l.index_keys.element_size() for l in self.moa_layers
                    if l.index_keys is not None)
        return (dims * self.plan.num_kv_heads * elem + index) * self.batch_size * self.planned_length

    def slots(self) -> int:
        """Slots allocated per row, summed over layers and groups."""
        return sum(int(layer.offsets[-1]) for layer in self.moa_layers)


def _bounded_by_windows(caps: torch.Tensor, spans: torch.Tensor, sink: int, windows: Sequence[int | None] | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """caps [L, B, G] and spans [L, B, H] of layers with a window of their own clamped to
    ``sink + |window|`` (a kept key is within the window: the keep rule is unchanged)."""
    if windows is None:
        return caps, spans
    if len(windows) != caps.shape[0]:
        raise ValueError(f"windows: expected one per planned layer ({caps.shape[0]}), got {len(windows)}")
    caps, spans = caps.clone(), spans.clone()
    for layer, w in enumerate(windows):
        if w:
            caps[layer].clamp_(max=sink + abs(int(w)))
            spans[layer].clamp_(max=sink + abs(int(w)))
    return caps, spans


def _head_dims(plan: Plan, head_dim: int | None, config: Any) -> list[int]:
    """Head dim of every planned layer: ``head_dim``, the plan's, or (a config whose layers
    differ in it, Gemma 4) each layer's own from ``config``."""
    if head_dim or plan.model.head_dim:
        return [int(head_dim or plan.model.head_dim)] * plan.num_layers
    per_layer = getattr(text_config(config), "per_layer_config", None) if config is not None else None
    if per_layer is None:
        raise ValueError("the plan has no head_dim (its layers differ in it): pass head_dim= or the model's config=")
    return [int(cached_key_dim(config, per_layer[i].head_dim, i)) for i in decoder_layers(config, plan.model)]


def _value_dims(config: Any, head_dims: list[int], layers: Sequence[int]) -> list[int]:
    """Value head dim of every planned layer (``layers``: their decoder-layer indices): the
    config's ``v_head_dim`` where it has one (MiMo-V2-Flash: 128 beside keys of 192), else the
    layer's head dim; as wide as the attention call reads them (DiffLlama: twice; latent
    attention: the layer's latent, ``architecture.cached_value_dim``)."""
    v = getattr(text_config(config), "v_head_dim", None) if config is not None else None
    dims = [v] * len(head_dims) if isinstance(v, int) and v > 0 else [d - key_bias_columns(config) for d in head_dims]
    if config is None:
        return dims
    return [int(cached_value_dim(config, d, i)) for d, i in zip(dims, layers)]


def _with_state(config: Any, num_layers: int) -> bool:
    """Whether some decoder layer holds attention and a recurrent state side by side."""
    types = layer_types(config, num_layers) if config is not None else None
    return bool(types) and any(t in WITH_STATE_LAYER_TYPES for t in types)


def _model_layers(plan: Plan, moa_layers: list[MoaCacheLayer], config: Any) -> list[CacheLayerMixin]:
    """One cache layer per decoder layer: the planned layers' MoA layers (with transformers'
    conv/recurrent state beside them where the layer has both: such layers replace their entry
    of ``moa_layers`` in place), and for a hybrid's other layers the cache layers transformers
    itself builds for them from ``config``."""
    shape = plan.model
    if shape.layers is None and not _with_state(config, shape.num_layers):
        return list(moa_layers)
    if config is None:
        raise ValueError(f"the plan covers decoder layers {list(shape.layer_indices)} of {shape.model_layers} (a "
                         "hybrid): MoaCache needs config= (the model's config) to build the other layers' caches")
    from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin

    own = DynamicCache(config=config).layers  # transformers' layer for each decoder layer, nothing allocated yet
    if len(own) < shape.model_layers:
        raise ValueError(f"transformers builds {len(own)} cache layers for this config, the plan expects "
                         f"{shape.model_layers} decoder layers")
    layers: list[CacheLayerMixin] = list(own[:shape.model_layers])
    for p, i in enumerate(shape.layer_indices):
        if isinstance(own[i], LinearAttentionCacheLayerMixin):  # attention and a state in one layer
            moa_layers[p] = _state_layer_class()(moa_layers[p], own[i].number_of_states)
        layers[i] = moa_layers[p]
    return layers


def _state_layer_class() -> type:
    """:class:`MoaCacheLayer` with transformers' linear-attention state beside it (a class made
    on first use: transformers' ``LinearAttentionLayer`` is imported lazily)."""
    global _STATE_LAYER_CLASS
    if _STATE_LAYER_CLASS is None:
        from transformers.cache_utils import LinearAttentionLayer

        class MoaStateCacheLayer(MoaCacheLayer, LinearAttentionLayer):
            """A planned layer that also holds a linear-attention / Mamba state (``hybrid`` layer
            types): the MoA K/V of :class:`MoaCacheLayer` and transformers' conv / recurrent states,
            which the model updates through the state methods it inherits."""

            def __init__(self, moa: MoaCacheLayer, number_of_states: int) -> None:
                LinearAttentionLayer.__init__(self, number_of_states=number_of_states)
                self.__dict__.update(moa.__dict__)  # the MoA layer's tensors, device and dtype
                # the token count lives on the layer's device (a decode step's graph adds to it);
                # transformers before 5.2x keeps no count in the layer
                if hasattr(self, "cumulative_length_linear"):
                    self.cumulative_length_linear = self.cumulative_length_linear.to(self.device)
                    if not torch.compiler.is_compiling():
                        torch._dynamo.mark_static_address(self.cumulative_length_linear)

            def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
                if kwargs:  # a state's first update (the MoA storage is allocated up front)
                    LinearAttentionLayer.lazy_initialization(self, **kwargs)

            def reset(self) -> None:
                MoaCacheLayer.reset(self)
                LinearAttentionLayer.reset(self)

        _STATE_LAYER_CLASS = MoaStateCacheLayer
    return _STATE_LAYER_CLASS


_STATE_LAYER_CLASS: type | None = None
_MINIMAX_CACHE_CLASS: type | None = None


def model_cache_class(config: Any) -> type | None:
    """The MoaCache subclass for a model whose forward refuses any cache but its own class, or
    None. MiniMax (``MiniMaxCache``: its lightning-attention layers keep their state in the
    cache's ``linear_cache`` list, not in cache layers): a MoaCache that is a ``MiniMaxCache``
    too, its list holding one entry per decoder layer, unset (``[]``, read as None) until the
    layer's first forward and after :meth:`reset`. The state tensors are replaced at every step,
    so such a model's decode steps run without CUDA graphs (``architecture.step_graph_problem``)."""
    global _MINIMAX_CACHE_CLASS
    if config is None or getattr(text_config(config), "model_type", None) not in OWN_CACHE_TYPES:
        return None
    if _MINIMAX_CACHE_CLASS is None:
        from transformers.models.minimax.modeling_minimax import MiniMaxCache

        class MoaMiniMaxCache(MoaCache, MiniMaxCache):
            """:class:`MoaCache` for MiniMax: the MoA layers, and MiniMax's linear-attention states."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                MoaCache.__init__(self, *args, **kwargs)
                self.linear_cache = [[] for _ in self.layers]

            def get_linear_cache(self, layer_idx: int) -> torch.Tensor | None:
                state = self.linear_cache[layer_idx]
                return None if isinstance(state, list) else state

            def reset(self) -> None:
                MoaCache.reset(self)
                self.linear_cache = [[] for _ in self.layers]

        _MINIMAX_CACHE_CLASS = MoaMiniMaxCache
    return _MINIMAX_CACHE_CLASS
