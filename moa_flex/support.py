"""The support matrix: every causal-LM model type of the installed transformers, checked.

    python -m moa_flex.support                        # every type; writes docs/SUPPORT.md
    python -m moa_flex.support --types llama mixtral  # some types, table on stdout
    make support

For each model type in transformers' causal-LM mapping: a tiny random config (2-4 layers,
hidden 64, 4 query / 2 KV heads of 16, vocab 128; a hybrid keeps one layer of each of its
layer types), the model in fp32 on the CPU, and three checks through
``moa_flex.compile(..., backend="eager")`` (with the first-call guard on):

1. dense: a dense plan's logits equal the stock model's (max abs <= 1e-5);
2. sparse: a random sparse plan's logits equal the independent reference
   (:mod:`moa_flex.reference`, float64 softmax under the brute-force keep rule) within 1e-4;
3. generate: greedy ``generate`` of a left-padded batch is token-exact against the reference's
   argmax at every step, planned for the request's length.

The tiny config (:func:`tiny_config`) sets the :data:`TINY` fields a config has (encoder and decoder
sizes of encoder-decoder configs, MLA ranks and head parts, ...), and keeps it consistent: fields
a default config ties stay tied (:data:`TIED`: an MLA head_dim is its rotary part, latent attention
stays MHA), a feature off stays off (:data:`KEEP_OFF`), sizes a default leaves None are filled
(:data:`FILL_NONE`), aliases defer to their real field, read-only properties are left alone,
per-layer overrides (``per_layer_config``) scale with the tiny sizes, token ids stay ints where
the field takes no None, every sub-config (text / vision / audio) is made tiny alike, and a few
types take :data:`OVERRIDES` (each with its reason). A causal-LM class taking a sub-config
(MusicGen's decoder) is built on it. Every parameter then gets a little noise
(:func:`_perturbed`): fresh weights leave some terms at exactly zero or one constant (Doge's
``A`` starts at zero, which made its score bias a constant softmax ignores), and a dropped term
that contributes nothing cannot show. Greedy generate runs with the generation config's logits
processors (forced EOS, suppressed tokens) off (:data:`GREEDY_OFF`).

Status per type: ``supported`` (all three pass), ``refused`` (moa-flex declines it at compile
time, with the reason it gives), ``fails`` (a check disagrees, or an error past compile: a
bug to fix), ``not built`` (no tiny model could be made from the config: the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import inspect
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TINY = {  # config fields set where the type's config (or one of its sub-configs) has them
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "intermediate_size_mlp": 128, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "vocab_size": 128, "max_position_embeddings": 512,
    "n_positions": 512, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None, "tie_word_embeddings": False,
    "is_decoder": True,  # an encoder architecture's causal-LM head (BERT family) is a decoder only with it
    # encoder-decoder configs (the causal LM is the decoder; the encoder shrinks alike)
    "encoder_layers": 2, "decoder_layers": 2, "num_encoder_layers": 2, "num_decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_encoder_attention_heads": 4,
    "num_decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    # latent attention (MLA): q/kv low-rank projections, a rotary and a no-rotary part per head
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 24,
    # other size fields: partial rotary, FFN widths under other names, index heads, MoE groups, per-layer inputs
    "rotary_dim": 8, "ffn_hidden_size": 128, "expert_ffn_hidden_size": 32, "n_group": 1, "topk_group": 1,
    "num_expert_group": 1, "index_n_heads": 2, "index_num_heads": 2, "index_head_dim": 16,
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16, "hidden_size_global": 64,
    "encoder_hash_byte_group_vocab": 128,
    # a multimodal adapter maps between two hidden sizes (all tiny: 64)
    "adapter_in_dim": 64, "adapter_input_size": 64, "adapter_out_dim": 64,
}
KEEP_OFF = {  # None or 0 switches a feature off (no q projection rank, full rotary, no groups): kept
    "q_lora_rank", "rotary_dim", "n_group", "topk_group", "num_expert_group", "vocab_size_per_layer_input",
    "hidden_size_per_layer_input",
}
FILL_NONE = {  # sizes a default config leaves None though its model needs them: set only where None
    # 8 index heads (Qwen4-Exp): a block every head's ReLU scores 0 ties exactly, and transformers'
    # own top-k breaks such ties in an order of its own (moa-flex: the earlier block)
    "n_shared_experts": 1, "indexer_n_heads": 8, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
    "indexer_compress_ratio": 4,
}
TIED = {  # field: the field whose tiny value it takes where the default config has the two equal
    "head_dim": "qk_rope_head_dim",  # MLA configs whose head_dim is the rotary part
    "num_key_value_heads": "num_attention_heads",  # latent attention expands K/V per query head (MHA stays MHA)
}
TIED_IF = {"num_key_value_heads": "kv_lora_rank"}  # a tie applied only where the config has this field too
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2}  # where the config's field takes no None
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")
OVERRIDES: dict[str, dict[str, Any]] = {  # per model type (sub-configs too): what no generic rule derives
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # attention_layers is expanded from this pattern
    "dots3_note_text": {"head_dim": 32},  # sliding layers: head_dim = their qk_nope_head_dim (24) + qk_rope_head_dim
    "mamba2": {"head_dim": 32, "n_groups": 1},  # SSM heads: num_heads * head_dim = expand (2) * hidden_size
    # input_ids are (batch x codebooks, length): one codebook, plain ids; pad and start token one past the vocabulary,
    # as in the real checkpoints (2048 of 2048: its embeddings have a row more), which no logit can pick
    "musicgen_decoder": {"num_codebooks": 1, "pad_token_id": 128, "bos_token_id": 128},
    "musicgen_melody_decoder": {"num_codebooks": 1, "pad_token_id": 128, "bos_token_id": 128},
    "zaya": {"num_experts_per_tok": 1},  # ZAYA validates top-1 routing only
    "mimo_v2_flash": {"v_head_dim": 8},  # values narrower than keys, as in the real model (128 beside 192)
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [16, 48], "attn_layers": ["local", "lsh"]},  # its LM
    # head asserts is_decoder; the axial position embedding parts sum to hidden_size; the layer count is attn_layers
    "dory": {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
             "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1},  # an input, a looped and an
    # output layer (the default's 8 input and 8 output layers leave none to loop); 4 cache slots, called 0, 1, 3, 2
    "xmod": {"default_language": "en_XX"},  # the forward needs a language for its adapters
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},  # DbrxAttentionConfig has
    # no rope_theta, and its model clamps by clip_qkv (None fails)
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},  # default layer_types is None
    # hybrids whose defaults put no attention layer among the first two (or none at all: pure Mamba)
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # the default's rope_parameters is {} (no entry per layer type)
}
GENERATION_FIELDS = {  # per type, what a real checkpoint's generation_config.json sets and its own generate() needs
    "musicgen": {"decoder_start_token_id": 128},  # MusicGen's delay pattern starts every row with it
    "musicgen_melody": {"decoder_start_token_id": 128},
}
NOT_DECODERS = {  # types the matrix cannot check standalone: why
    "gemma4_assistant": "a draft model: its forward reads the target model's shared KV states",
    "gemma4_unified_assistant": "a draft model: its forward reads the target model's shared KV states",
}
GREEDY_OFF = (  # generation-config logits processors of seq2seq-derived configs (forced EOS at the last step, ...)
    "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids",
)
PROMPT, NEW, BATCH = 40, 4, 2
DENSE_TOL, SPARSE_TOL = 1e-5, 1e-4


@dataclass
class Result:
    """One model type's row of the matrix."""

    model_type: str
    status: str  # supported / refused / fails / not built
    detail: str = ""
    seconds: float = 0.0


