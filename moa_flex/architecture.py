"""What moa-flex reads from a transformers model and its config, beyond the attention shape.

Per decoder layer: the model's own sliding window, its logit soft-cap, and the device and
dtype of its attention weights (models spread with ``device_map``). The attention shape
itself is :class:`moa_flex.plan.ModelShape`.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Sequence

import torch

_LAYER_OF = re.compile(r"(?:layers|\bh|blocks|\blayer)\.(\d+)\.")  # a module inside decoder layer N
_TOWER = re.compile(r"(?:^|\.)(?:image_encoder|vision_model|vision_tower|visual|audio_tower|audio_encoder)\.")
_CROSS = re.compile(r"(?:encoder_attn|crossattention|cross_attn|cross_attention)(?:\.|$)")
_ATTN = re.compile(r"(?:layers|\bh|blocks|\blayer)\.(\d+)\.(?:self_attn|attn|attention|self_attention)$")


def softcaps(config: Any, num_layers: int) -> list[float]:
    """Per layer, the model's attention logit soft-cap (0.0: none), from ``attn_logit_softcapping``."""
    cap = getattr(config, "attn_logit_softcapping", None)
    return [float(cap) if cap else 0.0] * num_layers


# causal attention over the keys an indexer selects (DeepSeek Sparse Attention; the passes compose
# the plan with the selection: passes/indexed.py): transformers 5.25's name, and 5.17's
INDEXED_LAYER_TYPES = ("indexed_attention", "deepseek_sparse_attention")
MODELED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", *INDEXED_LAYER_TYPES)
# layers holding softmax attention and a linear-attention / Mamba state side by side (Falcon-H1,
# Zamba): planned as the attention type named, their state left to transformers
WITH_STATE_LAYER_TYPES = {"hybrid": "full_attention", "hybrid_sliding": "sliding_attention"}
# layers without softmax attention (linear attention, Mamba and other state-space layers,
# convolutions, MLP-only layers): a plan gives them no rules and their state stays transformers'
STATE_LAYER_TYPES = ("linear_attention", "conv", "mamba", "mlp", "moe", "dummy")


def text_config(config: Any) -> Any:
    """The config of the language model (a multimodal config's text config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def call_kv_heads(config: Any, num_heads: int, num_kv_heads: int) -> int:
    """KV heads the attention call receives, which a plan (and the MoA cache) rules: the
    config's, except for JetMoE, which tiles its KV heads over its ``top_k`` query experts
    before the call (``key_states.repeat(1, top_k, 1, 1)``): the call sees ``num_heads`` KV
    heads, one per query head, and the MoA cache stores them so (each of the model's KV heads
    ``top_k`` times: the passes write the tiled keys, passes/nodes.py ``cached_layout``); and
    MiMo-V2-Flash, whose sliding layers run twice the config's KV heads: the plan takes those,
    and the cache holds a full-attention layer's heads each twice (passes/nodes.py ``as_cached``)."""
    model_type = getattr(config, "model_type", "")
    if latent_attention(config) is not None:
        return 1  # one latent per token for all heads: the cache's one KV head
    if model_type == "jetmoe":
        return num_heads
    if model_type == "mimo_v2_flash" and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return 2 * num_kv_heads  # its sliding layers run twice the KV heads (the full ones: cached expanded)
    return num_kv_heads


def codebook_rows(config: Any) -> int:
    """Rows of ``input_ids`` per sequence: MusicGen's decoders take (batch x codebooks, length) ids
    and sum the codebooks' embeddings into one row per sequence (``num_codebooks``); 1 for others."""
    config = text_config(config)
    if getattr(config, "model_type", "") in ("musicgen_decoder", "musicgen_melody_decoder"):
        return int(config.num_codebooks)
    return 1


