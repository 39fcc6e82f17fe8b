"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5, HY-V4, AXK2): an indexer selects each
query's keys; the plan's rule goes into the indexer (its top-k picks among the keys the rule
keeps) and the selection stays in the attention (passes/indexed.py), in forwards without a cache,
the prefill of a MoA cache and the decode steps over it (the indexer's keys in a ring beside the
latent).

Oracles: the stock model (a dense plan changes nothing), and the independent reference
(moa_flex/reference.py: float64 attention under the brute-force rule, the indexer's mask ANDed
with the same rule by a forward hook, the selection read from the indices transformers hands
the attention function; decoding checked by full forwards, ``planned_logits``), and
transformers' own cache for the indexer keys the ring holds.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import moa_flex
import moa_flex.reference as reference
from moa_flex.masks import reference_mask, selection_keep
from moa_flex.plan import ModelShape, Plan
from moa_flex.kernels.decode import chunk_select_keep, slot_keep
from moa_flex.kernels.slot_map import slot_positions
from moa_flex.runtime.selection import earliest_topk
from moa_flex.reference import planned_logits, reference_logits
from moa_flex.support import _random_plan, causal_lm_types, check_type, tiny_config

LENGTH = 24
latent_cache = pytest.mark.skipif("not _caches_the_latent()", reason="this transformers caches DeepSeek-V3.2's expanded "
                                  "keys and values, not its latent: moa-flex refuses its cache at the first call")
TOPK = 6  # below the rules' spans: the selection and the rule both cut


def _dsa_model(model_type: str = "deepseek_v32") -> torch.nn.Module:
    config = tiny_config(model_type)
    # 8 index heads: a key scored 0 by every head's ReLU (an exact tie, which torch.topk breaks
    # by the tensor's length and order) is rare enough not to sit at the k-th place here
    config.index_topk, config.index_n_heads = TOPK, 8
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):  # dots3
        config.sliding_window = 5  # below the prompts: the sliding layers' own window cuts too
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@functools.lru_cache(maxsize=1)
def _caches_the_latent() -> bool:
    """Whether this transformers' DeepSeek-V3.2 caches the latent (5.25) or the expanded keys and
    values (5.17: "Sparse-attention models cache the expanded K/V"), over which the passes refuse
    latent attention at the first call."""
    model = _dsa_model()
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=_ids(1)[:, :3], past_key_values=cache, use_cache=True)
    return cache.layers[0].keys.shape[1] == 1


