"""The engine against cache-free recomputation, and against itself across batching choices.

Reference: `greedy_reference` (conftest) recomputes the whole sequence at every step with no KV
cache. Batching (mixed lengths, chunked prefill, sequences joining mid-run) must not change any
sequence's tokens, and seeded sampling must not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raymoe.model.engine import Engine
from raymoe.model.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)
PROMPTS = [[1, 17, 300, 45, 9], [1] + list(range(40, 61)), [7], [1, 400, 401, 402, 403, 404, 405, 406, 407, 408]]


def run_alone(model, prompt, params, **engine_kw):
    [seq] = Engine(model, kv_cache_tokens=256, **engine_kw).generate([prompt], params)
    return seq


def assert_same(a, b, atol=1e-5):
    assert a.output_ids == b.output_ids
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol, rtol=0)
    assert a.finish_reason == b.finish_reason


@pytest.mark.parametrize("which", ["model", "sliding_model"])
def test_kv_cache_decoding_equals_full_recompute(which, request, ref):
    model = request.getfixturevalue(which)
    engine = Engine(model, kv_cache_tokens=256, block_size=4)  # many small blocks, prompts cross them
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=3)
    seqs = engine.generate(PROMPTS[:2], params)
    for prompt, seq in zip(PROMPTS[:2], seqs):
        tokens, logits = ref.greedy(model, prompt, 24)
        assert seq.output_ids == tokens
        assert len(set(tokens)) > 3  # varied output, so the comparison means something
        logp = torch.log_softmax(torch.stack(logits), dim=-1)
        expected = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(seq.logprobs), expected, atol=1e-4, rtol=0)
        for row, step_logp in zip(seq.top_logprobs, logp):
            vals, ids = step_logp.topk(3)
            assert [t for t, _ in row] == ids.tolist()
            assert torch.allclose(torch.tensor([lp for _, lp in row]), vals, atol=1e-4)
    if which == "sliding_model":  # the window matters: without it the logits differ
        total = PROMPTS[1] + seqs[1].output_ids
        windowless = ref.make_model(seed=2)
        assert not torch.allclose(ref.full_logits(windowless, total), ref.full_logits(model, total), atol=1e-3)


def test_mixed_length_batch_equals_each_alone(model):
    batch = Engine(model, kv_cache_tokens=512).generate(PROMPTS, GREEDY)
    for prompt, seq in zip(PROMPTS, batch):
        assert_same(seq, run_alone(model, prompt, GREEDY))


@pytest.mark.parametrize("max_batch_tokens", [1, 4, 7])
def test_chunked_prefill_equals_unchunked(model, max_batch_tokens):
    def run(**kw):
        engine = Engine(model, kv_cache_tokens=512, **kw)
        seqs = [engine.add(i, p, GREEDY) for i, p in enumerate(PROMPTS)]
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        return seqs, steps

    whole, whole_steps = run()
    chunked, chunked_steps = run(max_batch_tokens=max_batch_tokens)
    assert whole_steps == GREEDY.max_tokens
    assert chunked_steps >= whole_steps + len(PROMPTS[1]) // max_batch_tokens - 1  # prefill really was split
    for a, b in zip(chunked, whole):
        assert_same(a, b)


def test_sequences_joining_mid_run_equal_running_alone(model):
    engine = Engine(model, kv_cache_tokens=512, block_size=8)
    a = engine.add("a", PROMPTS[0], GREEDY)
    for _ in range(3):
        engine.step()
    b = engine.add("b", PROMPTS[1], GREEDY)
    engine.step()
    engine.step()
    c = engine.add("c", PROMPTS[3], SamplingParams(max_tokens=5, ignore_eos=True))
    assert a.finish_reason is None and len(a.output_ids) == 5 and len(b.output_ids) == 2
    while engine.has_work():
        engine.step()
    assert_same(a, run_alone(model, PROMPTS[0], GREEDY))
    assert_same(b, run_alone(model, PROMPTS[1], GREEDY))
    assert_same(c, run_alone(model, PROMPTS[3], c.params))
    assert engine.cache.used_blocks == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_k=40, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_alone(model, PROMPTS[0], params)
    assert run_alone(model, PROMPTS[0], params).output_ids == alone.output_ids
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=9, ignore_eos=True), GREEDY,
              SamplingParams(max_tokens=3, temperature=0.5, ignore_eos=True)]  # unseeded neighbour
    batch = Engine(model, kv_cache_tokens=512, max_batch_tokens=6).generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [others[0], params, others[1], others[2]])
    assert_same(batch[1], alone)
    reseeded = run_alone(model, PROMPTS[0], dataclasses.replace(params, seed=4321))
    assert reseeded.output_ids != alone.output_ids
    assert alone.output_ids != run_alone(model, PROMPTS[0], SamplingParams(max_tokens=16, ignore_eos=True)).output_ids


def test_abort_frees_kv_blocks(model):
    engine = Engine(model, kv_cache_tokens=256, block_size=4)
    x = engine.add("x", PROMPTS[0], GREEDY)
    y = engine.add("y", PROMPTS[1], GREEDY)
    engine.step()
    engine.step()
    held = {s.seq_id: engine.cache.blocks_for(s.num_cached) for s in (x, y)}  # blocks grow with the tokens
    assert engine.cache.used_blocks == sum(held.values()) and held["x"] < engine.cache.blocks_for(5 + 20)
    engine.add("z", PROMPTS[2], GREEDY)  # still waiting: holds no blocks
    assert engine.abort("z").finish_reason == "cancelled"
    seq = engine.abort("x")
    assert seq.finish_reason == "cancelled" and len(seq.output_ids) == 2
    assert engine.cache.used_blocks == held["y"]
    engine.abort("y", reason="deadline")
    assert engine.cache.used_blocks == 0 and not engine.has_work()
    assert engine.abort("nope") is None
    engine.generate([PROMPTS[0]], GREEDY)  # the freed blocks are usable again
    assert engine.cache.used_blocks == 0


def test_finish_reasons(model, ref):
    prompt = PROMPTS[3]
    base = run_alone(model, prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    assert base.finish_reason == "length" and len(base.output_ids) == 12
    stop_tok = base.output_ids[4]
    first = base.output_ids.index(stop_tok)
    stopped = run_alone(model, prompt, SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,)))
    assert stopped.output_ids == base.output_ids[:first + 1] and stopped.finish_reason == "stop"
    # The same weights with that token declared as EOS: stops there, unless ignore_eos.
    eos_model = ref.make_model(seed=1, eos_token_ids=(stop_tok,))
    assert torch.equal(eos_model.lm_head.weight, model.lm_head.weight)
    eos = run_alone(eos_model, prompt, SamplingParams(max_tokens=12))
    assert eos.output_ids == base.output_ids[:first + 1] and eos.finish_reason == "stop"
    assert run_alone(eos_model, prompt, SamplingParams(max_tokens=12, ignore_eos=True)).output_ids == base.output_ids


@pytest.mark.parametrize("prompt,params,message", [
    ([], SamplingParams(), "prompt is empty"),
    ([1, 512], SamplingParams(), "token id 512 is outside the vocabulary"),
    ([1, -1], SamplingParams(), "token id -1 is outside the vocabulary"),
    ([1] * 2000, SamplingParams(max_tokens=100), "exceeds the model's context of 2048"),
    ([1] * 200, SamplingParams(max_tokens=100), "exceeds the KV cache"),
    ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
    ([1, 2], SamplingParams(temperature=float("nan")), "temperature"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p"),
    ([1, 2], SamplingParams(top_p=1.5), "top_p"),
    ([1, 2], SamplingParams(top_k=-1), "top_k"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(logprobs=513), "logprobs"),  # more alternatives than the 512 tokens
])
def test_request_validation(model, prompt, params, message):
    engine = Engine(model, kv_cache_tokens=256)
    with pytest.raises(ValueError, match=message):
        engine.add("r", prompt, params)
    assert not engine.has_work() and engine.cache.used_blocks == 0


def test_duplicate_sequence_id_rejected(model):
    engine = Engine(model, kv_cache_tokens=256)
    engine.add("r", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add("r", [1, 3], GREEDY)


@pytest.mark.parametrize("parts", [2, 3])
def test_micro_batches_equal_one_batch(model, parts):
    """Splitting each step into micro-batches (the overlap path for remote experts) changes nothing."""
    prompts = [[1, 5, 9], [1, 2, 3, 4, 5, 6, 7], [1, 40], [1, 8, 8, 8, 8], [1, 30, 31]]
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
    one = Engine(model, kv_cache_tokens=512).generate(prompts, params)
    split = Engine(model, kv_cache_tokens=512, micro_batches=parts).generate(prompts, params)
    for a, b in zip(one, split):
        assert a.output_ids == b.output_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
