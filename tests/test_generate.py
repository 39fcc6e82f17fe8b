"""generate() after moa_flex.compile: ragged MoA cache + decode kernel (CPU twin), fp32."""

from __future__ import annotations

import weakref

import pytest
import torch

import moa_flex
from moa_flex.plan import Plan
from moa_flex.runtime.cache import MoaCache
from reference import planned_logits
from tiny_models import NEW, PROMPT, prompt_ids, run_generate, sparse_plan, tiny_model
from word_tokenizers import numbered_tokenizer

EAGER = {"backend": "eager"}  # semantics tests: no inductor (its decode path: test_sparse_generate_is_token_exact)


@pytest.fixture(scope="module")
def compiled() -> torch.nn.Module:
    """One tiny model compiled once (eager backend) for the file's semantics tests: each test
    switches in its plan with :func:`planned` (plans are data, the graphs are reused), so the
    file traces each graph once instead of once per test. Tests of what compile's own
    arguments change build their own."""
    model = tiny_model()
    return moa_flex.compile(model, Plan.dense(model.config), **EAGER)


def planned(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """``model`` running ``plan``, with no cache kept from an earlier test."""
    model.moa_flex.set_plan(plan)
    return model


@pytest.mark.parametrize("granularity", ["kv_head", "head"])
def test_sparse_generate_is_token_exact(granularity: str, compiled: torch.nn.Module) -> None:
    """kv_head through inductor (the whole-model prefill and decode graphs), head eagerly."""
    plan = sparse_plan(compiled.config, granularity, seed=4)
    N = PROMPT + NEW
    assert plan.kv_density(N) < 0.6
    ids = prompt_ids()
    mask = torch.ones_like(ids)
    if granularity == "kv_head":  # through inductor, the prompt in chunks (128, 128, 34: one graph, a dynamic chunk length)
        model = moa_flex.compile(tiny_model(), plan, prefill_chunk=128)
    else:
        model = planned(compiled, plan)
    out = run_generate(model, ids, mask)
    seq = out.sequences
    assert seq.shape == (2, N)
    full_mask = torch.ones_like(seq)
    want = planned_logits(model, plan, N, seq[:, :-1], full_mask[:, :-1])[:, PROMPT - 1:]  # [B, NEW, V]
    got = torch.stack(out.logits, dim=1)
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(seq[:, PROMPT:], want.argmax(-1))
    # the plan really cuts: dense attention would have produced other logits
    dense = planned_logits(model, Plan.dense(model.config), N, seq[:, :-1], full_mask[:, :-1])[:, PROMPT - 1:]
    assert (dense - want).abs().max() > 1e-3
    assert model.moa_flex.decode_reports and len(model.moa_flex.decode_reports[-1].rewritten) == plan.num_layers
    cache = model.moa_flex.cache
    assert cache.memory_bytes() == 2 * 2 * int(plan.cache_spans(N).sum()) * 16 * 4
    if granularity == "kv_head":  # regional compilation: the prefill graph compiles layer 0, layer 1 runs its code
        # (the decode step, not captured in a CUDA graph on the CPU, compiles whole)
        assert [(r.layers, r.compiles, r.shared) for r in model.moa_flex.region_reports] == [([0, 1], 1, {1: 0})]


def test_dense_plan_generates_stock_tokens(compiled: torch.nn.Module) -> None:
    ids = prompt_ids()
    with torch.no_grad():
        stock = tiny_model().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                      do_sample=False, pad_token_id=0)
    model = planned(compiled, Plan.dense(compiled.config))
    assert torch.equal(run_generate(model, ids).sequences, stock)