def _ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def _compiled(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense-mask note: a selection is ANDed in densely, as documented
        moa_flex.compile(model, plan, backend="eager", progress=False, compile_cache=False)
    return model


def _logits(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**inputs, use_cache=False).logits


@latent_cache
@pytest.mark.slow  # 13 s each (make test-slow); the tests below check the same paths with a selection that cuts
@pytest.mark.parametrize("model_type", ["deepseek_v32", "hy_v4"])
def test_sparse_attention_passes_the_matrix(model_type: str) -> None:
    r = check_type(model_type)
    assert (r.status, r.detail) == ("supported", "dense, sparse and generate match")


class _IndexerScores(torch.overrides.TorchFunctionMode):
    """Records the scores every top-k over [B, Q, K] floats ranks (an indexer's)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in (torch.topk, torch.Tensor.topk) and args[0].dim() == 3 and args[0].is_floating_point():
            self.seen.append((args[0].detach().clone(), args[1] if len(args) > 1 else kwargs["k"]))
        return func(*args, **kwargs)


def _ties_at_the_kth(scores: list[tuple[torch.Tensor, int]]) -> int:
    """Queries whose k-th and (k+1)-th best finite scores are equal: where torch.topk's own order
    decides which keys the stock model selects."""
    ties = 0
    for x, k in scores:
        top = x.sort(dim=-1, descending=True).values
        if top.shape[-1] > k:
            a, b = top[..., k - 1], top[..., k]
            ties += int(((a == b) & torch.isfinite(b)).sum())
    return ties


@pytest.mark.slow  # 4 s (make test-slow); the matrix checks a dense plan of every DSA type too
@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_a_dense_plan_is_the_stock_model(model_type: str) -> None:
    """On an input where the stock model's selection is its own (no tie at the k-th score,
    checked), a dense plan changes nothing."""
    model = _dsa_model(model_type)
    ids = _ids()
    record = _IndexerScores()
    with record:
        stock = _logits(model, input_ids=ids)
    assert record.seen and _ties_at_the_kth(record.seen) == 0
    dense = _logits(_compiled(model, Plan.dense(model.config)), input_ids=ids)
    assert float((dense - stock).abs().max()) <= 1e-5


def _padded() -> dict[str, torch.Tensor]:
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def test_a_sparse_plan_matches_the_reference_with_left_padding() -> None:
    model = _dsa_model()
    plan = _random_plan(model.config)
    inputs = _padded()
    got = _logits(_compiled(model, plan), **inputs)
    want = reference_logits(model, plan, pads=[5, 0], **inputs)
    real = inputs["attention_mask"].bool()
    assert float((got - want)[real].abs().max()) <= 1e-4


@pytest.mark.slow  # inductor compiles of three layers: about 1 min (make test-slow)
def test_regional_compilation_shares_indexed_layers() -> None:
    """Through inductor with regional compilation, layers share compiled code (the indexer's keep
    rule reads its layer from the runtime, as attention does) and the logits still equal the
    reference's."""
    config = tiny_config("deepseek_v32")
    config.index_topk, config.num_hidden_layers = TOPK, 3
    config.layer_types, config.mlp_layer_types = [config.layer_types[0]] * 3, ["dense"] * 3
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    plan = _random_plan(model.config)
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moa_flex.compile(model, plan, progress=False, compile_cache=False)
    got = _logits(model, input_ids=ids)
    assert float((got - reference_logits(model, plan, input_ids=ids)).abs().max()) <= 1e-4
    (report,) = model.moa_flex.region_reports
    # layer 2 runs layer 1's code; layer 0 compiles apart: it computes the indexer's k = min(index_topk,
    # keys), a symbolic size Dynamo computes once, which the later layers take as an input
    assert report.layers == [0, 1, 2] and report.shared == {2: 1}, report


@pytest.mark.slow  # 4 s (make test-slow): the composition's alternative is far off
def test_the_indexer_picks_among_the_kept_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Selecting first and applying the rule after gives other logits (so the composition is
    tested): the reference without its indexer hook is far from moa-flex's output."""
    model = _dsa_model()
    plan = _random_plan(model.config)
    ids = _ids()
    got = _logits(_compiled(model, plan), input_ids=ids)
    assert float((got - reference_logits(model, plan, input_ids=ids)).abs().max()) <= 1e-4
    monkeypatch.setattr(reference, "_rule_indexers", lambda m: [])
    assert float((got - reference_logits(model, plan, input_ids=ids)).abs().max()) > 1e-2


PROMPT, NEW = 24, 6