class _Timeout(Exception):
    pass


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str) -> Any:
    """A tiny config of ``model_type`` (:func:`_tiny` of its default config)."""
    from transformers import CONFIG_MAPPING

    if model_type in NOT_DECODERS:
        raise ValueError(NOT_DECODERS[model_type])
    cls = CONFIG_MAPPING[model_type]
    return _tiny(cls, cls())


def _tiny(cls: type, default: Any) -> Any:
    """A tiny ``cls`` from its ``default`` instance: :func:`_tiny_fields`, one layer of each of a hybrid's
    layer kinds (at least two layers; twice where layers share KV), per-layer overrides scaled alike."""
    kwargs = _tiny_fields(cls, default)
    field = getattr(cls, "attribute_map", {}).get("layer_types", "layer_types")  # Zamba's: layers_block_type
    types = _value(default, field)
    if _is_kinds(types) and field not in kwargs:
        picked = list(dict.fromkeys(types))  # one layer of each kind, in order of appearance
        picked = (picked * 2)[:max(2, len(picked))]
        if _value(default, "num_kv_shared_layers"):  # the second half reads the KV of the first
            picked = picked * 2
            kwargs["num_kv_shared_layers"] = len(picked) // 2
        hybrid = {**kwargs, field: picked, **{n: len(picked) for n in LAYER_COUNTS if n in kwargs}}
        hybrid.update(_tiny_per_layer(default, hybrid, [types.index(t) for t in picked]))
        try:
            return cls(**hybrid)
        except (TypeError, ValueError, AttributeError):  # layer kinds derived by the config itself
            kwargs.pop("num_kv_shared_layers", None)
    layers = next((kwargs[n] for n in LAYER_COUNTS if n in kwargs), 2)
    return cls(**kwargs, **_tiny_per_layer(default, kwargs, list(range(layers))))