def sequence_mask(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """The 2-D padding mask per sequence [B, T] of a batch given as ``rows`` rows per sequence
    (MusicGen's codebooks, :func:`codebook_rows`): each sequence's first row. ValueError unless
    the rows divide evenly and a sequence's rows are padded alike; NotImplementedError for a
    padded batch of several sequences: transformers' MusicGen decoder pads sequence b by the
    mask's row b, not by its first row (b x ``rows``), so the stock model pads the wrong ones."""
    if mask.dim() != 2 or mask.shape[0] % rows:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not hold {rows} rows (codebooks) per sequence")
    grouped = mask.reshape(-1, rows, mask.shape[1])
    first = grouped[:, :1]
    if not bool((grouped == first).all()):
        raise ValueError("attention_mask: the codebook rows of a sequence must be padded alike")
    if grouped.shape[0] > 1 and not bool(first.bool().all()):
        raise NotImplementedError(
            f"a padded batch of several sequences with {rows} codebooks: transformers' MusicGen decoder takes the "
            f"padding of sequence b from the mask's row b, not from row b x {rows}, so the stock model pads the "
            "wrong sequences; run each sequence alone, or pass no padding")
    return first[:, 0]


VARIES = object()  # a config value that differs between layers (transformers' per-layer configs: dots3)


def layer_config_value(config: Any, name: str, layer: int | None = None) -> Any:
    """``config.<name>``, or decoder layer ``layer``'s where the config keeps per-layer configs
    (transformers' ``per_layer_config``: Gemma 4, dots3). Without ``layer``, :data:`VARIES`
    where the layers differ (transformers raises AmbiguousGlobalPerLayerAttributeError)."""
    config = text_config(config)
    per_layer = getattr(config, "per_layer_config", None)
    if layer is not None and per_layer is not None:
        return getattr(per_layer[layer], name, None)
    try:
        return getattr(config, name, None)
    except RuntimeError:  # the per-layer values differ: no one global value
        if per_layer is None:
            raise
        return VARIES


def latent_attention(config: Any, layer: int | None = None) -> tuple[Any, Any] | None:
    """(latent width ``kv_lora_rank``, rotary key width ``qk_rope_head_dim``) of a model with
    multi-head latent attention (DeepSeek-V2/V3 and their kin: each token caches one latent and
    one rotary key shared by all heads, which every call expands into keys and values), else
    None. moa-flex caches the latent as one KV head (passes/latent.py absorbs the expansion
    into the queries and the output); a plan rules each layer as a whole or per query head.
    ``layer``: that decoder layer's widths; without it, a width that differs between layers
    (dots3's sliding layers have a latent of their own) is :data:`VARIES`."""
    rank, rope = (layer_config_value(config, n, layer) for n in ("kv_lora_rank", "qk_rope_head_dim"))
    if rank is VARIES or rope is VARIES:
        layers = int(text_config(config).num_hidden_layers)
        planned = attention_layers(config, layers) or range(layers)
        latent = [latent_attention(config, i) is not None for i in planned]
        if all(latent):
            return VARIES, VARIES
        if any(latent):
            raise TypeError(f"{type(text_config(config)).__name__} mixes latent attention (decoder layers "
                            f"{[i for i, x in zip(planned, latent) if x]}) with attention of its own keys and values "
                            "in other layers; moa-flex caches either, not both")
        return None
    if isinstance(rank, int) and rank > 0 and isinstance(rope, int) and rope >= 0:
        return rank, rope
    return None


def cached_value_dim(config: Any, value_dim: int, layer: int | None = None) -> Any:
    """Width (per head) of the values a layer's attention reads from the MoA cache: ``value_dim``
    (the layer's value head dim), except for DiffLlama, whose two calls per layer read the two
    halves of its value heads, which the passes fuse into one call over both side by side
    (passes/value_fusion.py): twice ``value_dim``; and latent attention, whose cached values are
    the latent itself (:func:`latent_attention`): ``kv_lora_rank`` (decoder layer ``layer``'s,
    or :data:`VARIES` where layers differ)."""
    latent = latent_attention(config, layer)
    if latent is not None:
        return latent[0]
    return 2 * value_dim if getattr(text_config(config), "model_type", "") == "diffllama" else value_dim


def cached_key_dim(config: Any, head_dim: Any, layer: int | None = None) -> Any:
    """Width (per head) of the keys the MoA cache holds: ``head_dim``, except for latent
    attention: the latent and the rotary key side by side, ``kv_lora_rank + qk_rope_head_dim``;
    and a model with a per-key score bias (:func:`key_bias_limit`): one more column, the bias.
    ``layer``: that decoder layer's width (latent widths may differ between layers: :data:`VARIES`)."""
    latent = latent_attention(config, layer)
    if latent is not None:
        return VARIES if VARIES in latent else latent[0] + latent[1]
    return head_dim if head_dim is None else head_dim + key_bias_columns(config)


# families whose attention adds to every score a bias computed from the key's own token (Doge's
# dynamic mask: exp(A * softplus(dt_proj(values)))), by config class -> the config field up to
# which that is all (past it, the model keeps only the top-k keys by bias: a selection by content)
KEY_BIAS = {"DogeConfig": "keep_window_size"}


def key_bias_limit(config: Any) -> int | None:
    """For a model whose attention adds a per-key score bias (:data:`KEY_BIAS`), the most keys
    (tokens) a query may see before the model selects keys by that bias; None for other models."""
    field = KEY_BIAS.get(type(text_config(config)).__name__) if config is not None else None
    return None if field is None else int(getattr(text_config(config), field))


def key_bias_problem(config: Any, planned_length: int | None, quantized: bool) -> str | None:
    """Why a model with a per-key score bias (Doge) cannot run a request planned for
    ``planned_length`` tokens (None: not known yet) on a MoA cache (``quantized``: an FP8 one),
    or None: longer than the keys it attends before selecting by that bias (a decode step's mask
    covers its new token only, so the selection would silently not happen), or an FP8 cache (the
    bias is a key column: one scale per slot would round it with the key)."""
    limit = key_bias_limit(config)
    if limit is None:
        return None
    name = type(text_config(config)).__name__
    if planned_length is not None and planned_length > limit:
        return (f"{name}: a request of {planned_length} tokens is longer than keep_window_size={limit}, past which the "
                "model keeps only the top-k keys by its dynamic-mask bias (a selection by content that a MoA plan's "
                f"sink and window rules do not model); keep requests within {limit} tokens")
    if quantized:
        return (f"{name} adds a per-key score bias, which the MoA cache keeps as one more key column; an FP8 cache "
                "would quantize it with the key's scale: use a bf16/fp16/fp32 cache for this model")
    return None


def key_bias_columns(config: Any) -> int:
    """Columns a cached key carries beside the model's key: 1 for a per-key score bias
    (passes/key_bias.py stores it as one more key column, read by a query column of
    ``1 / scale``), else 0."""
    return 0 if key_bias_limit(config) is None else 1


def _language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``get_decoder()``), not a vision or audio tower, or the model itself."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def layer_types(config: Any, num_layers: int) -> list[str] | None:
    """The (text) config's ``layer_types`` for its first ``num_layers`` layers, or None; for a
    model with a cache slot per loop of its recurrent layers (:func:`slot_layers`), per slot."""
    config = text_config(config)
    types = getattr(config, "layer_types", None)
    kinds = getattr(config, "attention_layers", None)
    if types is None and isinstance(kinds, (list, tuple)) and kinds and set(kinds) <= set(_GPT_NEO_KINDS):
        types = [_GPT_NEO_KINDS[t] for t in kinds]  # GPT-Neo: global / local (window_size)
    if not isinstance(types, (list, tuple)):
        return None
    slots = slot_layers(config)
    if slots is not None:
        types = [types[layer] for layer in slots]
    return [str(t) for t in types[:num_layers]]