def _generate(model: torch.nn.Module, plan: Plan, prompt: int = PROMPT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch through generate over the MoA cache: (sequences, the 2-D mask of all
    but the last token, the logits of each new token [B, NEW, V])."""
    batch = torch.randint(3, 100, (2, prompt), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(batch)
    mask[0, :prompt // 5] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    full = torch.cat([mask, torch.ones(2, NEW - 1, dtype=mask.dtype)], dim=1)
    return out.sequences, full, torch.stack(out.logits, dim=1)


@latent_cache
@pytest.mark.parametrize("prompt", [pytest.param(PROMPT, marks=pytest.mark.slow), 8])  # 24: 8 s, make test-slow
def test_generate_over_the_moa_cache_matches_the_reference(prompt: int) -> None:
    """Prefill of the empty cache, then decode steps whose indexer scores the ring of its keys
    with the rule's slots only (a short prompt leaves slots empty, which score 0 and must not be
    picked), and whose kernel reads the selection: every new token's logits equal the reference's
    at that position (planned for the request), tokens too."""
    model = _dsa_model()
    plan = _random_plan(model.config)
    seq, mask, logits = _generate(_compiled(model, plan), plan, prompt)
    ref = planned_logits(model, plan, prompt + NEW, seq[:, :-1], mask)[:, prompt - 1:]
    assert torch.equal(ref.argmax(-1), seq[:, prompt:])
    assert float((logits - ref).abs().max()) <= 1e-4
    _check_ring(model, seq)


def _check_ring(model: torch.nn.Module, seq: torch.Tensor) -> None:
    """After a request, each slot of the first layer's indexer ring holds the indexer key of the
    position the slot map puts there, as transformers' own cache computed it for the same tokens
    (the first layer's keys depend on the tokens alone; later layers' on the plan's attention);
    the cache's bytes count the ring."""
    cache = model.moa_flex.cache
    row = seq[1:, :-1]  # the unpadded row: positions from 0
    with torch.no_grad():
        stock = model.moa_flex.original_forward(input_ids=row, use_cache=True).past_key_values
    moa, want = cache.moa_layers[0], stock.layers[0].indexer_keys[0]  # [T, D]
    pos = slot_positions(moa.caps[1:], moa.offsets, moa.sink, torch.tensor([row.shape[1] - 1]))[0]
    held = pos >= 0
    assert int(held.sum()) == min(int(moa.caps[1, 0]), row.shape[1])
    torch.testing.assert_close(moa.index_keys[1, held], want[pos[held]], rtol=0, atol=1e-5)
    assert cache.memory_bytes() == sum(l.keys.nbytes + l.values.nbytes + l.index_keys.nbytes for l in cache.moa_layers)


@latent_cache
@pytest.mark.slow  # 27 s and 20 s (make test-slow); the pieces are in the default run (chunk_select_keep, test_chunk.py)
@pytest.mark.parametrize("chunk", [8, 3])
def test_a_chunked_prompt_and_a_later_turn_match_the_reference(chunk: int) -> None:
    """A left-padded prompt in chunks of ``chunk`` (3: the padded row's second chunk starts with
    a pad) and a second turn: every chunk after the first scores the cache's slots and its own
    keys (``moa_flex::chunk_select_keep``) and attends the selection through the chunk kernel.
    Tokens and logits of both turns equal step-by-step reference decoding of the conversation."""
    from conversation import chunked_turns

    model = _dsa_model()
    chunked_turns(model, _random_plan(model.config), chunk)
    # the model's expansion of the held latent (dead once the chunk kernel attends the cache) is gone:
    # the cache's latent is read by moa-flex's ops alone (a 64K cache would be expanded per chunk and layer)
    graphs = [r.graph_module.graph for r in model.moa_flex.reports
              if any(n.target == torch.ops.moa_flex.chunk_select_keep.default for n in r.graph_module.graph.nodes)]
    assert graphs
    for graph in graphs:
        chunks = [n for n in graph.nodes if n.target == torch.ops.moa_flex.chunk_prefill.default]
        assert chunks and all(isinstance(u.target, torch._ops.OpOverload) and u.target.namespace == "moa_flex"
                              for n in chunks for u in n.args[3].users)


@latent_cache
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton decode and chunk kernels, CUDA graphs)")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("model_type", ["deepseek_v32", "dots3_note_text"])
def test_on_a_gpu_chunks_turns_and_decode_equal_the_reference(mode: str | None, model_type: str) -> None:
    """On a GPU (eager, and inductor with the decode steps in CUDA graphs): a left-padded prompt
    in chunks of 5 and a second turn, each decoded by the Triton kernels reading the indexer's
    selection; tokens and logits equal step-by-step reference decoding (fp32, 1e-3). dots3: an
    indexed layer beside a sliding one of other heads and latent width."""
    from conversation import gpu_turns

    if model_type not in causal_lm_types():
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    model = _dsa_model(model_type).cuda()
    gpu_turns(model, _random_plan(model.config), mode)


