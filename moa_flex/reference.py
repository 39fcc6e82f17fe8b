"""Independent oracles of a plan inside a model: an eager attention implementation (float64
softmax under :func:`moa_flex.masks.reference_mask`, the brute-force keep rule), registered
with transformers as ``attn_implementation="moa_reference"``, and greedy decoding by full
forwards. Slow and obviously right: the tests' oracle and the support matrix's
(:mod:`moa_flex.support`); nothing in the fast paths uses it."""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from moa_flex.architecture import slot_offset
from moa_flex.kernels.quant import dequantize_fp8, is_quantized, quantize_fp8
from moa_flex.masks import reference_mask
from moa_flex.plan import Plan

_REF_PLAN: dict[str, object] = {}


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # noqa: ANN001, ANN201
    """Independent eager attention: float64 softmax with reference_mask of the plan in _REF_PLAN,
    ANDed with the model's own mask; left padding handled by shifting each row's positions.
    The request is planned for _REF_PLAN["N"] tokens (default: the input length), each row for
    that minus its left pad. ``_REF_PLAN["kv_dtype"]`` FP8: keys and values as an FP8 cache
    holds them (quantized and dequantized per token and KV head)."""
    plan = _REF_PLAN["plan"]
    if _REF_PLAN.get("kv_dtype") is not None and is_quantized(_REF_PLAN["kv_dtype"]):
        key, value = (dequantize_fp8(*quantize_fp8(t)) for t in (key, value))
    B, _, Q, _ = query.shape
    K = key.shape[2]
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, 1).double()
    v = value.repeat_interleave(group, 1).double()
    scores = (query.double() @ k.transpose(-1, -2)) * (scaling or 1 / math.sqrt(query.shape[-1]))
    if kwargs.get("softcap"):
        scores = kwargs["softcap"] * torch.tanh(scores / kwargs["softcap"])
    allowed = torch.ones(B, 1, Q, K, dtype=torch.bool, device=query.device) if attention_mask is None else (
        attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    )
    layer = plan.model.plan_layer(_calling_layer(module))
    heads = plan.model.heads_of(layer)  # the layer's own (dots3's layers differ in them)
    keep = torch.zeros(B, heads, Q, K, dtype=torch.bool, device=query.device)
    pads = _REF_PLAN.get("pads") or [0] * B
    N = _REF_PLAN.get("N") or K
    for b, pad in enumerate(pads):
        n = K - pad  # real tokens of the row (a forward without cache: Q == K)
        keep[b, :, pad:, pad:] = reference_mask(plan, layer, N - pad, n, 0, n)[:heads].to(query.device)
    indices = kwargs.get("indices")  # DeepSeek Sparse Attention: each query's keys, as the indexer picked them
    if indices is not None:
        allowed = allowed & torch.zeros(B, Q, K, dtype=torch.bool, device=query.device).scatter(
            -1, indices.long(), True).unsqueeze(1)
    if attention_mask is not None and attention_mask.dtype != torch.bool:  # an additive mask: its kept terms too
        scores = scores + torch.where(allowed, attention_mask.double(), 0.0)  # (Doge's per-key bias; HF's are 0)
    mask = keep & allowed
    scores = scores.masked_fill(~mask, float("-inf"))
    sinks = kwargs.get("s_aux")  # learned sink logits [H] (GPT-OSS): one more softmax term, no value
    if sinks is None:
        probs = scores.softmax(-1).nan_to_num(0.0)
    else:
        col = sinks.double().view(1, -1, 1, 1).expand(B, -1, Q, 1)
        probs = torch.cat([scores, col], dim=-1).softmax(-1)[..., :-1]
    out = (probs @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _calling_layer(module: torch.nn.Module) -> int:
    """The decoder layer whose call this is: the module's ``layer_idx``, or, for an attention
    block shared by several layers (Zamba's, ``layer_idx`` None), the decoder layer running; for
    a module that runs several times per forward on the cache slot its caller passes (HRM's
    ``cycle_offset``, Dory's ``cache_offset``), that call's slot."""
    slot = _REF_PLAN.get("slots", {}).get(id(module))
    if slot is not None:
        return slot
    idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) and idx >= 0 else _REF_PLAN["layer"]


def _record_slot(module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
    _REF_PLAN.setdefault("slots", {})[id(module)] = module.layer_idx + int(kwargs.get(slot_offset(module), 0))


def _track_layers(model: torch.nn.Module) -> list:
    """Forward pre-hooks on the decoder layers (``...layers.<i>``, GPT-style ``...h.<i>``,
    BERT-style ``...layer.<i>``, MPT-style ``...blocks.<i>``, XLM's ``...attentions.<i>``) recording which one runs."""
    handles = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "layer_idx", None), int) and slot_offset(module):
            # HRM's cycles, Dory's loops: this call's cache slot is layer_idx + the caller's offset
            handles.append(module.register_forward_pre_hook(_record_slot, with_kwargs=True))
        m = re.fullmatch(r"(?:.*\.)?(?:layers|layer|h|blocks|attentions)\.(\d+)", name)
        if m:
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, i=int(m.group(1)): _REF_PLAN.__setitem__("layer", i)))
    return handles