def recurrent_loops(config: Any) -> tuple[int, int, int, int] | None:
    """(input, recurrent, output layers, loops) of a model that runs a middle section of its
    decoder layers several times per forward (Dory's ``n_recurrent_loops``), or None."""
    config = text_config(config)
    loops = getattr(config, "n_recurrent_loops", None)
    if not isinstance(loops, int) or loops < 2:
        return None
    return int(config.n_input_layers), int(config.n_recurrent_layers), int(config.n_output_layers), loops


def slot_layers(config: Any) -> list[int] | None:
    """The decoder layer of every cache slot of a model whose recurrent loops each write cache
    slots of their own (Dory's ``per_loop`` cache: slots 0..L-1 are the decoder layers, loop
    k >= 1 of recurrent layer I + j writes slot L + (k - 1) R + j), or None (one slot per layer)."""
    found = recurrent_loops(config)
    if found is None or getattr(text_config(config), "recurrent_kv_cache_mode", "per_loop") != "per_loop":
        return None
    first, recurrent, _, loops = found
    total = int(text_config(config).num_hidden_layers)
    return list(range(total)) + [first + j for _ in range(loops - 1) for j in range(recurrent)]


def decoder_layers(config: Any, shape: Any) -> list[int]:
    """The decoder layer of every planned layer (``shape``: the plan's ModelShape): its layer
    index, or for a model with a cache slot per loop (:func:`slot_layers`) the slot's layer."""
    slots = slot_layers(config) if config is not None else None
    return list(slots) if slots is not None else list(shape.layer_indices)


def call_slots(config: Any) -> tuple[int, ...] | None:
    """The cache slot of each attention call of one forward, in call order, for a model whose
    calls do not visit the slots in order (Dory: the input layers, loop 0 on the recurrent
    layers' own slots, loops 1.. on their appended slots, then the output layers), or None."""
    if slot_layers(config) is None:
        return None
    first, recurrent, _, loops = recurrent_loops(config)  # type: ignore[misc]
    total = int(text_config(config).num_hidden_layers)
    looped = [total + (k - 1) * recurrent + j for k in range(1, loops) for j in range(recurrent)]
    return (*range(first + recurrent), *looped, *range(first + recurrent, total))


# GPT-Neo's own names of its layer kinds (``attention_layers``), its local window in ``window_size``
_GPT_NEO_KINDS = {"global": "full_attention", "local": "sliding_attention"}


def own_window(config: Any) -> int | None:
    """The model's sliding window (tokens): ``sliding_window``, or GPT-Neo's ``window_size``."""
    config = text_config(config)
    window = getattr(config, "sliding_window", None)
    if window is None and getattr(config, "attention_layers", None) is not None:
        window = getattr(config, "window_size", None)
    return window


def attention_layers(config: Any, num_layers: int) -> tuple[int, ...] | None:
    """Decoder-layer indices of a hybrid's softmax-attention layers (all but
    :data:`STATE_LAYER_TYPES`); None when every layer attends. TypeError for a model with no
    softmax-attention layer at all (nothing for a plan to rule)."""
    types = layer_types(config, num_layers)
    if not types or not any(t in STATE_LAYER_TYPES for t in types):
        return None
    layers = tuple(i for i, t in enumerate(types) if t not in STATE_LAYER_TYPES)
    if not layers:
        raise TypeError(f"{type(text_config(config)).__name__} has no softmax-attention layer (layer types "
                        f"{sorted(set(types))}): a MoA plan has nothing to rule")
    return layers


