"""The ragged per-head MoA KV cache (DESIGN.md, "The KV cache").

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
to step). Keys are stored after RoPE. Pad tokens are never cached: rows of a left-padded
batch start at their own first real token.

Writes go through two custom ops, ``moa_flex::cache_prefill`` (the kept tokens of a prompt)
and ``moa_flex::cache_append`` (one decoded token per row). Inside a graph compiled by
``moa_flex.compile`` the pass finds each layer's ``cache_append`` node and rewrites that
layer's attention into ``moa_flex::decode_attention`` over the cache tensors the append
node mutated (``passes/decode_pass.py``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .plan import Plan


def cache_argument(forward: Callable) -> str:
    """The name under which a transformers forward takes its ``Cache``: ``cache`` from
    transformers 5.24 on (``past_key_values`` is its deprecated alias there), before that
    ``past_key_values``."""
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def slot_positions(caps: torch.Tensor, offsets: torch.Tensor, sink: int, last: torch.Tensor) -> torch.Tensor:
    """Logical position held by every slot once positions ``0 .. last[b]`` were written
    through the slot map: LongTensor ``[B, S]``, -1 for a slot that holds nothing.

    ``caps`` [B, G] slots used per row and group; ``offsets`` [G + 1] group starts in the flat
    slot axis (S = offsets[-1]); ``last`` [B] the newest position per row (-1: nothing yet).
    """
    B, G = caps.shape
    S = int(offsets[-1])
    dev = caps.device
    widths = (offsets[1:] - offsets[:-1]).to(dev)
    group = torch.repeat_interleave(torch.arange(G, device=dev), widths, output_size=S)  # [S]
    local = torch.arange(S, device=dev) - offsets[:-1].to(dev)[group]  # slot index inside its group
    cap = caps.long()[:, group]  # [B, S]
    i = last.long().view(B, 1)
    s = local.view(1, S).expand(B, S)
    ring = (cap - sink).clamp(min=1)
    pos = torch.where(s < sink, s, i - torch.remainder(i - s, ring))
    valid = (s < cap) & (s <= i)
    return torch.where(valid, pos, torch.full_like(pos, -1))


def _flat_group_index(offsets: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Group of every flat slot: LongTensor [S]."""
    widths = (offsets[1:] - offsets[:-1]).to(device)
    return torch.repeat_interleave(torch.arange(len(widths), device=device), widths, output_size=int(offsets[-1]))


@torch.library.custom_op("moa_flex::cache_prefill", mutates_args=("keys", "values", "length"))
def cache_prefill(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    pads: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, sink: int,
) -> None:
    """Write the kept tokens of a prompt into an empty layer cache.

    ``k_new``/``v_new`` [B, G, Q, D] (after RoPE; row b's first ``pads[b]`` tokens are padding),
    ``keys``/``values`` [B, S, D] the layer's flat cache; ``length`` [B] becomes the real tokens
    per row. Slots that end up holding nothing are zeroed.
    """
    B, G, Q, _ = k_new.shape
    real = Q - pads.long()  # [B] real tokens per row
    pos = slot_positions(caps, offsets, sink, real - 1)  # [B, S]
    group = _flat_group_index(offsets, keys.device)  # [S]
    src = (pads.long().view(B, 1) + pos.clamp(min=0)).clamp(max=Q - 1)  # padded index of each slot's token
    for cache, new in ((keys, k_new), (values, v_new)):
        rows = new[torch.arange(B, device=new.device).view(B, 1), group.view(1, -1), src]  # [B, S, D]
        cache.copy_(torch.where((pos >= 0).unsqueeze(-1), rows, torch.zeros_like(rows)))
    length.copy_(real)


@cache_prefill.register_fake
def _(keys, values, length, k_new, v_new, pads, caps, offsets, sink):  # noqa: ANN001, ANN202
    return None