def _tiny_fields(cls: type, default: Any) -> dict[str, Any]:
    """The tiny fields of ``cls``: the :data:`TINY` ones it has (:data:`KEEP_OFF`, :data:`TIED`,
    :data:`TOKEN_IDS` applied), :data:`FILL_NONE`, each sub-config made tiny, the type's :data:`OVERRIDES`."""
    kwargs = {k: _tiny_value(cls, default, k) for k in TINY if _settable(cls, default, k)}
    kwargs = {k: v for k, v in kwargs.items() if v is not _SKIP and not _shadowed(cls, k, kwargs)}
    kwargs.update({k: TINY[v] for k, v in TIED.items() if k in kwargs and _tied(default, k, v)})
    kwargs.update({k: v for k, v in FILL_NONE.items() if _has(default, k) and _value(default, k) is None})
    kwargs.update({k: _tiny(type(sub), sub) for k, sub in _sub_configs(default).items()})
    kwargs.update(OVERRIDES.get(getattr(default, "model_type", ""), {}))
    return kwargs


_SKIP = object()  # a TINY field left at the config's default


def _shadowed(cls: type, name: str, kwargs: dict[str, Any]) -> bool:
    """Whether ``name`` is an alias (the config's attribute_map) of a field ``kwargs`` sets by its own name or
    by an earlier alias (Whisper's num_key_value_heads and num_attention_heads both alias encoder_attention_heads)."""
    aliases = getattr(cls, "attribute_map", {})
    real = aliases.get(name)
    earlier = list(kwargs)[:list(kwargs).index(name)]
    return real is not None and (real in kwargs or any(aliases.get(k) == real for k in earlier))


