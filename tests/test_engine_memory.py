"""Memory admission and isolation in the engine: blocks taken as sequences grow, preemption with
recomputation (output unchanged), admission that cannot be hogged or starved, and failures that
stay with the sequence that caused them."""

from __future__ import annotations

import pytest
import torch

from raymoe.model.engine import Engine
from raymoe.model.moe import LocalExperts
from raymoe.model.sampling import SamplingParams

PROMPTS = [[1, 17, 300, 45, 9], [1] + list(range(40, 61)), [7, 8], [1, 400, 401, 402, 403, 404, 405]]
MIXED = [SamplingParams(max_tokens=40, ignore_eos=True),
         SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True, logprobs=2),
         SamplingParams(max_tokens=40, temperature=1.3, top_k=20, seed=5, ignore_eos=True),
         SamplingParams(max_tokens=40, ignore_eos=True, logprobs=1)]


def alone(model, prompt, params):
    return Engine(model, kv_cache_tokens=512, block_size=4).generate([prompt], params)[0]


def test_preemption_recomputes_to_the_same_tokens(model):
    """A cache too small for all four at once: sequences are preempted and recomputed, and every
    one (greedy or seeded sampling) ends with exactly the tokens it has alone."""
    engine = Engine(model, kv_cache_tokens=96, block_size=4)  # 24 blocks; the four need 46 together
    seqs = engine.generate(PROMPTS, MIXED)
    assert engine.preemptions > 0 and any(s.preemptions for s in seqs)
    for prompt, params, seq in zip(PROMPTS, MIXED, seqs):
        ref = alone(model, prompt, params)
        assert seq.output_ids == ref.output_ids
        assert seq.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert seq.top_logprobs == [[(t, pytest.approx(lp, abs=1e-5)) for t, lp in row] for row in ref.top_logprobs]
    assert engine.cache.used_blocks == 0


def test_small_request_is_not_held_behind_large_ones(model):
    """Two requests with a large max_tokens do not reserve the cache: a small one sent after them
    starts at once and finishes long before they do."""
    engine = Engine(model, kv_cache_tokens=1024, block_size=16)
    big = [engine.add(f"big{i}", [1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True)) for i in range(2)]
    small = engine.add("small", [1, 5], SamplingParams(max_tokens=8, ignore_eos=True))
    steps = 0
    while small.finish_reason is None:
        engine.step()
        steps += 1
    assert steps <= 10 and all(b.finish_reason is None for b in big)
    while engine.has_work():
        engine.step()
    assert [len(b.output_ids) for b in big] == [500, 500]


def test_a_request_that_does_not_fit_is_overtaken_but_not_starved(model):
    """The head of the queue needs more blocks than are free: later requests that fit start first,
    but only max_overtakes of them; then the queue waits for the head."""
    engine = Engine(model, kv_cache_tokens=64, block_size=4, max_overtakes=2)  # 16 blocks
    engine.add("running", [1] * 30, SamplingParams(max_tokens=20, ignore_eos=True))  # 8 blocks, growing
    engine.step()
    # 10 blocks: waits (its own tokens: a prefix shared with "running" would cost it nothing)
    large = engine.add("large", [2] * 40, SamplingParams(max_tokens=4, ignore_eos=True))
    smalls = [engine.add(f"s{i}", [1, 2], SamplingParams(max_tokens=30, ignore_eos=True)) for i in range(5)]
    engine.step()
    started = [s.seq_id for s in smalls if s.seq_id in engine.running]
    assert started == ["s0", "s1"] and large.overtaken == 2  # two overtook it; the rest wait behind it
    while large.finish_reason is None:
        engine.step()
    assert all(s.finish_reason is None or s.seq_id in ("s0", "s1") for s in smalls[2:])
    while engine.has_work():
        engine.step()
    assert all(len(s.output_ids) == 30 for s in smalls)


def test_a_request_is_admitted_with_room_for_its_first_token(model):
    """A prompt that fills exactly the free blocks waits for one more: admitted at once, its first
    sampled token would need a block at the next step and it would be preempted (its prefill lost)."""
    engine = Engine(model, kv_cache_tokens=64, block_size=4)  # 16 blocks
    first = engine.add("first", [1] * 30, SamplingParams(max_tokens=3, ignore_eos=True))  # up to 32 tokens: 8 blocks
    engine.step()
    exact = engine.add("exact", [1, 2, 3, 4] * 8, SamplingParams(max_tokens=6, ignore_eos=True))  # 8 blocks = the free ones
    engine.step()
    assert "exact" not in engine.running and engine.cache.free_blocks == 8
    while engine.has_work():
        engine.step()
    assert engine.preemptions == 0 and len(first.output_ids) == 3
    assert exact.output_ids == alone(model, exact.prompt_ids, exact.params).output_ids