# a config's head layout of its sliding-window layers, where it has one of its own (Inkling)
SLIDING_HEAD_KEYS = (("swa_num_attention_heads", "num_attention_heads"), ("swa_num_key_value_heads", "num_key_value_heads"),
                     ("swa_head_dim", "head_dim"))


def check_sliding_heads(config: Any, planned: list[str]) -> None:
    """ValueError when planned sliding-window layers run a head layout of their own
    (``swa_num_attention_heads`` and the like differing from the full layers'): a plan has one."""
    if "sliding_attention" not in planned:
        return
    own = [(swa, getattr(config, swa), getattr(config, full, None)) for swa, full in SLIDING_HEAD_KEYS
           if getattr(config, swa, None) is not None and getattr(config, swa) != getattr(config, full, None)]
    if own:
        said = ", ".join(f"{swa}={a} against {b}" for swa, a, b in own)
        raise ValueError(f"{type(config).__name__}'s sliding-window layers run a head layout of their own ({said}); "
                         "a moa-flex plan has one head layout for every layer")


def sparse_attention_indexer(config: Any) -> bool:
    """DeepSeek Sparse Attention: latent attention whose keys an indexer selects, a top-k of
    ``index_topk`` keys per query (DeepSeek-V3.2, GLM-5 and kin; passes/indexed.py)."""
    config = text_config(config)
    return latent_attention(config) is not None and bool(getattr(config, "index_topk", None))


def block_indexer(config: Any) -> bool:
    """Query-aware sparse attention (Qwen4-Exp): an indexer that picks each query's blocks of
    ``indexer_compress_ratio`` keys within ``indexer_budget`` (moa_flex/runtime/block_selection.py)."""
    config = text_config(config)
    return bool(getattr(config, "indexer_compress_ratio", None)) and getattr(config, "indexer_budget", None) is not None


def index_ring_width(config: Any) -> int | None:
    """Width of what a MoA cache keeps per kept token beside an indexed layer's keys: DeepSeek
    Sparse Attention's indexer key (``index_head_dim``); Qwen4-Exp's raw index key and the
    token's rotary cos and sin (``indexer_head_dim`` + 2 x the rotary width: a block's key is
    rotated to its first kept token's position, which the cache, keeping no position history,
    reads there); None without an indexer."""
    config = text_config(config)
    if sparse_attention_indexer(config):
        return int(config.index_head_dim)
    if not block_indexer(config):
        return None
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // int(config.num_attention_heads)
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    rotary = 2 * len(range(0, int(head_dim * factor), 2))  # cos = cat(freqs, freqs), freqs at every other dim
    return int(config.indexer_head_dim) + 2 * rotary


def selecting_layers(config: Any, layers: Sequence[int]) -> list[bool]:
    """Per decoder layer in ``layers``, whether an indexer of either kind picks its keys: one
    choice for all the layer's heads, so one rule for them (DeepSeek Sparse Attention, Qwen4-Exp)."""
    if not block_indexer(config):
        return indexed_layers(config, layers)
    types = layer_types(config, int(text_config(config).num_hidden_layers))
    return [types is None or types[i] in INDEXED_LAYER_TYPES for i in layers]


def indexed_layers(config: Any, layers: Sequence[int]) -> list[bool]:
    """Per decoder layer in ``layers``, whether an indexer selects its keys (DeepSeek Sparse
    Attention): every layer of a model with one, except where ``layer_types`` names the layer
    another type (dots3's sliding layers run plain latent attention beside indexed ones)."""
    if not sparse_attention_indexer(config):
        return [False] * len(layers)
    types = layer_types(config, int(text_config(config).num_hidden_layers))
    return [types is None or types[i] in INDEXED_LAYER_TYPES for i in layers]


