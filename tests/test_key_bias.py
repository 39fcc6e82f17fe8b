"""A per-key score bias (Doge's dynamic mask, passes/key_bias.py): read out of the model's
float mask, carried as one more key column, cached beside each key, so prefill, chunks over
the cache and decode add it to every kept key's score as the model does; requests past the
model's top-k selection and FP8 caches refused by name."""

from __future__ import annotations

import pytest
import torch

import moa_flex
from moa_flex.architecture import skips_causal_mask_under_key_bias
from moa_flex.plan import ModelShape, Plan
from moa_flex.reference import planned_logits
from moa_flex.runtime.cache import MoaCache
from moa_flex.support import _build, check_type
from conversation import converse, padded_prompt
from rewrites import check_only_attention_changed, watch_rewrites
from tiny_models import dense_mask_nodes, ids_of, sparse_plan, strong_doge

N = 240  # tokens the conversation is planned for
# transformers 5.17's Doge drops its causal mask for unpadded inputs: refused there (first test), nothing else to run
causal = pytest.mark.skipif(skips_causal_mask_under_key_bias(_build("doge")),
                            reason="this transformers' Doge skips its causal mask (refused)")


def without_bias(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with its bias constant (A = 0: exp(0) = 1 for every key, which softmax ignores)."""
    for layer in model.model.layers:
        layer.self_attn.A.data.zero_()
    return model


@pytest.mark.slow  # 8 s (make test-slow); the default run checks the same three things with a bias that matters below
def test_doge_passes_the_matrix() -> None:
    """Supported where transformers always builds Doge's causal mask (5.25); refused by name where
    its stock forward drops it for an unpadded input (5.17), which is then bidirectional."""
    r = check_type("doge")
    if skips_causal_mask_under_key_bias(_build("doge")):
        assert r.status == "refused" and "skips its causal mask" in r.detail, r.detail
        stock = _build("doge")
        ids = ids_of(16, batch=1, vocab=stock.config.vocab_size)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % stock.config.vocab_size
        with torch.no_grad():
            a, b = (stock(input_ids=x, use_cache=False).logits[0, :-1] for x in (ids, changed))
        assert (a - b).abs().max() > 1e-3, "the stock model attends a later token"
        return
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


def test_the_cache_keeps_one_more_key_column() -> None:
    model = strong_doge()
    config = model.config
    d = config.hidden_size // config.num_attention_heads
    shape = ModelShape.from_config(config)
    assert (shape.head_dim, shape.value_dim) == (d + 1, d)
    cache = MoaCache(Plan.dense(config), 2, 50, config=config)
    layer = cache.moa_layers[0]
    assert (layer.keys.shape[-1], layer.values.shape[-1]) == (d + 1, d)
    assert cache.memory_bytes() == sum(2 * layer.keys.shape[1] * (2 * d + 1) * 4
                                       for layer in cache.moa_layers)


@causal
def test_the_passes_change_attention_only_and_match_the_model() -> None:
    """The prefill pass removes the attention calls and what fed only them (the float mask); every
    other node stays with its target (the bias's computation included: the new call reads it). Dense
    == stock (1e-5) with a bias that matters (1e-2 without it); a sparse plan == the reference (1e-4)."""
    model = strong_doge()
    ids = ids_of(96, vocab=model.config.vocab_size)
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
        flat = without_bias(strong_doge())(input_ids=ids, use_cache=False).logits
    assert (flat - stock).abs().max() > 1e-2, "the bias must matter"
    with pytest.MonkeyPatch.context() as mp:
        seen = watch_rewrites(mp)
        moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, verify=False)
        with torch.no_grad():
            dense = model(input_ids=ids, use_cache=False).logits
    after = check_only_attention_changed(seen)
    assert not dense_mask_nodes(model.moa_flex.reports[-1].graph_module), "no dense [B, 1, Q, K] mask is built"
    assert any(str(t).endswith("exp") or getattr(t, "__name__", "") == "exp" for t in after.values()), "bias kept"
    assert (dense - stock).abs().max() <= 1e-5
    plan = sparse_plan(model.config, "kv_head", seed=1)
    model.moa_flex.set_plan(plan)
    with torch.no_grad():
        sparse = model(input_ids=ids, use_cache=False).logits
    want = planned_logits(model, plan, 96, ids, torch.ones_like(ids))
    assert (sparse - want).abs().max() <= 1e-4
    assert (planned_logits(without_bias(model), plan, 96, ids, torch.ones_like(ids)) - want).abs().max() > 1e-2


@causal
def test_a_conversation_in_chunks_equals_the_reference() -> None:
    """Two turns on a left-padded batch, prefilled in chunks of 48 over the cache, then decoded:
    tokens and logits equal step-by-step reference decoding of the whole conversation (which adds
    each key's bias computed over the whole sequence) planned for N; the first-call check passes
    (it checks the first chunk's graph; the later chunks' and the decode graph run unchecked)."""
    model = strong_doge()
    plan = sparse_plan(model.config, "kv_head", seed=3)
    ids, mask = padded_prompt(model, plan, N, length=150)
    moa_flex.compile(model, plan, max_length=N, prefill_chunk=48, backend="eager", progress=False)
    converse(model, plan, N, ids, mask, (None, 30), 8, seed=20)


@causal
def test_requests_past_the_top_k_selection_are_refused() -> None:
    """Past keep_window_size keys the model keeps the top-k by bias: a forward that long is refused
    at its first call naming it, and a cache (a request) planned longer at its creation."""
    model = strong_doge(keep_window_size=32)
    moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False)
    with torch.no_grad():
        model(input_ids=ids_of(32, vocab=model.config.vocab_size), use_cache=False)  # at the limit: fine
        with pytest.raises(ValueError, match="top-k keys"):
            model(input_ids=ids_of(40, vocab=model.config.vocab_size), use_cache=False)
    with pytest.raises(ValueError, match="keep_window_size=32"):
        MoaCache(Plan.dense(model.config), 1, 33, config=model.config)
    with pytest.raises(ValueError, match="keep_window_size=32"):
        model.generate(input_ids=ids_of(30, vocab=model.config.vocab_size), max_new_tokens=8, do_sample=False)


@causal
def test_an_fp8_cache_and_a_longer_max_length_are_refused_at_compile() -> None:
    model = strong_doge(keep_window_size=32)
    with pytest.raises(ValueError, match="FP8"):
        MoaCache(Plan.dense(model.config), 1, 32, config=model.config, kv_dtype=torch.float8_e4m3fn)
    for kwargs, said in (({"kv_dtype": "fp8"}, "FP8"), ({"max_length": 64}, "keep_window_size=32")):
        with pytest.raises(ValueError, match=said):
            moa_flex.compile(model, Plan.dense(model.config), backend="eager", progress=False, **kwargs)
        assert getattr(model, "moa_flex", None) is None, "nothing changed"


class KeyBiasAttention(torch.nn.Module):
    """One SDPA call over Doge's mask form, with the fill at the dtype's minimum or (``fill``) another."""

    def __init__(self, fill: float | None) -> None:
        super().__init__()
        self.fill = fill
        self.proj = torch.nn.Linear(8, 3 * 2 * 8)
        self.dt = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.proj(x).view(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        dt = torch.exp(self.dt(v.transpose(1, 2).reshape(B, N, -1))).transpose(-1, -2)  # [B, 2, N]
        pos = torch.arange(N)
        allowed = (pos[None, :] <= pos[:, None]) & attention_mask[:, None, None, :].bool()
        mask = dt[:, :, None, :].expand(-1, -1, N, -1)
        if self.fill is not None:
            mask = mask.masked_fill(~allowed, self.fill)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -1e4, None])
def test_only_the_exact_form_is_read_as_a_key_bias(fill: float | None) -> None:
    """The masked_fill at the dtype's minimum (a masked key's weight exactly 0) becomes
    sdpa_key_bias, whose dense reference equals the call; any other fill leaves the call as it
    is, and the mask check then refuses its float sources by name; no mask at all beside the bias
    (every query attends every key, later ones too) is refused by name."""
    from moa_flex.passes.key_bias import rewrite_key_bias
    from moa_flex.passes.mask_sources import check_masks_are_masks
    from moa_flex.passes.nodes import attention_nodes, key_bias_of
    from tiny_models import captured

    module = KeyBiasAttention(fill).eval()
    x, attention_mask = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.long)
    attention_mask[0, :2] = 0
    gm, inputs = captured(module, x, attention_mask)
    if fill is None:
        with pytest.raises(ValueError, match="masks nothing"):
            rewrite_key_bias(gm.graph)
        return
    assert rewrite_key_bias(gm.graph) == (1 if fill < -1e4 else 0)
    (node,) = attention_nodes(gm.graph)
    if fill < -1e4:
        assert key_bias_of(node) is not None
        check_masks_are_masks([(node, 0)])  # what is left of the mask is position data
        gm.graph.eliminate_dead_code()
        gm.recompile()
        with torch.no_grad():
            got, want = gm(*inputs)[0], module(x, attention_mask)
        assert (got - want)[1].abs().max() <= 1e-5  # the unpadded row (row 0's first queries see no key)
    else:
        assert key_bias_of(node) is None
        with pytest.raises(ValueError, match="score bias"):
            check_masks_are_masks([(node, 0)])


@causal
@pytest.mark.slow  # 20 s of inductor on the CPU (make test-slow)
def test_its_graphs_precompile_and_a_second_compile_reads_them(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The first-call check's graph keeps the model's SDPA call as aten's op (a Python function
    there made the graph unsavable, and every process traced it again): all three graphs are
    written, read back by a second compile, which traces nothing and gives the same tokens."""
    monkeypatch.setenv("MOA_FLEX_CACHE_DIR", str(tmp_path))
    ids = ids_of(60, vocab=128)
    runs = []
    for _ in range(2):
        model = strong_doge()
        plan = sparse_plan(model.config, "kv_head", seed=3)
        moa_flex.compile(model, plan, max_length=80, compile_cache=True, progress=False)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                    do_sample=False, pad_token_id=0)
        runs.append((logits, tokens, list(model.moa_flex.log.lines)))
    assert not any("could not be written" in line for line in runs[0][2]), runs[0][2]
    assert any("precompile: read 3 compiled graphs" in line for line in runs[1][2])
    assert not any("traced" in line for line in runs[1][2])
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0])