def test_admissions_in_one_step_leave_each_other_room(model):
    """Two requests into an empty 4-block cache: A (8 tokens, 2 blocks, a 3rd for its first token)
    and B (1 block + 1). Both fit alone, but not both with their next tokens: B waits for A, and
    nobody is preempted."""
    engine = Engine(model, kv_cache_tokens=16, block_size=4)
    a = engine.add("a", [1, 5, 6, 7, 8, 9, 10, 11], SamplingParams(max_tokens=4, ignore_eos=True))
    b = engine.add("b", [1, 12, 13, 14], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    assert list(engine.running) == ["a"]
    while engine.has_work():
        engine.step()
    assert engine.preemptions == 0
    for seq in (a, b):
        assert seq.output_ids == alone(model, seq.prompt_ids, seq.params).output_ids


@pytest.mark.slow  # a long queue run to its end: ~20 s
def test_no_waiting_request_is_passed_more_than_max_overtakes_times(model):
    """Random arrivals of mixed sizes into a cache that preempts: counted from outside (every
    admission passes the earlier-arrived sequences still waiting), nobody is passed more than
    max_overtakes times, everything finishes, and greedy outputs are those of each request alone."""
    import random

    rng, limit = random.Random(4), 2
    engine = Engine(model, kv_cache_tokens=96, block_size=4, max_overtakes=limit, max_batch_tokens=48)
    passed: dict = {}
    admit = engine._admit

    def observed(budget):
        before = list(engine.waiting)
        started = admit(budget)
        gone = set()
        for seq, _ in started:
            gone.add(seq.seq_id)
            for w in before:
                if w.arrival < seq.arrival and w.seq_id not in gone:
                    passed[w.seq_id] = passed.get(w.seq_id, 0) + 1
        return started

    engine._admit = observed
    seqs, steps = [], 0
    while len(seqs) < 30 or engine.has_work():
        if len(seqs) < 30 and rng.random() < 0.6:
            big = rng.random() < 0.3
            prompt = [rng.randrange(1, 500) for _ in range(rng.randrange(40, 60) if big else rng.randrange(2, 12))]
            seqs.append(engine.add(len(seqs), prompt, SamplingParams(max_tokens=rng.randrange(2, 30), ignore_eos=True)))
        engine.step()
        steps += 1
        assert steps < 5000
    assert engine.preemptions > 0 and max(passed.values()) <= limit
    assert any(n == limit for n in passed.values())  # the limit was reached, so it was tested
    for seq in seqs:
        assert seq.finish_reason == "length"
        assert seq.output_ids == alone(model, seq.prompt_ids, seq.params).output_ids


def poison(model, token: int):
    """The model with token `token`'s embedding set to inf: any sequence containing it turns to NaN."""
    import copy

    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.embed_tokens.weight[token] = float("inf")
    return bad


def test_non_finite_sequence_fails_alone_and_leaves_no_trace(model):
    bad = poison(model, 66)
    engine = Engine(bad, kv_cache_tokens=128, block_size=4)
    params = SamplingParams(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True)
    good = [engine.add(i, p, params) for i, p in enumerate(PROMPTS[:3])]
    engine.add("poisoned", [1, 66, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], params)
    events = []
    while engine.has_work():
        events += engine.step()
    failed = [e for e in events if e.error is not None]
    assert [e.seq_id for e in failed] == ["poisoned"] and failed[0].finish_reason == "error"
    for prompt, seq in zip(PROMPTS, good):
        assert seq.output_ids == alone(model, prompt, params).output_ids
    # The poisoned sequence's blocks (with inf/NaN in them) are reused, zeroed, by new sequences.
    again = [engine.add(f"again{i}", p, params) for i, p in enumerate(PROMPTS)]
    while engine.has_work():
        engine.step()
    for prompt, seq in zip(PROMPTS, again):
        assert seq.output_ids == alone(model, prompt, params).output_ids


class RaisingExperts(LocalExperts):
    """Local experts that raise on non-finite input, as a remote backend might."""

    def forward(self, x, weights, idx):
        if not bool(torch.isfinite(x).all()):
            raise RuntimeError("non-finite hidden state")
        return super().forward(x, weights, idx)


def test_a_raising_step_fails_only_the_sequence_that_causes_it(model):
    bad = poison(model, 66)
    for layer in bad.layers:
        old = layer.moe.experts
        new = RaisingExperts(old.num_experts, model.cfg.hidden_size, model.cfg.intermediate_size)
        new.load_state_dict(old.state_dict())
        layer.moe.experts = new
    engine = Engine(bad, kv_cache_tokens=256, block_size=4)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    good = [engine.add(i, p, params) for i, p in enumerate(PROMPTS)]
    engine.add("poisoned", [1, 66, 5], params)
    events = []
    while engine.has_work():
        events += engine.step()
    assert [e.seq_id for e in events if e.error is not None] == ["poisoned"]
    assert "non-finite" in str(next(e.error for e in events if e.error is not None))
    for prompt, seq in zip(PROMPTS, good):
        assert seq.output_ids == alone(model, prompt, params).output_ids


@pytest.mark.parametrize("params", MIXED[:3])
def test_continuing_from_delivered_tokens_gives_the_rest(model, params):
    """add(output_ids=...) re-prefills prompt + delivered tokens and goes on as the original would."""
    full = alone(model, PROMPTS[0], params)
    for cut in (1, 7, 39):
        engine = Engine(model, kv_cache_tokens=512, block_size=4)
        seq = engine.add("r", PROMPTS[0], params, output_ids=full.output_ids[:cut])
        while engine.has_work():
            engine.step()
        assert seq.output_ids == full.output_ids
        assert seq.logprobs == pytest.approx(full.logprobs[cut:], abs=1e-5)  # of the new tokens only


def test_continuation_must_leave_room(model):
    engine = Engine(model, kv_cache_tokens=512)
    with pytest.raises(ValueError, match="already generated"):
        engine.add("r", [1, 2], SamplingParams(max_tokens=3), output_ids=[4, 5, 6])