def _indexer_rule(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of an indexer (DeepSeek Sparse Attention): its causal mask [B, Q, K]
    (argument 3) ANDed with the layer's keep rule (:func:`reference_mask`, left pads shifted as
    in :func:`reference_attention`), so that its top-k picks among the keys the rule keeps."""
    plan = _REF_PLAN["plan"]
    args = list(args)
    at = _mask_position(module)
    mask = args[at] if len(args) > at else kwargs["attention_mask"]
    B, Q, K = mask.shape[0], mask.shape[-2], mask.shape[-1]  # [B, Q, K], or [B, 1, Q, K] (Qwen4-Exp's)
    rule = torch.zeros(B, Q, K, dtype=torch.bool, device=mask.device)
    pads = _REF_PLAN.get("pads") or [0] * B
    N = _REF_PLAN.get("N") or K
    for b, pad in enumerate(pads):
        n = K - pad
        heads = reference_mask(plan, plan.model.plan_layer(module.layer_idx), N - pad, n, 0, n)  # [H, n, n]
        if not bool((heads == heads[:1]).all()):
            raise ValueError("an indexer's layer needs one rule for all its heads (a plan of granularity 'kv_head')")
        rule[b, pad:, pad:] = heads[0].to(mask.device)
    rule = rule.view(mask.shape[:1] + (1,) * (mask.dim() - 3) + rule.shape[1:])
    mask = mask & rule if mask.dtype == torch.bool else mask.masked_fill(~rule, torch.finfo(mask.dtype).min)
    if len(args) > at:
        args[at] = mask
    else:
        kwargs["attention_mask"] = mask
    return tuple(args), kwargs


def _mask_position(module: torch.nn.Module) -> int:
    """Where an indexer's forward takes its ``attention_mask`` among the positional arguments
    (DeepSeek Sparse Attention's: 3, Qwen4-Exp's: 2)."""
    names = list(inspect.signature(module.forward).parameters)
    return names.index("attention_mask") if "attention_mask" in names else 3


def _is_indexer(module: torch.nn.Module) -> bool:
    """An indexer of DeepSeek Sparse Attention (``index_topk``) or Qwen4-Exp (``token_budget`` in
    blocks of ``compress_ratio``), with its layer."""
    picks = isinstance(getattr(module, "index_topk", None), int) or (
        isinstance(getattr(module, "token_budget", None), int) and isinstance(getattr(module, "compress_ratio", None), int))
    return picks and isinstance(getattr(module, "layer_idx", None), int)


def _rule_indexers(model: torch.nn.Module) -> list:
    """:func:`_indexer_rule` on every indexer of ``model`` (:func:`_is_indexer`), and a mark of
    the calls inside one, where :class:`_EarliestTopk` breaks the top-k's ties."""
    hooks = []
    for m in model.modules():
        if _is_indexer(m):
            hooks.append(m.register_forward_pre_hook(_indexer_rule, with_kwargs=True))
            hooks.append(m.register_forward_pre_hook(lambda *_: _REF_PLAN.update(indexing=True)))
            hooks.append(m.register_forward_hook(lambda *_: _REF_PLAN.update(indexing=False)))  # None: output kept
    return hooks


class _EarliestTopk(torch.overrides.TorchFunctionMode):
    """Inside an indexer (DeepSeek Sparse Attention): its top-k along the keys with equal scores
    taken in key order, the earlier first, as moa-flex selects (moa_flex/runtime/selection.py):
    a stable descending sort, its first k (-0.0 equals 0.0, as floats compare)."""

    TOPKS = (torch.topk, torch.Tensor.topk)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in self.TOPKS and _REF_PLAN.get("indexing"):
            x = args[0]
            k = args[1] if len(args) > 1 else kwargs["k"]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            if dim not in (-1, x.dim() - 1) or not kwargs.get("largest", True):
                raise NotImplementedError("the reference breaks an indexer's ties along its last dim, largest first")
            order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
            return torch.return_types.topk((x.gather(-1, order), order))
        return func(*args, **kwargs)


@contextlib.contextmanager
def earliest_ties() -> Iterator[None]:
    """Every top-k inside the block breaks ties as an indexer's does under the reference: equal
    scores to the earlier index (for calling an indexer's own code directly, as the tests do)."""
    _REF_PLAN["indexing"] = True
    try:
        with _EarliestTopk():
            yield
    finally:
        _REF_PLAN.pop("indexing", None)


AttentionInterface.register("moa_reference", reference_attention)
# The reference receives the mask HF builds for SDPA (causal, padding, the model's own window).
AttentionMaskInterface.register("moa_reference", sdpa_mask)


