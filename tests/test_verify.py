"""The first-call guard (moa_flex.runtime.verify): dense-span moa-flex attention against the model's own call."""

from __future__ import annotations

import pytest
import torch

import moa_flex
from moa_flex import MoaCache
from moa_flex.runtime.attention import MoaRuntime
from moa_flex.runtime.verify import VerifyError, check_close
from tiny_models import ids_of, sparse_plan, tiny_model


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                              do_sample=False, pad_token_id=0, **kw)


# gemma2 (windows, softcapping): 8 s, make test-slow
@pytest.mark.parametrize("family", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_first_calls_are_checked(family: str) -> None:
    """A plain forward and generate's first chunk (left-padded) are compared layer by layer
    and said, once per graph."""
    model = tiny_model(family)
    moa_flex.compile(model, sparse_plan(model.config, "kv_head"), max_length=128, backend="eager", progress=False)
    ids = ids_of(40)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    _generate(model, ids, mask)
    _generate(model, ids, mask)
    said = [line for line in model.moa_flex.log.lines if "verify" in line]
    assert len(said) == 2 and all("2 layers' attention equals the model's own" in line for line in said)


def test_a_first_chunk_over_a_filled_cache_is_said_unchecked() -> None:
    """The prefill graph's first call continues a conversation (the cache holds 10 tokens):
    the model's traced call saw only the chunk, so nothing is compared, and that is said."""
    model = tiny_model("llama")
    plan = sparse_plan(model.config, "kv_head")
    moa_flex.compile(model, plan, max_length=128, backend="eager", progress=False)
    cache = MoaCache(plan, 1, 128)
    for layer in cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
        layer.length.fill_(10)
    cache.mark_filled(10)
    ids = ids_of(30, batch=1)
    _generate(model, ids, torch.ones_like(ids), past_key_values=cache)
    said = [line for line in model.moa_flex.log.lines if "verify" in line]
    assert len(said) == 1 and "not checked on this call for layers [0, 1] (the cache was not empty" in said[0]


def test_a_wrong_attention_is_caught_naming_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite that gets layer 1 wrong (simulated in the dense check's runtime) raises on
    the first call, naming layer 1, returns nothing, and keeps raising on later calls."""
    model = tiny_model("llama")
    moa_flex.compile(model, sparse_plan(model.config, "kv_head"), backend="eager", progress=False)
    real = MoaRuntime.attention

    def off_by_one_layer(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = real(self, *args, **kwargs)
        layer = args[5]  # q, k, v, attn_mask, scale, layer, ...
        return out + 1e-2 if self is model.moa_flex.verify_runtime and layer == 1 else out

    monkeypatch.setattr(MoaRuntime, "attention", off_by_one_layer)
    ids = ids_of(40)
    for _ in range(2):
        with pytest.raises(VerifyError, match=r"layer 1's rewritten attention \(moa_flex::attention\) with dense spans "
                                              r"differs .* by up to 0.01"):
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)


def test_verify_off_runs_no_check() -> None:
    model = tiny_model("llama")
    moa_flex.compile(model, sparse_plan(model.config, "kv_head"), backend="eager", progress=False, verify=False)
    with torch.no_grad():
        model(input_ids=ids_of(40), use_cache=False)
    assert model.moa_flex.verify_runtime is None
    assert not any("verify" in line for line in model.moa_flex.log.lines)
    with pytest.raises(ValueError, match="verify must be True or False"):
        moa_flex.compile(tiny_model("llama"), sparse_plan(model.config, "kv_head"), verify="yes")  # type: ignore[arg-type]


def test_check_close_tolerance_by_dtype_and_real_rows() -> None:
    want = torch.randn(1, 2, 4, 8)
    real = torch.tensor([[False, True, True, True]])
    got = want.clone()
    got[:, :, 0] += 5.0  # a padding row: not compared
    check_close(got, want, real, 3, "x")
    got[:, :, 2] += 1e-3
    with pytest.raises(VerifyError, match="layer 3's.*tolerance 0.0002 for torch.float32"):
        check_close(got, want, real, 3, "x")
    check_close(got.bfloat16(), want.bfloat16(), real, 3, "x")  # within bf16's tolerance