def _is_kinds(value: Any) -> bool:
    """Whether ``value`` is a per-layer list of layer kinds (strings)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, str) for t in value)


def _has(config: Any, name: str) -> bool:
    """Whether ``config`` has ``name`` (a per-layer attribute of a heterogeneous config counts)."""
    try:
        return hasattr(config, name)
    except RuntimeError:  # transformers refuses a global read of an attribute that varies per layer
        return True


def _value(config: Any, name: str) -> Any:
    """``config.name`` (None if absent), read globally even where it varies per layer."""
    read = getattr(config, "_getattr_without_heterogeneous_validation", None)
    try:
        return read(name, None) if read else getattr(config, name, None)
    except (AttributeError, RuntimeError):
        return None


def _settable(cls: type, default: Any, name: str) -> bool:
    """``default`` has ``name`` and it is no property of ``cls`` that refuses a value (Falcon's
    head_dim has no setter; ProphetNet's num_hidden_layers, XLNet's max_position_embeddings raise)."""
    if not _has(default, name) or _derived(cls, name):
        return False
    prop = inspect.getattr_static(cls, name, None)
    if not isinstance(prop, property):
        return True
    try:
        prop.__set__(copy.copy(default), _value(default, name))
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return False
    return True


def _derived(cls: type, name: str) -> bool:
    """Whether ``name`` is an attribute a dataclass config computes itself (no field, no alias: Falcon's
    num_key_value_heads, from multi_query): setting it would contradict the config."""
    import dataclasses

    if not dataclasses.is_dataclass(cls):
        return False
    fields = {f.name for f in dataclasses.fields(cls)}
    return name not in fields and name not in getattr(cls, "attribute_map", {})


def _tiny_value(cls: type, default: Any, name: str) -> Any:
    """TINY's value of ``name`` for ``cls``: :data:`KEEP_OFF` fields stay off where the default has them
    off, a token id TINY leaves None is a small int where the field takes no None."""
    value = TINY[name]
    if name in KEEP_OFF and not _value(default, name):
        return _SKIP
    if value is None and name in TOKEN_IDS and not _takes_none(cls, name):
        return TOKEN_IDS[name]
    return value


def _takes_none(cls: type, name: str) -> bool:
    """Whether the dataclass field ``name`` of ``cls`` is typed to accept None (untyped: assume so)."""
    import dataclasses
    import typing

    fields = {f.name: f.type for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    kind = fields.get(name)
    return kind is None or isinstance(kind, str) or kind is type(None) or type(None) in typing.get_args(kind)


def _tied(default: Any, name: str, source: str) -> bool:
    """Whether the default config has ``name`` equal to ``source`` (both set; :data:`TIED_IF` there)."""
    a, b = _value(default, name), _value(default, source)
    return a is not None and a == b and source in TINY and _has(default, TIED_IF.get(name, source))


def _sub_configs(config: Any) -> dict[str, Any]:
    """The config's sub-configs (text_config, vision_config, ...), by attribute name."""
    from transformers import PretrainedConfig

    return {k: v for k, v in vars(config).items() if isinstance(v, PretrainedConfig) and not k.startswith("_")}


def _tiny_per_layer(default: Any, kwargs: dict[str, Any], source: list[int]) -> dict[str, Any]:
    """``per_layer_config`` for the tiny layers (``source[i]``: the default layer tiny layer i stands
    for): that layer's overrides, a tiny field scaled by the override's ratio to the default's global value."""
    overrides = {int(k): v for k, v in (default.to_dict().get("per_layer_config") or {}).items()}
    if not overrides:
        return {}
    tiny = {}
    for i, j in enumerate(source):
        layer = {}
        for name, v in overrides.get(j, {}).items():
            base = _value(default, name)
            scaled = isinstance(kwargs.get(name), int) and isinstance(v, int) and isinstance(base, int) and base > 0
            layer[name] = max(1, round(kwargs[name] * v / base)) if scaled else v
        if layer:
            tiny[i] = layer
    return {"per_layer_config": tiny}


MAX_PARAMETERS = 20_000_000  # a "tiny" model above this kept a size field the tool does not set