def model_windows(config: Any, shape: Any) -> list[int | None]:
    """Per planned layer (``shape``: the plan's :class:`~moa_flex.plan.ModelShape`), the model's
    own attention pattern as one integer (the kernels' ``window``): its sliding window (tokens,
    > 0), ``-attention_chunk_size`` for chunked local attention (Llama 4: a query attends its own
    chunk of that many positions), or None (plain causal); from the config (``sliding_window``,
    ``attention_chunk_size`` and, where present, ``layer_types``). ValueError for an attention
    pattern moa-flex does not model (latent or shared KV, attention layers of other kinds): the
    passes would replace the model's mask by causal + window and answer wrongly."""
    config = text_config(config)
    window = own_window(config)
    types = layer_types(config, shape.model_layers)
    planned = None if types is None else [WITH_STATE_LAYER_TYPES.get(types[i], types[i]) for i in shape.layer_indices]
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and planned is None:
        raise ValueError(f"{type(config).__name__} has attention_chunk_size={chunk} (chunked local attention) but no "
                         "layer_types saying which layers attend in chunks")
    other = sorted({t for t in planned or [] if t not in MODELED_LAYER_TYPES})
    if other:
        raise ValueError(f"{type(config).__name__} has layers of type {other}; moa-flex plans "
                         f"{list(MODELED_LAYER_TYPES)} layers and leaves {list(STATE_LAYER_TYPES)} layers to "
                         "transformers, nothing else")
    if planned is None:
        return [int(window) if window else None] * shape.num_layers
    if any(t in INDEXED_LAYER_TYPES for t in planned) and not (sparse_attention_indexer(config) or
                                                                block_indexer(config)):
        raise ValueError(f"{type(config).__name__} has indexed_attention layers whose indexer is not DeepSeek Sparse "
                         "Attention's (a top-k of keys beside latent attention) nor Qwen4-Exp's (each query's best "
                         "blocks within a budget): another selection (among a pool of blocks another layer chose, or "
                         "above a score threshold), which moa-flex does not compose with a plan")
    check_sliding_heads(config, planned)
    if "chunked_attention" in planned and not chunk:
        raise ValueError(f"{type(config).__name__} has chunked_attention layers but no attention_chunk_size")
    own = {"sliding_attention": int(window or 0) or None, "chunked_attention": -int(chunk or 0) or None}
    return [own.get(t) for t in planned]


def kv_sources(config: Any, shape: Any) -> dict[int, int]:
    """Planned layer -> the planned layer whose keys and values it attends, for each layer that
    computes none of its own (KV sharing: Gemma 3n, Gemma 4's ``num_kv_shared_layers``; a
    ``reuse`` layer reads the last layer of its own type before the shared ones); empty for
    other models. Plan-layer indices (``shape``: the plan's ModelShape). ValueError if a source
    is not a planned layer."""
    config = text_config(config)
    count = int(getattr(config, "num_kv_shared_layers", 0) or 0)
    if not count:
        return {}
    total = shape.model_layers
    modes = getattr(config, "kv_sharing_modes", None)
    modes = list(modes) if modes is not None else [None] * (total - count) + ["reuse"] * count
    types = layer_types(config, total) or ["full_attention"] * total
    first = next((i for i, m in enumerate(modes) if m == "reuse"), total)
    if first == 0:
        raise ValueError(f"{type(config).__name__} shares keys and values in all of its {total} layers (a draft model "
                         "that reads another model's): no layer of its own computes them")
    planned = {layer: p for p, layer in enumerate(shape.layer_indices)}
    sources = {}
    for layer in range(first, total):
        source = max(j for j in range(first) if types[j] == types[layer])
        if layer not in planned or source not in planned:
            raise ValueError(f"{type(config).__name__}: layer {layer} attends layer {source}'s keys and values; both "
                             f"must be planned layers (the plan covers {list(shape.layer_indices)})")
        sources[planned[layer]] = planned[source]
    return sources


OWN_CACHE_TYPES = ("minimax",)  # model types whose forward accepts only their own cache class


def step_graph_problem(config: Any) -> str | None:
    """Why a captured CUDA graph of a decode step would replay something stale for this model,
    or None: a number it reads from the cache (:func:`reads_token_count`), or state tensors its
    own code replaces at every step (MiniMax's lightning attention, in its cache's list)."""
    count = reads_token_count(config)
    if count:
        return f"{count}, a number a captured graph would freeze"
    if getattr(text_config(config), "model_type", None) in OWN_CACHE_TYPES:
        return ("MiniMax's linear-attention layers replace their state tensors at every step (its cache's "
                "linear_cache list), which a captured graph would not see")
    return None


def reads_token_count(config: Any) -> str | None:
    """Why the model's forward reads its cache's token count (``get_seq_length``) as a number,
    or None. Llama 4 scales the queries of its NoPE layers by a function of the position it
    derives from that count (``attn_temperature_tuning``): moa-flex's cache advances the count
    chunk by chunk and step by step, which a compiled graph reads as an input, but a captured
    CUDA graph would replay the number it was captured with."""
    config = text_config(config)
    nope = [i for i, rope in enumerate(getattr(config, "no_rope_layers", None) or []) if not rope]
    if getattr(config, "attn_temperature_tuning", False) and nope:
        return (f"{type(config).__name__}'s NoPE layers {nope} scale their queries by a function of the cache's token "
                "count (attn_temperature_tuning)")
    return None


