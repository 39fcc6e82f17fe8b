"""Models placed by accelerate (device_map): hooks swapped for traceable moves, offload refused."""

from __future__ import annotations

import pytest
import torch

import moa_flex
from moa_flex.plan import Plan
from moa_flex.runtime import placement
from moa_flex.runtime.placement import _needing_moves, hooked_modules
from tiny_models import SEQ, ids_of, sparse_plan, tiny_model

accelerate = pytest.importorskip("accelerate")

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _logits_and_tokens(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        tokens = model.generate(input_ids=ids[:, :40], attention_mask=torch.ones_like(ids[:, :40]), max_new_tokens=4,
                                do_sample=False, pad_token_id=0)
    return logits, tokens


def test_dispatched_model_compiles_and_equals_the_plain_one() -> None:
    """accelerate's own dispatch (hooks on every module): compile swaps them for device moves;
    logits and generated tokens equal the same model compiled without dispatch; uncompile puts
    accelerate's hooks back."""
    plan = sparse_plan(tiny_model("llama").config, "kv_head")
    ids = ids_of(SEQ, batch=1)
    plain = moa_flex.compile(tiny_model("llama"), plan, backend="eager", progress=False)
    want = _logits_and_tokens(plain, ids)
    model = accelerate.dispatch_model(tiny_model("llama"), device_map=DEVICE_MAP, force_hooks=True)
    hooked = [name for name, _ in hooked_modules(model)]
    assert "model.layers.1.self_attn" in hooked
    moa_flex.compile(model, plan, backend="eager", progress=False)
    assert not hooked_modules(model)
    # one device: only the outermost module moves what the caller hands in (no hooks inside the traced forward)
    assert [name for name, m in model.named_modules() if m._forward_pre_hooks] == [""]
    got = _logits_and_tokens(model, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    moa_flex.uncompile(model)
    assert [name for name, _ in hooked_modules(model)] == hooked


def test_offloaded_model_is_refused_naming_the_module(tmp_path) -> None:  # noqa: ANN001
    model = accelerate.dispatch_model(tiny_model("llama"), device_map={**DEVICE_MAP, "model.layers.1": "disk"},
                                      offload_dir=str(tmp_path), main_device="cpu")
    before = [name for name, _ in hooked_modules(model)]
    with pytest.raises(ValueError, match="offloaded by accelerate.*'model.layers.1"):
        moa_flex.compile(model, Plan.dense(model.config))
    assert getattr(model, "moa_flex", None) is None and [name for name, _ in hooked_modules(model)] == before


def test_device_moves_go_where_inputs_can_come_from_another_device() -> None:
    """Several devices: every placed module moves its inputs; one device: the outermost only."""
    a, b = torch.device("cuda", 0), torch.device("cuda", 1)
    assert _needing_moves({"": a, "model.layers.0": a, "model.layers.1": b, "lm_head": b, "x": None}) == {
        "", "model.layers.0", "model.layers.1", "lm_head"}
    assert _needing_moves({"": a, "model.layers.0": a, "lm_head": a}) == {""}
    assert _needing_moves({"model": a, "model.layers.0": a, "model.layers.10": a, "lm_head": a, "x": None}) == {
        "model", "lm_head"}
    assert _needing_moves({"model.layers.1": a, "model.layers.10": a}) == {"model.layers.1", "model.layers.10"}


def _several_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The several-device path forced on the CPU: every placed module moves its inputs."""
    monkeypatch.setattr(placement, "_needing_moves", lambda where: {n for n, d in where.items() if d is not None})


def test_moves_inside_the_forward_are_wrapped_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several devices (forced here on the CPU): an inner module's move wraps its forward (an
    attribute of the instance) instead of a forward pre-hook, whose hook dict AOT precompile
    cannot guard; logits and tokens equal the plain model's; uncompile puts accelerate's hooks
    back and the modules' own forwards."""
    _several_devices(monkeypatch)
    plan = sparse_plan(tiny_model("llama").config, "kv_head")
    ids = ids_of(SEQ, batch=1)
    want = _logits_and_tokens(moa_flex.compile(tiny_model("llama"), plan, backend="eager", progress=False), ids)
    model = accelerate.dispatch_model(tiny_model("llama"), device_map=DEVICE_MAP, force_hooks=True)
    hooked = [name for name, _ in hooked_modules(model)]
    moa_flex.compile(model, plan, backend="eager", progress=False)
    assert [name for name, m in model.named_modules() if m._forward_pre_hooks] == [""]
    assert "forward" in model.model.layers[1].self_attn.__dict__  # its move
    got = _logits_and_tokens(model, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    moa_flex.uncompile(model)
    assert [name for name, _ in hooked_modules(model)] == hooked


@pytest.mark.slow  # inductor, cold and warm: about 35 s (make test-slow)
def test_wrapped_moves_are_captured_by_precompile(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The wrapped moves under AOT precompile: no "Expecting clean index here" (the graphs would
    then be traced in every process); a second compile reads the graphs back, and both give the
    plain model's logits (1e-5) and tokens."""
    _several_devices(monkeypatch)
    monkeypatch.setenv("MOA_FLEX_CACHE_DIR", str(tmp_path))
    plan = sparse_plan(tiny_model("llama").config, "kv_head")
    ids = ids_of(SEQ, batch=1)
    want = _logits_and_tokens(moa_flex.compile(tiny_model("llama"), plan, backend="eager", progress=False), ids)
    for warm in (False, True):
        model = accelerate.dispatch_model(tiny_model("llama"), device_map=DEVICE_MAP, force_hooks=True)
        moa_flex.compile(model, plan, progress=False, compile_cache=True)
        got = _logits_and_tokens(model, ids)
        lines = model.moa_flex.log.lines
        assert not [line for line in lines if "cannot capture" in line], lines
        assert warm == any("precompile: read" in line for line in lines)
        assert (got[0] - want[0]).abs().max() <= 1e-5 and torch.equal(got[1], want[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="several devices: a GPU beside the CPU")
def test_layers_on_the_cpu_and_a_gpu_move_their_inputs_and_precompile(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The several-device placement one GPU gives: layer 0 on the CPU (accelerate's main device,
    so not offloaded), the rest on cuda:0. The moves between them run through the wrapped
    forwards; logits and tokens equal the same plan on a plain CUDA model, cold and warm (the
    warm compile reads the precompiled graphs). Run as .gpu/mixed.py on an H100 (docs/DESIGN.md)."""
    monkeypatch.setenv("MOA_FLEX_CACHE_DIR", str(tmp_path))
    plan = sparse_plan(tiny_model("llama").config, "kv_head")
    ids = ids_of(SEQ, batch=1).cuda()
    plain = moa_flex.compile(tiny_model("llama").cuda(), plan, backend="eager", progress=False, compile_cache=False)
    want = _logits_and_tokens(plain, ids)
    device_map = {**DEVICE_MAP, **{name: 0 for name in DEVICE_MAP if name != "model.layers.0"}}
    for warm in (False, True):
        model = accelerate.dispatch_model(tiny_model("llama"), device_map=device_map, main_device="cpu")
        moa_flex.compile(model, plan, progress=False, compile_cache=True)
        assert len([n for n, m in model.named_modules() if n and "forward" in m.__dict__]) > 2
        got = _logits_and_tokens(model, ids)
        assert (got[0].cpu() - want[0].cpu()).abs().max() <= 1e-5 and torch.equal(got[1].cpu(), want[1].cpu())
        assert warm == any("precompile: read" in line for line in model.moa_flex.log.lines)
