"""The profiler's cases on a tiny HF model: answered synthetic samples, and the reference
profile from an independent eager attention that keeps q, k, v, O and dO per layer
(registered with transformers as ``moa_test_reference``; tests/test_profile.py, test_hybrid.py,
test_kv_sharing.py).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from moa_flex.data.calibration import answer_samples, synthetic_samples
from moa_flex.data.samples import Sample
from moa_flex.profile.influence import influence_matrix, influence_reference

VOCAB = 64  # the synthetic task's vocabulary in these tests
SINK, SM = 4, 8  # the profiles' sink and span multiple
_CAPTURE: dict = {}  # layer -> (q, k, v, O) of the last forward; "drop" -> (layer, head, i, j) masked


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # noqa: ANN001, ANN201
    """Plain eager causal attention that keeps q, k, v, O (O.grad = dO after backward) per layer
    and can mask one (head, i, j) pair of one layer (``_CAPTURE['drop']``)."""
    group = query.shape[1] // key.shape[1]
    N = query.shape[2]
    kk, vv = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    allowed = torch.ones(query.shape[1], N, N, dtype=torch.bool).tril()
    drop = _CAPTURE.get("drop")
    if drop is not None and drop[0] == module.layer_idx:
        allowed[drop[1], drop[2], drop[3]] = False
    s = (query @ kk.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    o = torch.softmax(s, -1) @ vv
    if o.requires_grad:
        o.retain_grad()
    _CAPTURE[module.layer_idx] = (query, key, value, o)
    return o.transpose(1, 2).contiguous(), None


AttentionInterface.register("moa_test_reference", _reference_attention)
AttentionMaskInterface.register("moa_test_reference", sdpa_mask)


def calib(model, lengths, n=1, seed=0, max_new_tokens=5) -> dict[int, list[Sample]]:
    """Answered synthetic samples: length N -> n samples of at most N tokens."""
    out = {}
    for N in lengths:
        prompts = synthetic_samples(VOCAB, N - max_new_tokens, n, seed=seed + N, num_records=3)
        out[N] = answer_samples(model, prompts, max_new_tokens=max_new_tokens, progress=False)
    return out


def reference_profile(model, sample: Sample) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per layer: reference histogram [L, H, bins], sink share [L, H], and E matrices, from the
    eager attention's q, k, v, O and autograd's dO of the mean answer cross-entropy."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("moa_test_reference")
    try:
        _CAPTURE.clear()
        ids = sample.input_ids.unsqueeze(0)
        A = sample.answer.numel()
        logits = model(input_ids=ids, use_cache=False).logits[0, -A - 1:-1]
        torch.nn.functional.cross_entropy(logits.double(), sample.answer).backward()
        model.zero_grad(set_to_none=True)
        hists, sinks, Es = [], [], {}
        for layer in sorted(key for key in _CAPTURE if isinstance(key, int)):  # attention layers (a hybrid: some)
            q, k, v, o = (t[0].detach() for t in _CAPTURE[layer])
            do = _CAPTURE[layer][3].grad[0]
            scale = model.model.layers[layer].self_attn.scaling
            h, s = influence_reference(q, k, v, o, do, scale=scale, sink=SINK, span_multiple=SM)
            hists.append(h)
            sinks.append(s)
            Es[layer] = influence_matrix(q, k, v, o, do, scale)
        return torch.stack(hists), torch.stack(sinks), Es
    finally:
        model.set_attn_implementation(impl)