def bidirectional_attention(model: torch.nn.Module) -> list[str]:
    """Module paths of self-attention modules in decoder layers that declare ``is_causal = False``
    (an encoder's bidirectional attention, BERT-style models without ``is_decoder``), looked for
    in the language model (``get_decoder()``: a vision or audio tower's encoder layers are
    bidirectional by design). Cross-attention modules are not listed: a causal LM built from a
    decoder stack never runs them. Nor are modules without a linear projection of their own:
    they attend over something else than the sequence (Inkling 2's block attention residuals
    mix one position's earlier block outputs with a learned query). Nor are a decoder's
    attention modules (``is_decoder`` True: BigBird-Pegasus's decoder leaves ``is_causal`` at
    False and passes the causal mask it builds), nor those of an image or audio tower a model
    without ``get_decoder()`` holds (GIT's ``image_encoder``)."""
    return [name for name, m in _language_model(model).named_modules()
            if getattr(m, "is_causal", None) is False and _LAYER_OF.search(name) and not _CROSS.search(name)
            and not getattr(m, "is_cross_attention", False) and getattr(m, "is_decoder", None) is not True
            and not _TOWER.search(name) and any(isinstance(c, torch.nn.Linear) for c in m.modules())]


def kv_head_mismatches(model: torch.nn.Module, shape: Any) -> list[tuple[int, int]]:
    """(decoder layer, its KV heads) for planned attention layers whose module runs a number of
    KV heads (``num_key_value_groups`` of HF attention modules) that is neither the plan's nor
    a divisor of it (a divisor: the cache holds that layer's heads expanded to the plan's)."""
    found = []
    for name, module in model.named_modules():
        m = _ATTN.search(name)
        groups = getattr(module, "num_key_value_groups", None)
        if m is None or not isinstance(groups, int) or groups < 1 or int(m.group(1)) not in shape.layer_indices:
            continue
        kv = shape.num_heads // groups
        if kv < 1:  # more groups than the config's heads: a layer with a head layout of its own (Inkling 2's
            continue  # sliding layers), which check_sliding_heads refuses by name
        if kv > shape.num_kv_heads or shape.num_kv_heads % kv:
            found.append((int(m.group(1)), kv))
    return found


_SUBLAYER_OF = re.compile(r"(?:self_attn|attn|attention)\.(\d+)$")  # layers.3.self_attn.1: a list of sublayers


# what a caller adds to an attention module's layer_idx for the cache slot of this call: HRM's
# stacks running in cycles, Dory's recurrent loops
SLOT_OFFSETS = ("cycle_offset", "cache_offset")


def slot_offset(module: torch.nn.Module) -> str | None:
    """The keyword (:data:`SLOT_OFFSETS`) through which callers of this attention module pass
    the offset of its cache slot, or None."""
    params = inspect.signature(type(module).forward).parameters
    return next((name for name in SLOT_OFFSETS if name in params), None)


def slots_in_call_order(model: torch.nn.Module) -> bool:
    """Whether the model runs its attention modules several times per forward, each call on the
    cache slot ``layer_idx + offset`` that its caller passes (:data:`SLOT_OFFSETS`; HRM: an L and
    an H stack run in cycles, the slots rise in call order and ``config.num_hidden_layers``
    counts them; Dory: :func:`call_slots`). A plan then has one rule per slot, and the passes
    take the k-th attention call of a graph as the k-th slot of the call order
    (passes/nodes.py ``call_layers``)."""
    return any(type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and slot_offset(m)
               for m in _language_model(model).modules())


def attention_layer_problem(model: torch.nn.Module) -> str:
    """Why the model's attention modules do not map one to one to cache layers ("" if they
    do): a module whose ``layer_idx`` is not the index of the decoder layer holding it (Zamba's
    block shared by several layers), or two attention modules answering to one layer index
    (HRM's two stacks). A decoder layer may hold a list of attention sublayers (LongCat-Flash's
    ``self_attn.0`` and ``.1``) if sublayer j of decoder layer N answers to ``N * sublayers + j``.
    The passes and the cache find a call's layer through both (passes/nodes.py ``call_layers``)."""
    found = []
    for name, module in _language_model(model).named_modules():
        if (not type(module).__name__.endswith(("Attention", "MLA")) or not hasattr(module, "layer_idx")
                or _CROSS.search(name) or getattr(module, "is_cross_attention", False)):
            continue
        m = _LAYER_OF.search(name + ".")
        idx = module.layer_idx
        if m is None or idx is None or (isinstance(idx, int) and idx < 0):
            continue  # None (Zamba) or -1 (Zamba2): a block shared by several layers, told its layer by the caller
        sub = _SUBLAYER_OF.search(name)
        found.append((name, idx, int(m.group(1)), int(sub.group(1)) if sub else None))
    per = max((j for *_, j in found if j is not None), default=-1) + 1
    several_calls = slots_in_call_order(model)  # modules answering to one layer_idx on slots of their own
    seen: dict[int, str] = {}
    for name, idx, layer, j in found:
        expected = layer if j is None or per == 0 else layer * per + j
        if not isinstance(idx, int) or idx != expected:
            return (f"{name} answers to layer_idx {idx!r} inside decoder layer {layer} (an attention block shared "
                    "by several layers, or attention sublayers numbered otherwise than N * sublayers + j)")
        if idx in seen and not several_calls:
            return f"{seen[idx]} and {name} both answer to layer_idx {idx} (several attention stacks)"
        seen[idx] = name
    return ""