@pytest.mark.slow  # 4 s (make test-slow)
def test_per_head_rules_are_refused_in_an_indexed_layer() -> None:
    """One selection serves all heads of a layer, so their rule must be one."""
    model = _dsa_model()
    shape = ModelShape.from_config(model.config)
    H = shape.num_heads
    alpha = [[4.0 + 4 * (h % 2) for h in range(H)] for _ in range(shape.num_layers)]
    plan = Plan(shape, alpha, [[0.0] * H] * shape.num_layers, granularity="head", sink=2, min_span=4,
                span_multiple=2)
    _compiled(model, plan)
    with pytest.raises(ValueError, match="selects keys with an indexer"):
        _logits(model, input_ids=_ids())


def test_an_indexer_of_blocks_is_refused_at_compile() -> None:
    """Kolibri 1.1 (transformers 5.25) or Qwen4-Exp (5.17, whose layer type names it:
    ``qwen_sparse_attention``, refused as a layer kind moa-flex does not plan): indexed attention
    of another kind."""
    known = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    config = tiny_config(next(t for t in ("kolibri1_1", "qwen4_exp") if t in known))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="indexer is not DeepSeek Sparse Attention's|type \\['qwen_sparse_attention'\\]"):
        moa_flex.compile(model, Plan.dense(config), backend="eager", progress=False, compile_cache=False)


def test_profiling_refuses_an_indexer() -> None:
    from moa_flex.profile.instrument import _check_profilable

    with pytest.raises(ValueError, match="DeepSeek Sparse Attention"):
        _check_profilable(_dsa_model(), LENGTH)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 4), st.data())
def test_selection_keep_is_the_rule_per_row(kv_len: int, sink: int, data: st.DataObject) -> None:
    """The dense keep of an indexed layer equals the brute-force rule of each row's real tokens
    (a row's span: the plan's at the row's planned length, its real tokens)."""
    q_len = data.draw(st.integers(1, kv_len))
    pads = data.draw(st.lists(st.integers(0, kv_len - 1), min_size=1, max_size=3))
    plans, spans = [], []
    for pad in pads:
        alpha = float(data.draw(st.integers(sink + 1, kv_len + sink + 1)))
        plan = Plan(ModelShape(1, 1, 1, 8), [[alpha]], [[0.0]], sink=sink, min_span=sink + 1, span_multiple=1)
        plans.append(plan)
        spans.append(int(plan.head_spans(kv_len - pad)[0, 0]))
    got = selection_keep(torch.tensor(spans), sink, torch.tensor(pads), q_len, kv_len)
    for b, (pad, plan) in enumerate(zip(pads, plans)):
        n = kv_len - pad
        want = torch.zeros(q_len, kv_len, dtype=torch.bool)
        rows = min(q_len, n)  # query rows past the pad; the ones inside it keep nothing
        want[q_len - rows:, pad:] = reference_mask(plan, 0, n, rows, n - rows, n)[0]
        assert torch.equal(got[b], want), (b, pad, spans[b])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([-2.0, -0.5, -0.0, 0.0, 0.25, 1.0, float("-inf")]), min_size=1, max_size=24),
       st.data())
def test_earliest_topk_breaks_ties_by_position(values: list[float], data: st.DataObject) -> None:
    """Against a stable sort of the scores laid out in position order (heavy ties, -0.0, -inf)."""
    k = data.draw(st.integers(1, len(values)))
    positions = torch.tensor(data.draw(st.permutations(range(len(values)))))
    scores = torch.tensor(values)
    got = earliest_topk(scores, positions, k)
    in_order = torch.empty_like(scores)
    in_order[positions] = scores
    want = torch.sort(in_order, descending=True, stable=True).indices[:k]  # positions
    assert torch.equal(positions[got], want)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 4), st.integers(0, 80), st.data())
