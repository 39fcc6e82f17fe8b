"""Models whose ``generate`` is their own (MusicGen's decoders): moa-flex decodes over the MoA
cache with transformers' per-token loop, feeds the whole prompt to a preparation that would drop
it, refuses a loop that still drops prompt tokens, and runs
several codebook rows per sequence (runtime/generate.py ``_own_loop``, architecture.py ``sequence_mask``)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers

import moa_flex
from moa_flex.plan import Plan
from moa_flex.runtime.generate import new_cache
from moa_flex.support import Result, _ids, _perturbed, check_type, tiny_config

START = 128  # the tiny decoders' pad and start token: one past the vocabulary, as in the real checkpoints


def _musicgen(model_type: str, codebooks: int) -> torch.nn.Module:
    from transformers import MusicgenForCausalLM, MusicgenMelodyForCausalLM

    config = tiny_config(f"{model_type}_decoder")
    config.num_codebooks = codebooks
    torch.manual_seed(0)
    cls = MusicgenMelodyForCausalLM if model_type == "musicgen_melody" else MusicgenForCausalLM
    model = _perturbed(cls(config).eval())
    model.generation_config.decoder_start_token_id = START
    return model


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              pad_token_id=START, num_return_sequences=1)


def _checked(model_type: str) -> Result:
    r = check_type(model_type)
    if r.status == "not built":  # transformers 5.17 validates the tiny composite config's text encoder
        pytest.skip(f"no tiny {model_type} in transformers {transformers.__version__}: {r.detail}")
    return r


def test_musicgen_melody_passes_the_matrix_through_its_own_generate() -> None:
    r = _checked("musicgen_melody")
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


def _drops_prompt(model: torch.nn.Module) -> bool:
    """Whether the stock model's generate, handed a cache of the caller's (as moa-flex hands it
    the MoA cache), runs fewer tokens than the prompt's through its first forward (the prefill)."""
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[-1]),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(input_ids=_ids(128, 12, model.config.num_codebooks, 3), max_new_tokens=2, do_sample=False,
                           pad_token_id=START, num_return_sequences=1, **{name: DynamicCache(config=model.config)})
    finally:
        hook.remove()
    return lengths[0] < 12


def test_musicgen_is_fed_the_whole_prompt() -> None:
    """transformers' MusicgenForCausalLM prefills only the last prompt token when generate is
    handed a cache (its prepare_inputs_for_generation slices input_ids[:, -1:] once a cache is
    passed; in 5.25 it always is): moa-flex feeds the tokens its cache has not seen, says so
    once, and its tokens are those of the stock model recomputing the whole sequence
    (use_cache=False); the type passes the matrix (where its tiny config builds)."""
    model = _musicgen("musicgen", 1)
    ids = _ids(128, 16, 2, 4)
    with torch.no_grad():
        want = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=START,
                              num_return_sequences=1, use_cache=False)
    drops = _drops_prompt(model)
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _generate(model, ids)
    fed = [w for w in caught if "moa-flex feeds them all" in str(w.message)]
    assert len(fed) == int(drops) and (not drops or "fed 1 of the 16 tokens" in str(fed[0].message))
    assert torch.equal(got, want)
    assert "prepare_inputs_for_generation" not in model.__dict__  # the class's method again
    with torch.no_grad():  # num_return_sequences, which MusicGen's own generate reads and transformers leaves None
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=START), want)
    r = _checked("musicgen")
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


def test_a_generate_that_still_drops_the_prompt_is_refused_after_the_request() -> None:
    """A preparation that slices the prompt even without a cache cannot be fed whole: the cache
    counts the tokens the loop ran, and the request is refused instead of returning tokens that
    ignore the prompt."""
    model = _musicgen("musicgen_melody", 1)
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    stock = model.prepare_inputs_for_generation

    def last_only(input_ids: torch.Tensor, **kwargs) -> dict:  # noqa: ANN003
        inputs = stock(input_ids, **kwargs)
        inputs["input_ids"] = inputs["input_ids"][:, -1:]
        inputs["attention_mask"] = None  # no padding: the tokens alone
        return inputs

    model.prepare_inputs_for_generation = last_only
    with pytest.raises(NotImplementedError, match="tokens through the cache for a prompt of 12"):
        _generate(model, _ids(128, 12, 1, 5))
    assert model.prepare_inputs_for_generation is last_only  # the instance's own, put back


def test_several_codebooks_decode_as_the_stock_model_and_padding_is_checked() -> None:
    """Two codebooks: input_ids hold two rows per sequence, the decoder (and the MoA cache) one.
    A dense plan decodes the stock model's tokens, unpadded and for one left-padded sequence; a
    padded batch of several sequences is refused (the stock decoder pads by the mask's first
    rows, the wrong ones), as are codebook rows padded differently. The reference is the stock
    model without a cache (5.17's MusicGen Melody drops the prompt once a cache is passed)."""
    model = _musicgen("musicgen_melody", 2)
    ids = _ids(128, 20, 4, 2)  # 2 sequences x 2 codebooks
    one, one_mask = ids[:2], torch.ones(2, 20, dtype=torch.long)
    one_mask[:, :3] = 0
    with torch.no_grad():  # the stock model recomputing the whole sequence: the prompt whole at every step
        want = tuple(model.generate(input_ids=x, attention_mask=m, max_new_tokens=4, do_sample=False,
                                    pad_token_id=START, num_return_sequences=1, use_cache=False)
                     for x, m in ((ids, None), (one, one_mask)))
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, compile_cache=False)
    padded = torch.ones(4, 20, dtype=torch.long)
    padded[:2, :3] = 0
    with pytest.raises(NotImplementedError, match="pads the wrong sequences"):
        _generate(model, ids, padded)
    with pytest.raises(ValueError, match="padded alike"):
        _generate(model, one, torch.tensor([[0] * 3 + [1] * 17, [1] * 20]))
    cache = new_cache(model, model.moa_flex, 2, 24, None)  # the compiled forward over a MoaCache checks alike
    with pytest.raises(NotImplementedError, match="pads the wrong sequences"), torch.no_grad():
        model(input_ids=ids, attention_mask=padded, past_key_values=cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _generate(model, ids), _generate(model, one, one_mask)
    assert [w for w in caught if "generate() of its own" in str(w.message)], "the own loop is not announced"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert model.moa_flex.cache.batch_size == 1 and model.moa_flex.cache.pads.tolist() == [3]