def has_learned_sinks(model: torch.nn.Module) -> bool:
    """Whether an attention module holds learned sink logits (GPT-OSS's ``sinks``)."""
    return any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules())


def alibi_over_cache_length(model: torch.nn.Module) -> bool:
    """Whether the model is a BLOOM whose forward sizes its ALiBi bias by the cache's token count
    rather than by the cache's mask sizes (transformers before the change seen in 5.25): its
    decode steps over a MoaCache would add a bias as long as the cache to one key's scores."""
    for module in model.modules():
        if type(module).__name__ == "BloomModel":
            return "get_mask_sizes" not in inspect.getsource(type(module).forward)
    return False


def skips_causal_mask_under_key_bias(model: torch.nn.Module) -> bool:
    """Whether the model is a Doge whose forward lets transformers skip the causal mask for an
    input without padding (transformers before the change seen in 5.25, which always
    materializes it): its dynamic mask is then all the mask SDPA gets, so every token attends
    later ones in the stock model, while the graph Dynamo traces builds the causal mask."""
    for module in model.modules():
        if type(module).__name__ == "DogeModel":
            return "allow_is_causal_skip=False" not in inspect.getsource(type(module).forward)
    return False


# families whose transformers forward lets every token of a call's input attend every other one, later
# tokens included (a prefix LM over each input), by config class; tests/test_support.py measures it
BOTH_WAYS_OVER_INPUT = {
    "CpmAntConfig": "CpmAntModel.forward marks every input token as context (context all 1), so each token of a "
                    "call's input attends every other, later ones included",
}

# what a forward without a transformers Cache takes in its place: Reformer's buckets and states, XLNet's memory
OWN_STATES = ("past_buckets_states", "mems")


def check_supported(model: torch.nn.Module, shape: Any) -> None:
    """ValueError naming why, for a model whose attention a plan cannot rule (``shape``: the
    plan's ModelShape): decoder layers run several times per
    forward reading each other's cache (Dory's last_loop cache), attention modules that do not map one to one to decoder layers, layers running other KV heads than the config, bidirectional
    attention. Checked at compile time, before anything changes."""
    name = type(model).__name__
    config = text_config(getattr(model, "config", None))
    loops = recurrent_loops(config)
    if loops is not None and slot_layers(config) is None:
        raise ValueError(f"{name} runs its recurrent decoder layers {loops[3]} times per forward with "
                         f"recurrent_kv_cache_mode={config.recurrent_kv_cache_mode!r}: the loops before the last read "
                         "the last loop's cache layers without writing them, which moa-flex's cache does not model "
                         "(a loop reads only what its own cache slot kept); load it with "
                         "recurrent_kv_cache_mode='per_loop', which gives each loop a cache slot, and a plan a rule, "
                         "of its own")
    problem = attention_layer_problem(model)
    if problem:
        raise ValueError(f"{name}: {problem}; a MoA plan rules one attention per decoder layer")
    latent = latent_attention(getattr(model, "config", None))
    if latent is not None:
        check_latent_expansion(model)
    mismatched = [] if latent is not None else kv_head_mismatches(model, shape)  # latent: expanded per head
    if mismatched:
        layer, kv = mismatched[0]
        raise ValueError(f"decoder layer {layer} of {name} runs {kv} KV heads, the config (and the plan) "
                         f"{shape.num_kv_heads}: a plan has one head layout for every layer (a layer may run a "
                         "divisor of the plan's KV heads, which its cache holds expanded, not more)")
    lsh = [t for t in getattr(config, "attn_layers", None) or () if t == "lsh"]
    if lsh:  # Reformer
        raise ValueError(f"{name} runs LSH self-attention (attn_layers {list(config.attn_layers)}): each query attends "
                         "the keys hashed into its own buckets, a data-dependent sparsity that a MoA plan's sink and "
                         "window rules do not model")
    params = inspect.signature(model.forward).parameters
    own = [p for p in OWN_STATES if p in params]
    if "cache" not in params and "past_key_values" not in params and own:  # none at all (GPT): generate recomputes
        raise ValueError(f"{name}'s forward takes no KV cache (neither cache nor past_key_values): it keeps a state "
                         f"of its own ({', '.join(own)}), which moa-flex's cache does not replace, and a MoA plan is a "
                         "rule for what a KV cache keeps")
    if alibi_over_cache_length(model):
        import transformers

        raise ValueError(f"{name} of transformers {transformers.__version__} builds its ALiBi bias over the whole cache "
                         "length in a decode step, while moa-flex's ragged cache hands each step its new token only "
                         "(transformers 5.25's BLOOM sizes the bias by the cache's mask sizes, which moa-flex answers): "
                         "upgrade transformers to run BLOOM with moa-flex")
    if skips_causal_mask_under_key_bias(model):
        import transformers

        raise ValueError(f"{name} of transformers {transformers.__version__} skips its causal mask for an input "
                         "without padding and hands SDPA its dynamic mask alone, so each token attends later ones "
                         "(transformers 5.25's Doge always builds the causal mask): upgrade transformers to run Doge "
                         "with moa-flex")
    if any(getattr(m, "attention_type", None) == "block_sparse" for m in model.modules()):  # BigBird's modules
        # hold the type they run (a short input switches them to full attention for good, the config stays)
        raise ValueError(f"{name} runs BigBird's block-sparse attention (attention_type='block_sparse': random and "
                         "sliding blocks, no softmax over all keys), a sparsity of its own that a MoA plan does not "
                         "model; load it with attention_type='original_full' (what transformers itself switches to "
                         "for inputs too short for blocks)")
    both_ways = BOTH_WAYS_OVER_INPUT.get(type(config).__name__)
    if both_ways:
        raise ValueError(f"{name}'s attention is bidirectional over its input: {both_ways}; a MoA plan rules causal "
                         "attention")
    if getattr(getattr(model, "config", None), "causal", None) is False:  # XLM: a masked LM unless causal=True
        raise ValueError(f"{name}'s config has causal=False: its attention is bidirectional (a masked language "
                         "model), which a MoA plan does not model (it rules causal attention). For a causal LM of "
                         "this architecture load it with causal=True.")
    both_ways = bidirectional_attention(model)
    if both_ways:
        more = f", and {len(both_ways) - 1} more" if len(both_ways) > 1 else ""
        raise ValueError(f"{name}'s attention is bidirectional ({both_ways[0]} has is_causal=False{more}): an encoder, "
                         "which a MoA plan does not model (it rules causal attention). For a causal LM of this "
                         "architecture load it with is_decoder=True.")