def cache_append_reference(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    caps: torch.Tensor, offsets: torch.Tensor, sink: int,
) -> None:
    """The twin of ``moa_flex::cache_append`` in plain torch (the CPU implementation and the
    oracle of the Triton kernel, ``moa_flex.kernels.append``)."""
    B, G = caps.shape
    p = length.long().view(B, 1)  # [B, 1]
    cap = caps.long()
    slot = torch.where(p < sink, p, sink + torch.remainder(p - sink, (cap - sink).clamp(min=1)))  # [B, G]
    flat = offsets[:-1].to(keys.device).long().view(1, G) + slot  # [B, G]
    rows = torch.arange(B, device=keys.device).view(B, 1).expand(B, G)
    keys[rows, flat] = k_new[:, :, 0].to(keys.dtype)
    values[rows, flat] = v_new[:, :, 0].to(values.dtype)
    length.add_(1)


@torch.library.custom_op("moa_flex::cache_append", mutates_args=("keys", "values", "length"))
def cache_append(
    keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    spans: torch.Tensor, caps: torch.Tensor, offsets: torch.Tensor, sink: int,
) -> None:
    """Write one new token per row (``k_new``/``v_new`` [B, G, 1, D], logical position
    ``length[b]``) into its slot of every group, then ``length += 1``. CUDA: one Triton
    kernel (``moa_flex.kernels.append``); CPU: :func:`cache_append_reference`.

    ``spans`` [B, H] is not used here: it is the layout the compile pass hands, with the
    tensors this op mutated, to the layer's decode attention.
    """
    if keys.device.type == "cuda":
        from .kernels.append import cache_append_triton

        cache_append_triton(keys, values, length, k_new, v_new, caps, offsets, sink)
    else:
        cache_append_reference(keys, values, length, k_new, v_new, caps, offsets, sink)


@cache_append.register_fake
def _(keys, values, length, k_new, v_new, spans, caps, offsets, sink):  # noqa: ANN001, ANN202
    return None