class Collect:
    """A streamer that records what it is handed (transformers' BaseStreamer protocol)."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended += 1


def test_decode_loop_matches_transformers_loop(compiled: torch.nn.Module) -> None:
    """moa-flex's decoding loop against transformers' own (stock model, dense plan): greedy
    with EOS (a finished row gets pad tokens, and all rows finished stops early), logits
    processors, scores, logits and a streamer; sampling from the same seed; stop strings."""
    model = tiny_model()  # the stock model (the same weights as the compiled one)
    ids = prompt_ids()
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                               do_sample=False, pad_token_id=0)
    eos = int(plain[0, PROMPT + 3])  # row 0 stops at its 4th new token (or earlier)
    stop_word = next(f"w{t}" for t in plain[1, PROMPT + 5:].tolist() if t != 127)
    tokenizer = numbered_tokenizer()
    requests = {
        "greedy, EOS, processors": dict(do_sample=False, eos_token_id=eos, min_new_tokens=2, no_repeat_ngram_size=3,
                                         return_dict_in_generate=True, output_scores=True, output_logits=True),
        "one row, stops early at EOS": dict(do_sample=False, eos_token_id=eos, rows=1),
        "sampling": dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=123),
        "stop strings": dict(do_sample=False, stop_strings=[stop_word], tokenizer=tokenizer, rows=1, first=1),
    }

    def run(request: dict) -> tuple:
        request = dict(request)
        rows, first, seed = request.pop("rows", 2), request.pop("first", 0), request.pop("seed", None)
        x = ids[first:first + rows]
        streamer = Collect()
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, pad_token_id=0,
                                 streamer=streamer, **request)
        return out, streamer

    stock = {name: run(request) for name, request in requests.items()}
    model = planned(compiled, Plan.dense(compiled.config))
    for name, request in requests.items():
        (want, want_stream), (got, got_stream) = stock[name], run(request)
        if request.get("return_dict_in_generate"):
            for field in ("scores", "logits"):
                a, b = torch.stack(getattr(want, field), 1), torch.stack(getattr(got, field), 1)
                torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"{name}: {field}")  # -inf where masked
            want, got = want.sequences, got.sequences
        assert torch.equal(got, want), name
        assert len(got_stream.puts) == len(want_stream.puts) and got_stream.ended == want_stream.ended == 1, name
        assert all(torch.equal(a, b) for a, b in zip(got_stream.puts, want_stream.puts)), name
    # the requests really exercised what they name
    row = stock["greedy, EOS, processors"][0].sequences[0, PROMPT:].tolist()
    assert eos in row[:-1] and set(row[row.index(eos) + 1:]) == {0}, row  # finished, then pads
    assert stock["one row, stops early at EOS"][0].shape[1] < PROMPT + NEW
    assert stock["stop strings"][0].shape[1] < PROMPT + NEW


def test_decode_loop_refuses_what_it_does_not_do(compiled: torch.nn.Module) -> None:
    model = planned(compiled, Plan.dense(compiled.config))
    ids = prompt_ids()
    cases = [
        (NotImplementedError, "hidden_states", dict(return_dict_in_generate=True, output_hidden_states=True)),
        (NotImplementedError, "attentions", dict(return_dict_in_generate=True, output_attentions=True)),
        (NotImplementedError, "custom_generate", dict(custom_generate=lambda *a, **k: None)),
        (ValueError, "tokenizer", dict(stop_strings=["w1"])),
        (ValueError, "another plan", dict(past_key_values=MoaCache(sparse_plan(model.config, "head"), 2, PROMPT + 2))),
        (ValueError, "own MoaCache", dict(past_key_values=object())),
    ]
    for error, match, kwargs in cases:
        with pytest.raises(error, match=match), torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=2, pad_token_id=0, **kwargs)
    # model arguments transformers lets through for other families (Llama's generate refuses them first)
    from transformers import GenerationConfig

    from moa_flex.runtime.decode_loop import _check_request

    with pytest.raises(NotImplementedError, match="token_type_ids"):
        _check_request(GenerationConfig(), {"token_type_ids": ids, "attention_mask": None}, synced_gpus=False)
    with pytest.raises(NotImplementedError, match="beam_search"):
        _check_request(GenerationConfig(num_beams=2), {}, synced_gpus=False)


def test_left_padded_batch_rows_equal_rows_alone(compiled: torch.nn.Module) -> None:
    model = planned(compiled, sparse_plan(compiled.config, "head", seed=7))
    ids = prompt_ids(2)
    mask = torch.ones_like(ids)
    mask[1, :23] = 0
    ids[1, :23] = 0
    both = run_generate(model, ids, mask)
    for row in range(2):
        pad = 23 if row else 0
        alone = run_generate(model, ids[row:row + 1, pad:])
        assert torch.equal(both.sequences[row, pad:], alone.sequences[0]), f"row {row}"
        got = torch.stack(both.logits, 1)[row]
        assert (got - torch.stack(alone.logits, 1)[0]).abs().max() <= 1e-4


def test_no_recompile_across_decode_steps(compiled: torch.nn.Module) -> None:
    """After a warm-up, decode steps, new planned lengths (new cache layouts) and new prompt
    lengths trace no new graph; an identical layout reuses the cache's tensors. (FlexAttention's
    bucket policy, with inductor: test_compile.test_lengths_do_not_recompile_the_model.)"""
    from torch._dynamo.utils import counters

    model = planned(compiled, sparse_plan(compiled.config, "kv_head"))
    ids = prompt_ids()
    run_generate(model, ids, new=3)  # traces the prefill graph and the decode graph (unless a test before did)
    run_generate(model, ids, new=4)
    counters.clear()
    run_generate(model, ids, new=NEW)  # another planned length: another cache layout
    cache = model.moa_flex.cache
    run_generate(model, ids, new=NEW)  # the same layout: the same cache
    assert model.moa_flex.cache is cache
    run_generate(model, prompt_ids(length=PROMPT - 20), new=NEW + 5)  # another prompt length, same bucket
    assert counters["stats"]["unique_graphs"] == 0


def test_set_plan_does_not_recompile(compiled: torch.nn.Module) -> None:
    """A dense plan (every layer's cache as wide) then a heterogeneous one: the same graphs."""
    from torch._dynamo.utils import counters

    model = planned(compiled, Plan.dense(compiled.config))
    ids = prompt_ids()
    run_generate(model, ids, new=3)
    counters.clear()
    model.moa_flex.set_plan(sparse_plan(model.config, "head", seed=9))
    run_generate(model, ids, new=3)
    assert counters["stats"]["unique_graphs"] == 0


def test_limits_and_errors() -> None:
    model = tiny_model()
    plan = sparse_plan(model.config, "kv_head")
    moa_flex.compile(model, plan, max_length=PROMPT + 4, **EAGER)
    ids = prompt_ids()
    with pytest.raises(ValueError, match="max_length"):
        run_generate(model, ids, new=5)
    with pytest.raises(NotImplementedError, match="num_beams"):
        model.generate(input_ids=ids, max_new_tokens=2, num_beams=2)
    right = torch.ones_like(ids)
    right[0, -3:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(input_ids=ids, attention_mask=right, max_new_tokens=2)
    # driving the cache by hand past its planned length
    cache = MoaCache(plan, 2, PROMPT + 1, dtype=torch.float32)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="planned length"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    cache2 = MoaCache(plan, 2, PROMPT + 4)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache2, use_cache=True)
        with pytest.raises(ValueError, match="left padding the cache was built with"):
            model(input_ids=ids[:, :2], attention_mask=torch.zeros_like(ids[:, :2]), past_key_values=cache2)
        with pytest.raises(ValueError, match=r"attention_mask must be \[batch, new tokens\]"):
            model(input_ids=ids[:, :2], attention_mask=torch.ones_like(ids[:, :3]), past_key_values=cache2)
        model(input_ids=ids[:, :2], past_key_values=cache2, use_cache=True)  # a second turn of 2 tokens
    assert cache2.seen_tokens == PROMPT + 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton decode kernel, CUDA graphs)")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_generate_on_gpu_matches_reference(mode: str | None) -> None:
    """On a GPU: the Triton kernel decodes, CUDA graphs capture the step (reduce-overhead),
    tokens equal the reference's and logits agree; a second request compiles nothing."""
    from torch._dynamo.utils import counters

    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model().cuda()
    plan = sparse_plan(model.config, "head", seed=4)
    N = PROMPT + NEW
    moa_flex.compile(model, plan, mode=mode)
    ids = prompt_ids().cuda()
    out = run_generate(model, ids)
    seq = out.sequences
    want = planned_logits(model, plan, N, seq[:, :-1], torch.ones_like(seq[:, :-1]))[:, PROMPT - 1:]
    got = torch.stack(out.logits, dim=1)
    err = (got - want).abs().amax(dim=(0, 2))  # per step; step 0 comes from the prefill
    assert err.max() <= 1e-3, f"max |logit error| per step: {err.tolist()}"
    assert torch.equal(seq[:, PROMPT:], want.argmax(-1))
    assert (model.moa_flex.cache.step_graph is not None) == (mode == "reduce-overhead")
    run_generate(model, ids)  # FlexAttention retraces once for tensors made outside the graph
    counters.clear()
    again = run_generate(model, ids)  # the reused cache replays its step graph from the first step
    assert counters["stats"]["unique_graphs"] == 0
    assert torch.equal(again.sequences, seq)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_forward_decode_steps_replay_step_graph_on_gpu() -> None:
    """Decode steps through the model's forward, without position_ids (HF's default positions
    from the cache's token count): the captured step graph replays them with the right
    positions; logits equal the reference over the whole sequence at every step."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model().cuda()
    plan = sparse_plan(model.config, "kv_head", seed=6)
    N = PROMPT + NEW
    moa_flex.compile(model, plan, mode="reduce-overhead")
    ids = prompt_ids(batch=2, seed=8).cuda()
    cache = MoaCache(plan, 2, N, dtype=torch.float32, devices="cuda")
    seq, logits = ids, []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(NEW - 1):
            tok = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, tok], dim=1)
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    assert cache.step_graph is not None
    want = planned_logits(model, plan, N, seq, torch.ones_like(seq))[:, PROMPT:]
    err = (torch.stack(logits, 1) - want).abs().amax(dim=(0, 2))
    assert err.max() <= 1e-3, f"max |logit error| per step: {err.tolist()}"
    alive = weakref.ref(cache)
    del cache, out
    assert alive() is None, "the cache and its step graph must be freed without a garbage collection"


def spread_over_two_gpus(model):  # noqa: ANN001, ANN201
    """Layer 0 and the embeddings on cuda:0, layer 1, norm and head on cuda:1; plain hooks
    move activations (accelerate's own hooks cannot be traced: see test_compile's
    test_accelerate_dispatched_model_is_refused)."""
    model.model.embed_tokens.cuda(0)
    model.model.rotary_emb.cuda(0)
    model.model.layers[0].cuda(0)
    for m in (model.model.layers[1], model.model.norm, model.lm_head):
        m.cuda(1)

    def to1(x):  # noqa: ANN001, ANN202
        return torch.utils._pytree.tree_map(lambda t: t.cuda(1) if isinstance(t, torch.Tensor) else t, x)

    model.model.layers[1].register_forward_pre_hook(lambda m, args, kwargs: (to1(args), to1(kwargs)), with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: torch.utils._pytree.tree_map(
        lambda t: t.cuda(0) if isinstance(t, torch.Tensor) else t, out))
    return model


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_generate_with_layers_on_two_gpus(mode: str | None) -> None:
    """Layers spread over two GPUs (what device_map does, through traceable hooks): each
    layer's cache lives on its layer's device, and the tokens equal those of the model on one
    GPU. With CUDA graphs asked for, decoding says it runs without them (a graph is captured
    on one device)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model().cuda(0)
    plan = sparse_plan(model.config, "head", seed=4)
    ids = prompt_ids().cuda(0)
    moa_flex.compile(model, plan)
    one = run_generate(model, ids)
    moa_flex.uncompile(model)

    model = spread_over_two_gpus(tiny_model())
    moa_flex.compile(model, plan, mode=mode)
    if mode is None:
        two = run_generate(model, ids)
    else:
        with pytest.warns(UserWarning, match="without CUDA graphs"):
            two = run_generate(model, ids)
    devices = [layer.keys.device for layer in model.moa_flex.cache.layers]
    assert devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert torch.equal(one.sequences.cpu(), two.sequences.cpu())
    assert (torch.stack(one.logits, 1).cpu() - torch.stack(two.logits, 1).cpu()).abs().max() <= 1e-3


def test_set_plan_with_another_sink_before_and_after_the_cache_graphs() -> None:
    """The cache graphs take the sink from the cache they trace (a guarded constant), not from
    the plan given to compile: a plan with another sink, switched in before the first
    generate or between two, decodes token-exact against the reference (the support matrix
    found the compile-time sink baked in, silently wrong)."""
    model = tiny_model()  # its own: the switch before the first generate needs cache graphs not yet traced
    first = Plan.dense(model.config)  # sink 64 by default: not the sparse plan's 16
    second = sparse_plan(model.config, "kv_head", seed=4)
    assert first.sink != second.sink
    N = PROMPT + NEW
    ids = prompt_ids()
    mask = torch.ones_like(ids)
    model.generation_config.eos_token_id = None  # every row runs its NEW tokens
    moa_flex.compile(model, first, **EAGER)
    for plan in (second, first, second):
        model.moa_flex.set_plan(plan)
        seq = run_generate(model, ids, mask).sequences
        want = planned_logits(model, plan, N, seq[:, :-1], torch.ones_like(seq)[:, :-1])[:, PROMPT - 1:]
        assert torch.equal(seq[:, PROMPT:], want.argmax(-1))