def check_latent_expansion(model: torch.nn.Module) -> None:
    """ValueError unless every latent-attention module's ``expand_kv`` is the expansion that
    passes/latent.py absorbs: for each head h, keys ``[W_uk,h c + b_k,h ; k_rot]`` and values
    ``W_uv,h c + b_v,h`` with ``kv_b_proj`` viewed as [H, nope + v, r] (each module's own widths).
    Checked by evaluation on a random latent, in float32 where the weights are."""
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for name, module in _language_model(model).named_modules():
        proj = getattr(module, "kv_b_proj", None)
        if proj is None or not hasattr(module, "expand_kv"):
            continue
        checked += 1
        weight = proj.weight
        if weight.device.type == "meta":
            continue
        nope, v = int(module.qk_nope_head_dim), int(module.v_head_dim)
        rank, rope = int(module.kv_lora_rank), int(module.qk_rope_head_dim)
        heads = weight.shape[0] // (nope + v)
        c = torch.randn(1, 1, 3, rank, generator=gen).to(weight.device, weight.dtype)
        k_rot = torch.randn(1, 1, 3, rope, generator=gen).to(weight.device, weight.dtype)
        with torch.no_grad():
            keys, values = module.expand_kv(c, k_rot)
            w = weight.float().view(heads, nope + v, rank)
            b = (proj.bias.float() if proj.bias is not None else torch.zeros_like(w[..., 0])).view(heads, 1, nope + v)
            kv = c.float() @ w.transpose(1, 2) + b  # [1, H, 3, nope + v]
            want_k = torch.cat([kv[..., :nope], k_rot.float().expand(1, heads, 3, rope)], dim=-1)
            want_v = kv[..., nope:]
        tol = 1e-4 if weight.dtype == torch.float32 else 3e-2
        for what, got, want in (("keys", keys, want_k), ("values", values, want_v)):
            scale = float(want.abs().max()) or 1.0
            if got.shape != want.shape or float((got.float() - want).abs().max()) > tol * scale:
                raise ValueError(f"{name}.expand_kv does not expand the latent into {what} as moa-flex's latent "
                                 "attention assumes (per head h: keys [W_uk,h c + b ; k_rot], values W_uv,h c + b, "
                                 "kv_b_proj viewed as [heads, nope + v, rank]); the rewrite would answer wrongly")
    if not checked:
        raise ValueError(f"{type(model).__name__} has latent attention (kv_lora_rank={rank}) but no attention module with "
                         "kv_b_proj and expand_kv, the latent cache moa-flex attends over (transformers' form since 5.x)")


def layer_placement(model: torch.nn.Module, shape: Any) -> tuple[list[torch.device], torch.dtype]:
    """Device of every planned layer's attention (``shape``: the plan's
    :class:`~moa_flex.plan.ModelShape`; models spread with device_map) and the attention
    weights' dtype, found through module paths ``...layers.N.self_attn``."""
    devices: dict[int, torch.device] = {}
    dtype = None
    for name, module in model.named_modules():
        m = _ATTN.search(name)
        if m is None:
            continue
        param = next(module.parameters(), None)
        if param is not None:
            devices[int(m.group(1))] = param.device
            dtype = dtype or param.dtype
    wanted = shape.layer_indices
    if not set(wanted) <= set(devices):
        fallback = next(model.parameters())
        return [fallback.device] * shape.num_layers, fallback.dtype
    return [devices[layer] for layer in wanted], dtype or next(model.parameters()).dtype