class MoaCacheLayer(CacheLayerMixin):
    """One layer's ragged cache: flat ``keys``/``values`` [B, S, D] and its layout tensors.

    ``caps`` [B, G] slots per row and group, ``spans`` [B, H] per-row query-head spans,
    ``offsets`` [G + 1] group starts, ``length`` [B] real tokens cached per row (the logical
    position of the next token), ``pads`` [B] left-pad tokens of the prompt per row.
    """

    is_compileable = False  # HF must neither auto-compile nor build 4-D masks for it
    is_sliding = False
    is_croppable = False

    def __init__(self, caps: torch.Tensor, spans: torch.Tensor, pads: torch.Tensor, sink: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        widths = caps.max(dim=0).values.long()
        B = caps.shape[0]
        self.batch_size = B
        self.sink = sink
        self.dtype, self.device = dtype, torch.device(device)
        self.offsets = torch.cat([widths.new_zeros(1), widths.cumsum(0)]).to(self.device, torch.int32)
        S = int(self.offsets[-1])
        self.keys = torch.zeros(B, S, head_dim, dtype=dtype, device=self.device)
        self.values = torch.zeros(B, S, head_dim, dtype=dtype, device=self.device)
        self.caps = caps.to(self.device, torch.int32).contiguous()
        self.spans = spans.to(self.device, torch.int32).contiguous()
        self.pads = pads.to(self.device, torch.long).contiguous()
        self.length = torch.zeros(B, dtype=torch.long, device=self.device)
        self.filled = False
        self.is_initialized = True
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.caps, self.spans, self.pads, self.length, self.offsets):
                torch._dynamo.mark_static_address(t)
        if self.device.type == "cuda":
            from .kernels.decode import prepare_work

            prepare_work(self.offsets, B)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocated up front (the planned length is known): nothing to do."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill (first call): cache the prompt's kept tokens, return the prompt's K/V for
        prefill attention. Decode (one token per row): write it, return it; the compile pass
        turns the layer's attention into ragged decode over this cache."""
        if not torch.compiler.is_compiling():
            raise RuntimeError(
                "a MoaCache is only usable by a model compiled with moa_flex.compile (its attention runs in the "
                "rewritten graph); this forward ran eagerly"
            )
        if key_states.shape[-2] == 1 and self.filled:
            torch.ops.moa_flex.cache_append(self.keys, self.values, self.length, key_states, value_states,
                                            self.spans, self.caps, self.offsets, self.sink)
        elif not self.filled:
            torch.ops.moa_flex.cache_prefill(self.keys, self.values, self.length, key_states, value_states,
                                             self.pads, self.caps, self.offsets, self.sink)
        else:
            raise NotImplementedError(
                "moa-flex: a prefill of several tokens onto a filled MoA cache (multi-turn) is not supported; "
                "generate again from the whole conversation"
            )
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks cover the call's own tokens only: prefill attends the prompt, decode the cache."""
        return query_length, 0

    def get_seq_length(self) -> int:
        raise NotImplementedError  # answered by MoaCache (a Python count, never read in graphs)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()
        self.length.zero_()
        self.filled = False

    def memory_bytes(self) -> int:
        """Bytes of the K and V storage of this layer."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class MoaCache(Cache):
    """A transformers ``Cache`` holding a MoA plan's ragged per-group KV cache.

    Allocated once for the planned length ``planned_length`` (tokens: prompt + new tokens, or
    compile's ``max_length``) with static shapes. ``pads`` [B]: left-pad tokens of each row
    of the prompt; each row is planned for its own ``planned_length - pads[b]`` tokens.
    ``devices``: one device per layer (layers spread with device_map), or one for all.
    """

    def __init__(self, plan: Plan, batch_size: int, planned_length: int, *, pads: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, devices: Sequence[torch.device | str] | torch.device | str = "cpu",
                 head_dim: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if planned_length < 1:
            raise ValueError(f"planned_length must be >= 1 tokens, got {planned_length}")
        pads = torch.zeros(batch_size, dtype=torch.long) if pads is None else pads.detach().to("cpu", torch.long)
        if pads.shape != (batch_size,) or bool((pads < 0).any()) or bool((pads >= planned_length).any()):
            raise ValueError(f"pads must be [batch_size={batch_size}] in [0, planned_length), got {pads.tolist()}")
        head_dim = head_dim or plan.model.head_dim
        if not head_dim:
            raise ValueError("the plan has no head_dim; pass head_dim=")
        if isinstance(devices, (str, torch.device)):
            devices = [devices] * plan.num_layers
        if len(devices) != plan.num_layers:
            raise ValueError(f"devices: expected one per layer ({plan.num_layers}), got {len(devices)}")
        rows = [planned_length - int(p) for p in pads]
        caps = torch.stack([plan.cache_spans(n) for n in rows], dim=1)  # [L, B, G]
        spans = torch.stack([plan.head_spans(n) for n in rows], dim=1)  # [L, B, H]
        layers = [MoaCacheLayer(caps[l], spans[l], pads, plan.sink, head_dim, dtype, devices[l])
                  for l in range(plan.num_layers)]
        super().__init__(layers=layers)
        self.plan = plan
        self.planned_length = planned_length
        self.pads = pads
        self.head_dim = head_dim
        self.dtype = dtype
        self.seen_tokens = 0  # tokens (padded width) run through the model so far; Python-side only
        self.decode_steps = 0  # decode steps in a row with the same call signature (moa_flex.compile)
        self.decode_signature: tuple | None = None
        # the request's decode step captured as a CUDA graph (moa_flex.step_graph); it reads
        # everything from this cache's tensors, so it stays valid for the next request (reset)
        self.step_graph: Any = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of every layer (storage and layout)."""
        return [t for layer in self.layers
                for t in (layer.keys, layer.values, layer.caps, layer.spans, layer.pads, layer.length, layer.offsets)]

    @property
    def filled(self) -> bool:
        return all(layer.filled for layer in self.layers)

    def mark_filled(self, tokens: int) -> None:
        """Called after each forward by moa_flex's forward wrapper (outside any graph)."""
        for layer in self.layers:
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
        """Bytes of all K and V storage, measured on the tensors."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def dense_memory_bytes(self) -> int:
        """Bytes a dense cache of the same batch and planned length would take (K and V)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.plan.num_layers * self.batch_size * self.plan.num_kv_heads * self.planned_length * self.head_dim * elem

    def slots(self) -> int:
        """Slots allocated per row, summed over layers and groups."""
        return sum(int(layer.offsets[-1]) for layer in self.layers)