def own_code_attention(model: torch.nn.Module) -> bool:
    """Whether the model computes attention in its own code (transformers marks it as taking
    neither SDPA nor the attention-function interface), where ``attn_implementation`` cannot
    route it to :func:`reference_attention`."""
    return getattr(model, "_supports_sdpa", True) is False and getattr(model, "_supports_attention_backend", True) is False


class _KeepBeforeSoftmax(torch.overrides.TorchFunctionMode):
    """The reference of attention computed in a model's own code: every softmax over the last dim
    of a [B, plan heads, Q, K] tensor (the scores; or its [B * heads, Q, K] view) inside a decoder
    layer gets the plan's keep rule
    (:func:`moa_flex.masks.reference_mask` of that layer, left pads shifted as in
    :func:`reference_attention`) as -inf before it; whatever else the model computes runs as it is."""

    SOFTMAXES = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in self.SOFTMAXES and "layer" in _REF_PLAN:
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            plan = _REF_PLAN["plan"]
            heads = plan.num_heads if plan.model.layer_heads is None else plan.model.heads_of(
                plan.model.plan_layer(_REF_PLAN["layer"]))
            if x.dim() == 4 and dim in (-1, 3) and x.shape[1] == heads:
                args = (x.masked_fill(~self._keep(x, plan), float("-inf")), *args[1:])
            elif x.dim() == 3 and dim in (-1, 2) and x.shape[0] % heads == 0:  # [B * H, Q, K] (bmm)
                x4 = x.view(-1, heads, *x.shape[1:])
                args = (x4.masked_fill(~self._keep(x4, plan), float("-inf")).view(x.shape), *args[1:])
        return func(*args, **kwargs)

    @staticmethod
    def _keep(x: torch.Tensor, plan: Plan) -> torch.Tensor:
        B, H, Q, K = x.shape
        keep = torch.zeros(B, H, Q, K, dtype=torch.bool, device=x.device)
        pads = _REF_PLAN.get("pads") or [0] * B
        N = _REF_PLAN.get("N") or K
        for b, pad in enumerate(pads):
            n = K - pad
            keep[b, :, pad:, pad:] = reference_mask(plan, plan.model.plan_layer(_REF_PLAN["layer"]), N - pad, n, 0,
                                                    n)[:H].to(x.device)
        # rows that keep nothing (left pads) stay as the model had them: the model masks them itself
        return keep | ~keep.any(-1, keepdim=True)


def reference_logits(model, plan: Plan, pads: list[int] | None = None, N: int | None = None,  # noqa: ANN001
                     kv_dtype: torch.dtype | None = None, **inputs) -> torch.Tensor:
    """Logits with reference_attention (an indexer picking among the keys the rule keeps:
    :func:`_indexer_rule`), through the model's uncompiled forward; ``pads``:
    left-pad tokens per row (from the 2-D mask); ``N``: planned length (default: input length);
    ``kv_dtype``: attend keys and values as a cache of that dtype stores them (FP8). A model that
    computes attention in its own code runs it with the keep rule applied before each softmax
    (``_KeepBeforeSoftmax``; no FP8 there)."""
    _REF_PLAN.update(plan=plan, pads=pads, N=N, kv_dtype=kv_dtype)
    _REF_PLAN.pop("layer", None)
    own = own_code_attention(model)
    if own and kv_dtype is not None and is_quantized(kv_dtype):
        raise NotImplementedError("the reference of attention in a model's own code does not model an FP8 cache")
    before = model.config._attn_implementation
    if not own:
        model.set_attn_implementation("moa_reference")
    state = getattr(model, "moa_flex", None)
    forward = state.original_forward if state is not None else model
    hooks = _track_layers(model) + _rule_indexers(model)
    try:
        with torch.no_grad(), _KeepBeforeSoftmax() if own else contextlib.nullcontext(), _EarliestTopk():
            return forward(**inputs, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
        _REF_PLAN.pop("layer", None)
        _REF_PLAN.pop("slots", None)
        _REF_PLAN.pop("indexing", None)
        if not own:
            model.set_attn_implementation(before)


def planned_logits(model, plan: Plan, N: int, ids: torch.Tensor, mask: torch.Tensor,  # noqa: ANN001
                   kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference logits at every position of ``ids`` for a request planned for N tokens
    (padded width): what decoding must give at every step of the request (over a cache of
    ``kv_dtype``, FP8 included)."""
    pads = (mask == 0).int().cumprod(1).sum(1).tolist()
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return reference_logits(model, plan, pads=pads, N=N, kv_dtype=kv_dtype, input_ids=ids, attention_mask=mask,
                            position_ids=position_ids)


def greedy(model, prompt: torch.Tensor, max_new_tokens: int, eos: int | None = None) -> list[int]:  # noqa: ANN001
    """Independent greedy decoding of one prompt [T]: a full forward per step, argmax, stop after EOS."""
    seq = prompt.tolist()
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
    return out