@causal
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hidden", [64, 512])  # head dim 16 and 128: keys 17 and 129 wide in the cache
def test_on_a_gpu_prefill_chunks_and_decode_equal_the_reference(hidden: int) -> None:
    """fp32 on CUDA through inductor: FlexAttention with the bias as a score_mod (no cache), the
    chunk kernel over the cache in chunks of 128 and the decode kernel, both reading the bias
    column (whose fp32 tiles at 256 lanes once needed more shared memory than an H100 has):
    greedy tokens equal the float64 reference planned for N and logits agree within 1e-4."""
    model = strong_doge(hidden_size=hidden, intermediate_size=max(hidden, 128)).cuda()
    plan = sparse_plan(model.config, "kv_head", seed=3)
    ids = ids_of(300, vocab=model.config.vocab_size).cuda()
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    moa_flex.compile(model, plan, max_length=420, prefill_chunk=128, progress=False)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    moa_flex.uncompile(model)
    full = torch.cat([mask, torch.ones(2, 16, dtype=mask.dtype, device="cuda")], 1)
    ref = planned_logits(model, plan, 420, out.sequences[:, :-1], full[:, :-1])[:, 299:]
    assert torch.equal(ref.argmax(-1), out.sequences[:, 300:])
    assert (ref - torch.stack(out.logits, 1)).abs().max() <= 1e-4
    assert (plain - planned_logits(model, plan, 420, ids, mask))[1].abs().max() <= 1e-4


def test_profiling_refuses_it_by_name() -> None:
    """The profiler's attention measures plain causal attention; the model's mask would otherwise
    reach it as an unexplained 'attention mask the model built'."""
    from moa_flex.data.samples import Sample
    from moa_flex.profile import profile_model

    ids = ids_of(24, batch=1, vocab=128)[0]
    sample = Sample(head=ids[:4], context=ids[4:16], question=ids[16:20], answer=ids[20:])
    with pytest.raises(ValueError, match="per-key score bias"):
        profile_model(strong_doge(), {24: [sample]}, progress=False)