def _build(model_type: str, **fields: Any) -> Any:
    """The tiny model of ``model_type`` in fp32, eval mode (its parameters counted first, on the meta device);
    ``fields``: attributes set on the tiny config first (a test's smaller image, say)."""
    config = tiny_config(model_type)
    for name, value in fields.items():
        setattr(config, name, value)
    make, config = _causal_lm(config)
    with torch.device("meta"):  # count first: a config with an unset size field could fill the memory
        count = sum(p.numel() for p in make(config).parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {count / 1e6:.0f}M parameters (a size field this tool does not "
                         "set)")
    torch.manual_seed(0)
    try:
        model = make(config, attn_implementation="sdpa")
    except (ValueError, ImportError):  # no sdpa: its eager attention (moa_flex.compile switches to sdpa or refuses)
        torch.manual_seed(0)
        model = make(config, attn_implementation="eager")
    for name, value in GENERATION_FIELDS.get(model_type, {}).items():
        setattr(model.generation_config, name, value)
    model.generation_config.eos_token_id = None  # greedy runs its NEW tokens (an EOS would end a row early)
    for name in GREEDY_OFF:  # greedy is the plain argmax the reference predicts
        if getattr(model.generation_config, name, None) is not None:
            setattr(model.generation_config, name, None)
    return _perturbed(model.float().eval())


PERTURB_STD = 0.02


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with noise of std :data:`PERTURB_STD` added to every floating-point parameter:
    a term whose parameters start at zero (Doge's ``A``, gates, learned biases) would otherwise
    vanish on fresh weights, and with it any difference a dropped term makes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * PERTURB_STD)
    return model


def _causal_lm(config: Any) -> tuple[Callable[..., Any], Any]:
    """How to build the causal LM of ``config``: AutoModelForCausalLM on it, or, where that fails and the
    causal-LM class takes one of its sub-configs (MusicGen's decoder), that class on the sub-config."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
        return AutoModelForCausalLM.from_config, config
    except (AttributeError, TypeError):
        wanted = getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "config_class", None)
        sub = next((c for c in _sub_configs(config).values() if wanted and isinstance(c, wanted)), None)
        if sub is None:
            raise
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._from_config, sub


def _ids(vocab: int, length: int, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


def _random_plan(config: Any, seed: int = 0) -> Any:
    """Heterogeneous per-head spans well below the prompt, so the plan really cuts."""
    from moa_flex.plan import ModelShape, Plan

    from moa_flex.architecture import selecting_layers

    shape = ModelShape.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.randint(4, 13, (shape.num_layers, shape.num_kv_heads), generator=gen).double()
    beta = torch.randint(0, 3, (shape.num_layers, shape.num_kv_heads), generator=gen) / 8
    for layer, one in enumerate(selecting_layers(config, shape.layer_indices)):
        if one:  # an indexer picks one set of keys for all the layer's heads: one rule for them
            alpha[layer], beta[layer] = alpha[layer, 0], beta[layer, 0]
    return Plan(shape, alpha.tolist(), beta.tolist(), granularity="kv_head", sink=4, min_span=8, span_multiple=4)


def check_type(model_type: str) -> Result:
    """Build, compile and check one model type (module docstring)."""
    import moa_flex
    from moa_flex.architecture import text_config
    from moa_flex.plan import Plan
    from moa_flex.reference import planned_logits, reference_logits

    t0 = time.perf_counter()
    try:
        model = _build(model_type)
    except Exception as e:  # noqa: BLE001 - any failure to build is this type's status
        return Result(model_type, "not built", _short(e), time.perf_counter() - t0)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else 128
    ids = _ids(vocab, PROMPT, 1, 1)
    try:
        with torch.no_grad():
            stock = model(input_ids=ids, use_cache=False).logits
    except Exception as e:  # noqa: BLE001
        return Result(model_type, "not built", f"stock forward: {_short(e)}", time.perf_counter() - t0)
    try:
        moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    except (ValueError, NotImplementedError, TypeError) as e:  # declined before anything changed
        return Result(model_type, "refused", _short(e), time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return Result(model_type, "fails", f"compile: {type(e).__name__}: {_short(e)}", time.perf_counter() - t0)
    try:
        with torch.no_grad():
            dense = model(input_ids=ids, use_cache=False).logits
    except Exception as e:  # noqa: BLE001
        return Result(model_type, *_refused_or_failed(e), time.perf_counter() - t0)
    diff = float((dense - stock).abs().max())
    if not diff <= DENSE_TOL:
        return Result(model_type, "fails", f"dense plan differs from the stock model by {diff:.3g}", time.perf_counter() - t0)
    try:
        sparse = _random_plan(model.config)
        model.moa_flex.set_plan(sparse)
        with torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits
        with attention_kept(model):
            want = reference_logits(model, sparse, input_ids=ids)
        diff = float((got - want).abs().max())
        if not diff <= SPARSE_TOL:
            return Result(model_type, "fails", f"sparse plan differs from the reference by {diff:.3g}",
                          time.perf_counter() - t0)
        batch = _ids(vocab, PROMPT, BATCH, 2)
        mask = torch.ones_like(batch)
        mask[0, :5] = 0
        pad = getattr(text_config(model.config), "pad_token_id", None)
        with torch.no_grad():  # num_return_sequences: MusicGen's own generate reads it, and transformers leaves it None
            out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=pad or 0, num_return_sequences=1)
        seq = decoded(model, out)
        full_mask = torch.cat([mask, torch.ones(BATCH, NEW, dtype=mask.dtype)], dim=1)
        with attention_kept(model):
            ref = planned_logits(model, sparse, PROMPT + NEW, seq[:, :-1], full_mask[:, :-1])  # the request's plan
        predicted = ref[:, PROMPT - 1:].argmax(-1)
        if not torch.equal(predicted, seq[:, PROMPT:]):
            return Result(model_type, "fails", "greedy generate differs from the reference's tokens",
                          time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return Result(model_type, *_refused_or_failed(e), time.perf_counter() - t0)
    return Result(model_type, "supported", "dense, sparse and generate match", time.perf_counter() - t0)


def decoded(model: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The tokens the decoder ran, [batch, prompt + new], from ``generate``'s output: as is, or, for
    MusicGen's own generate ([batch, codebooks, length]: its delay pattern undone, pad tokens dropped),
    with one codebook, the decoder start token put back in place of the first prompt token, which
    the delay pattern's first column overwrites."""
    if out.dim() == 2:
        return out
    if out.dim() != 3 or out.shape[1] != 1:
        raise ValueError(f"generate returned {tuple(out.shape)}; the matrix reads [batch, length] or one codebook")
    start = torch.full((out.shape[0], 1), int(model.generation_config.decoder_start_token_id), dtype=out.dtype)
    return torch.cat([start, out[:, 0]], dim=1)


@contextlib.contextmanager
def attention_kept(model: torch.nn.Module) -> Any:
    """The attention implementation of every config of ``model`` (its own, its sub-models' and sub-configs'),
    as it was before the block. The reference switches the model to its own implementation and back by the
    top-level config's name only; where the sub-models run another one (GOT-OCR2: eager at the top, as its vision
    encoder has no SDPA, and the SDPA that ``moa_flex.compile`` set in its text model), they would stay switched."""
    configs = {id(c): c for c in _all_configs(model) if hasattr(c, "_attn_implementation_internal")}
    saved = {key: config._attn_implementation_internal for key, config in configs.items()}
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = saved[key]


def _all_configs(model: torch.nn.Module) -> list[Any]:
    """The configs of ``model`` and its sub-models, and their sub-configs at any depth."""
    todo = [m.config for m in model.modules() if getattr(m, "config", None) is not None]
    found = []
    while todo:
        config = todo.pop()
        if all(config is not c for c in found):
            found.append(config)
            todo.extend(_sub_configs(config).values())
    return found


def _refused_or_failed(e: BaseException) -> tuple[str, str]:
    """After compile: moa-flex's own refusals (a ValueError / NotImplementedError raised in
    moa-flex's code, naming what it does not model; at the first call, when the pass sees the
    traced graph: said so) vs anything else (a failure: a bug)."""
    from moa_flex.runtime.verify import VerifyError

    inner = getattr(e, "inner_exception", None) or e  # Dynamo wraps the backend's error (BackendCompilerFailed)
    if isinstance(inner, VerifyError):
        return "fails", _short(inner)
    tb = traceback.extract_tb(inner.__traceback__)
    ours = bool(tb) and any(Path(tb[-1].filename).resolve().is_relative_to(root) for root in _package_roots())
    if isinstance(inner, (ValueError, NotImplementedError)) and ours:
        return "refused", f"(at the first call) {_short(inner)}"
    return "fails", f"{type(inner).__name__}: {_short(inner)}"


def _package_roots() -> list[Path]:
    """Where moa-flex's own code lives (the passes are a package of their own folder)."""
    import moa_flex
    import moa_flex.passes

    return [Path(moa_flex.__file__).resolve().parent, Path(moa_flex.passes.__file__).resolve().parent]


def _short(e: BaseException, n: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= n else text[: n - 3] + "..."


def run(types: Sequence[str], timeout: int, progress: bool = True) -> list[Result]:
    """Check ``types``, each under a ``timeout`` (seconds; 0: none), a line per type on stderr."""
    results = []
    for i, model_type in enumerate(types):
        if timeout:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(timeout)
        try:
            r = check_type(model_type)
        except _Timeout:
            r = Result(model_type, "fails", f"timed out after {timeout} s", float(timeout))
        finally:
            if timeout:
                signal.alarm(0)
        torch._dynamo.reset()
        results.append(r)
        if progress:
            print(f"[{i + 1}/{len(types)}] {model_type}: {r.status} ({r.seconds:.1f} s) {r.detail[:160]}",
                  file=sys.stderr, flush=True)
    return results


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def markdown(results: Sequence[Result], command: str) -> str:
    """docs/SUPPORT.md: counts, then one row per model type."""
    import transformers

    counts = {s: sum(r.status == s for r in results) for s in ("supported", "refused", "fails", "not built")}
    lines = [
        "# Support matrix", "",
        (f"Generated by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with "
         f"transformers {transformers.__version__} and torch {torch.__version__} (CPU, fp32, tiny random configs; "
         "what each check does: `moa_flex/support.py`)."), "",
        f"{len(results)} causal-LM model types: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", "",
        ("- supported: a dense plan equals the stock model (1e-5), a random sparse plan equals the independent "
         "reference (1e-4), and greedy generate of a left-padded batch is token-exact against the reference."),
        ("- refused: moa-flex declines the type with the reason shown, at compile time or (where marked) at the first "
         "call, before any result (nothing is rewritten)."),
        "- fails: a check disagrees or an error past compile: an open bug.",
        "- not built: no tiny model could be made from the type's config on the CPU (the reason shown).", "",
        "| model type | status | detail |", "|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.model_type} | {r.status} | {r.detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moa_flex.support", description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="*", default=None, help="model types (default: every causal-LM type)")
    ap.add_argument("--out", default=None, help="write the markdown table here (default: docs/SUPPORT.md for all "
                                                "types, stdout for --types)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per type (0: none)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    known = causal_lm_types()
    types = args.types if args.types else known
    unknown = [t for t in types if t not in known]
    if unknown:
        ap.error(f"not causal-LM model types of this transformers: {unknown}")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 65536)
    results = run(types, args.timeout, progress=not args.quiet)
    command = "python -m moa_flex.support" + (f" --types {' '.join(args.types)}" if args.types else "")
    text = markdown(results, command)
    out = args.out or (None if args.types else str(Path(__file__).resolve().parent.parent / "docs" / "SUPPORT.md"))
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
    return 0 if not any(r.status == "fails" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