def test_slot_keep_is_the_rule_over_the_slots(sink: int, i: int, data: st.DataObject) -> None:
    """The slots a decode step's indexer may pick: those holding a position the rule keeps for
    the query at ``i`` (the slot map replayed by writing positions 0..i; caps exceed the sink, as
    a plan's do)."""
    cap = data.draw(st.integers(sink + 1, 40))
    span = data.draw(st.integers(0, cap))
    window = data.draw(st.sampled_from([0, 3, 7, -4]))
    held: list[int | None] = [None] * cap
    for p in range(i + 1):  # the writes, through the slot map
        held[p if p < sink else sink + (p - sink) % (cap - sink)] = p
    want = [p is not None and (p < sink or i - p < span - sink) and (window <= 0 or i - p < window)
            and (window >= 0 or p // -window == i // -window) for p in held]
    got = slot_keep(torch.tensor([0, cap], dtype=torch.int32), torch.tensor([[cap]], dtype=torch.int32),
                    torch.tensor([[span, span]], dtype=torch.int32), torch.tensor([i]), sink, window, cap)
    assert got[0].tolist() == want


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 4), st.integers(-1, 80), st.data())
def test_slot_position_is_the_slot_map(sink: int, last: int, data: st.DataObject) -> None:
    """The decode step's positions of a one-group cache's slots (no host read) equal the slot map's."""
    caps = torch.tensor([[data.draw(st.integers(sink + 1, 40))], [data.draw(st.integers(sink + 1, 40))]],
                        dtype=torch.int32)
    S = int(caps.max()) + data.draw(st.integers(0, 3))
    offsets = torch.tensor([0, S], dtype=torch.int32)
    pos = torch.tensor([last, max(last - 3, -1)])
    got = torch.ops.moa_flex.slot_position(torch.zeros(2, S, 1), caps, offsets, pos, sink)
    assert torch.equal(got, slot_positions(caps, offsets, sink, pos))


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 4), st.integers(0, 60), st.integers(1, 9), st.data())
def test_chunk_select_keep_is_the_rule_over_slots_and_chunk(sink: int, n: int, C: int, data: st.DataObject) -> None:
    """The columns a prefill chunk's indexer may pick over a cache holding ``n`` tokens: the slots
    holding a position the rule keeps for each query (the slot map replayed by writing 0..n-1),
    then the chunk's own keys at or before the query, pads (negative positions) never; and each
    column's position (-1: an empty slot)."""
    cap = data.draw(st.integers(sink + 1, 40))
    S = cap + data.draw(st.integers(0, 3))
    span = data.draw(st.integers(0, cap))
    window = data.draw(st.sampled_from([0, 3, 7, -4]))
    pads = data.draw(st.integers(0, C)) if n == 0 else 0  # left pads only before the first real token
    held: list[int | None] = [None] * S
    for p in range(n):
        held[p if p < sink else sink + (p - sink) % (cap - sink)] = p
    start = n - pads

    def kept(i: int, p: int | None) -> bool:
        return (p is not None and i >= 0 and p >= 0 and p <= i and (p < sink or i - p < span - sink)
                and (window <= 0 or i - p < window) and (window >= 0 or p // -window == i // -window))

    cols = held + [start + c for c in range(C)]
    want = [[kept(start + c, p) for p in cols] for c in range(C)]
    keep, pos = chunk_select_keep(torch.tensor([0, S], dtype=torch.int32), torch.tensor([[cap]], dtype=torch.int32),
                                  torch.tensor([[span, span]], dtype=torch.int32), torch.tensor([n]),
                                  torch.tensor([start]), sink, window, S, C)
    assert keep[0].tolist() == want
    assert pos[0].tolist() == [-1 if p is None or p < 0 else p for p in cols]
