"""Multimodal wrappers' generate (moa_flex.runtime.decode_loop): text-only and image requests
token-exact against the stock model, a sparse plan against the reference, and the requests
MoA cannot run (bidirectional image blocks) refused by name."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import utils as generation_utils

import moa_flex
from moa_flex.plan import Plan
from moa_flex.reference import reference_logits
from moa_flex.runtime.decode_loop import _check_request, _prefill_inputs
from moa_flex.support import _build, _random_plan, attention_kept, check_type

# transformers' generate encodes images before the loop (mm_encoder_outputs) from 5.2x on
PRE_ENCODED = "mm_encoder_outputs" in getattr(generation_utils, "MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL", ())
PROMPT, NEW, IMAGE_AT = 24, 5, 8  # tokens; the image's placeholders start at IMAGE_AT in every row


@pytest.mark.parametrize("model_type", [
    # 6-10 s each (make test-slow); the default run generates with gemma3 below (fuyu: make test-slow)
    pytest.param("gemma3", marks=pytest.mark.slow),
    pytest.param("fuyu", marks=pytest.mark.slow),
    pytest.param("got_ocr2", marks=pytest.mark.slow),
    pytest.param("gemma4", marks=pytest.mark.slow),
    pytest.param("gemma4_unified", marks=pytest.mark.slow),
])
def test_text_only_requests_pass_the_support_check(model_type: str) -> None:
    """transformers hands a text-only request of a multimodal wrapper an empty mm_encoder_outputs:
    dense == stock, sparse == reference, generate token-exact (the support matrix's check)."""
    r = check_type(model_type)
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


@dataclass
class Case:
    """A tiny multimodal model, compiled with a dense plan, and the stock model's greedy tokens."""

    model: Any
    request: dict  # input_ids (image placeholders included), left-padded mask, greedy settings
    image: dict  # the image inputs of the request
    stock_text: torch.Tensor | None = None  # greedy tokens of the stock model, text only
    stock_image: torch.Tensor | None = None  # and with the image


def _prompt(image_token: int, tokens: int) -> dict:
    ids = torch.randint(6, 128, (2, PROMPT), generator=torch.Generator().manual_seed(0))  # no placeholder by chance
    ids[:, IMAGE_AT:IMAGE_AT + tokens] = image_token
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _gemma3() -> Case:
    model = _build("gemma3", mm_tokens_per_image=4)  # a 224-pixel image pooled to 4 tokens
    # the projection starts at zero (image features all 0): random, so the image changes the answer
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, generator=torch.Generator()
                          .manual_seed(1))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    return Case(model, _prompt(model.config.image_token_id, 4), {"pixel_values": pixels})


def _fuyu() -> Case:
    model = _build("fuyu", image_token_id=5)  # the default id is outside the tiny vocabulary, which Fuyu embeds
    patches = torch.randn(2, 6, 30 * 30 * 3, generator=torch.Generator().manual_seed(2))  # 6 patches of 30x30 RGB
    return Case(model, _prompt(5, 6), {"pixel_values": patches})


class _Cases(dict):
    """Per model type, built at its first use (Fuyu's only in make test-slow): stock tokens first,
    then the model compiled (dense plan, eager backend)."""

    def __missing__(self, name: str) -> Case:
        case = {"gemma3": _gemma3, "fuyu": _fuyu}[name]()
        with torch.no_grad():
            case.stock_text = case.model.generate(**case.request)
            if "pixel_values" in inspect.signature(case.model.forward).parameters and PRE_ENCODED:
                case.stock_image = case.model.generate(**case.request, **case.image)
        # (transformers 5.17's Fuyu takes image_patches, not pixel_values, and its generate passes raw images
        # into the forward, where Gemma 3's vision tower would be compiled too: image cases are 5.2x's)
        assert case.stock_image is None or not torch.equal(case.stock_text, case.stock_image), \
            "the image must change the stock answer"
        moa_flex.compile(case.model, Plan.dense(case.model.config), backend="eager", progress=False,
                         compile_cache=False)
        self[name] = case
        return case


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return _Cases()


@pytest.mark.parametrize("name", ["gemma3", pytest.param("fuyu", marks=pytest.mark.slow)])  # fuyu: 8 s, make test-slow
def test_dense_generate_equals_stock_text_only_and_with_an_image(cases: dict[str, Case], name: str) -> None:
    """Image features enter at the prefill only (merged into the placeholders' embeddings); decode
    steps get none, as in transformers' loop. Gemma 3's all-text token_type_ids (what its
    processor returns for text) change nothing: equal too."""
    case = cases[name]
    case.model.moa_flex.set_plan(Plan.dense(case.model.config))
    with torch.no_grad():
        assert torch.equal(case.model.generate(**case.request), case.stock_text)
        if case.stock_image is not None:
            assert torch.equal(case.model.generate(**case.request, **case.image), case.stock_image)
        if name == "gemma3":
            text_types = torch.zeros_like(case.request["input_ids"])
            assert torch.equal(case.model.generate(**case.request, token_type_ids=text_types), case.stock_text)


def test_sparse_plan_with_an_image_matches_the_reference(cases: dict[str, Case]) -> None:
    """Greedy tokens of an image request under a random sparse plan == the reference's argmax at every
    step (the support matrix's generate check, with the image's features handed to the reference)."""
    case = cases["gemma3"]
    if case.stock_image is None:
        pytest.skip("this transformers' generate does not encode images before the loop")
    model, request = case.model, case.request
    plan = _random_plan(model.config)
    model.moa_flex.set_plan(plan)
    with torch.no_grad():
        seq = model.generate(**request, **case.image)
        features = {"image": model.model.get_image_features(case.image["pixel_values"], return_dict=True)}
    mask = torch.cat([request["attention_mask"], torch.ones(2, NEW, dtype=torch.long)], dim=1)[:, :-1]
    pads = (mask == 0).int().cumprod(1).sum(1).tolist()
    with attention_kept(model):
        ref = reference_logits(model, plan, pads=pads, N=PROMPT + NEW, input_ids=seq[:, :-1], attention_mask=mask,
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0), mm_encoder_outputs=features)
    assert torch.equal(ref[:, PROMPT - 1:].argmax(-1), seq[:, PROMPT:])
    assert not torch.equal(seq, case.stock_image), "the sparse plan must change the answer (it cuts)"


def test_bidirectional_image_blocks_are_refused(cases: dict[str, Case]) -> None:
    """Gemma 3 with token_type_ids marking the image: its image tokens attend each other both ways
    at prefill, which MoA's causal masks cannot reproduce: refused before anything runs, and the
    model answers the next request as before."""
    case = cases["gemma3"]
    case.model.moa_flex.set_plan(Plan.dense(case.model.config))
    types = (case.request["input_ids"] == case.model.config.image_token_id).long()
    with pytest.raises(NotImplementedError, match="attend itself in both directions"), torch.no_grad():
        case.model.generate(**case.request, **case.image, token_type_ids=types)
    with pytest.raises(NotImplementedError, match="attend itself in both directions"), torch.no_grad():
        case.model(input_ids=case.request["input_ids"], token_type_ids=types)  # a plain forward too
    if case.stock_image is not None:
        with torch.no_grad():
            assert torch.equal(case.model.generate(**case.request, **case.image), case.stock_image)


def test_what_each_family_is_passed_and_refused() -> None:
    """Token types: Gemma 4's blocks only where its config turns them on; a lone image token is a
    block of one (causal). Image features over several prefill chunks and unknown arguments:
    refused by name."""
    gemma4 = _build("gemma4")
    types = torch.zeros(1, 10, dtype=torch.long)
    types[0, 3:6] = 1
    assert _prefill_inputs(gemma4, {"mm_token_type_ids": types}, 10, None) == {"mm_token_type_ids": types}  # off
    gemma4.config.get_text_config().use_bidirectional_attention = "vision"
    with pytest.raises(NotImplementedError, match="mm_token_type_ids in \\[1, 2\\]"):
        _prefill_inputs(gemma4, {"mm_token_type_ids": types}, 10, None)
    lone = torch.zeros(1, 10, dtype=torch.long)
    lone[0, 4] = 2
    assert _prefill_inputs(gemma4, {"mm_token_type_ids": lone, "mm_encoder_outputs": {}}, 10, 16) == {
        "mm_token_type_ids": lone}  # transformers' empty mm_encoder_outputs of a text-only request: left out
    features = {"image": torch.zeros(1)}
    with pytest.raises(NotImplementedError, match="prefill_chunk >= 10"):
        _prefill_inputs(gemma4, {"mm_encoder_outputs": features}, 10, 8)
    with pytest.raises(NotImplementedError, match="token_type_ids"):  # Gemma 4's token types are mm_token_type_ids
        _check_request(GenerationConfig(), {"token_type_ids": types}, False, gemma4)
    _check_request(GenerationConfig(), {"mm_token_type_ids": types, "pixel_values": None, "mm_encoder_outputs": {}},
                   False, gemma4)


def test_positions_from_the_image_layout_are_refused_with_images() -> None:
    """A model deriving its positions from the image layout (get_rope_index, multimodal rotary
    positions) would read generate's text positions as another prompt: its image requests are
    refused by name, its text-only requests pass."""
    gemma4 = _build("gemma4")
    features = {"image": torch.zeros(1)}
    assert _prefill_inputs(gemma4, {"mm_encoder_outputs": features}, 10, None) == {"mm_encoder_outputs": features}
    gemma4.model.get_rope_index = lambda *args, **kwargs: None  # what a Qwen-VL style model has
    with pytest.raises(NotImplementedError, match=r"get_rope_index.*text positions"):
        _prefill_inputs(gemma4, {"mm_encoder_outputs": features}, 10, None)
    assert _prefill_inputs(gemma4, {"mm_encoder_outputs": {}}, 10, None) == {}  # text only
