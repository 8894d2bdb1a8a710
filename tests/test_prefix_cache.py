"""Automatic prefix caching in the engine: a hit gives what a miss gives (float32, greedy and
seeded), salts keep callers apart, and no block is lost or leaked (eviction under preemption, stale
prefixes, failures, randomized multi-turn traffic: free + cached + held == capacity)."""

from __future__ import annotations

import random

import pytest

from raymoe.model.engine import Engine
from raymoe.model.prefix_cache import BlockPool, extend_hashes, salt_bytes
from raymoe.model.sampling import SamplingParams

SYSTEM = [1] + [(7 * i) % 500 + 3 for i in range(45)]  # 46 tokens: 11 full blocks of 4 and 2 more
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True, logprobs=3)


def run(engine: Engine, seq_id, prompt, params, output_ids=(), salt=b""):
    seq = engine.add(seq_id, prompt, params, output_ids, cache_salt=salt)
    while seq.finish_reason is None:
        engine.step()
    return seq


def check_blocks(engine: Engine) -> None:
    """Every block is free, cached-unheld or held, and held blocks are exactly those in tables."""
    pool = engine.cache.pool
    free, cached, held = pool.counts()
    assert free + cached + held == engine.cache.num_blocks
    refs = {}
    for table in engine.cache._tables.values():  # noqa: SLF001 — the test counts what the cache holds
        for b in table:
            refs[b] = refs.get(b, 0) + 1
    assert len(refs) == held and all(pool._refs[b] == n for b, n in refs.items())  # noqa: SLF001
    assert pool.num_cached <= cached + held


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_hit_gives_the_tokens_and_logprobs_of_a_miss(model, params):
    """float32: a prompt whose first blocks are cached (another question after the same system
    prompt, and the same prompt again: its last token recomputed) gives exactly the tokens and
    logprobs a cold engine without the cache gives — bit for bit, although the hit computes only the
    tail of the prompt in a smaller step, on keys another prompt's step computed (model/row_stable.py)."""
    warm = Engine(model, kv_cache_tokens=512, block_size=4)
    run(warm, "first", SYSTEM + [11, 12, 13], params)
    for prompt, cached in ((SYSTEM + [21, 22, 23, 24, 25], 44), (SYSTEM + [11, 12, 13], 48)):
        hit = run(warm, ("hit", len(prompt), prompt[-1]), prompt, params)
        miss = run(Engine(model, kv_cache_tokens=512, block_size=4, prefix_caching=False), "miss", prompt, params)
        assert hit.cached_prompt_tokens == cached  # the shared blocks; all but the last token
        assert miss.cached_prompt_tokens == 0
        assert hit.output_ids == miss.output_ids
        assert hit.logprobs == miss.logprobs  # exact: no tolerance
        assert hit.top_logprobs == miss.top_logprobs
    check_blocks(warm)


def test_a_fully_cached_prompt_computes_its_last_token(model):
    engine = Engine(model, kv_cache_tokens=256, block_size=4)
    prompt = SYSTEM[:16]  # exactly 4 blocks
    first = run(engine, "a", prompt, GREEDY)
    again = run(engine, "b", prompt, GREEDY)
    assert again.cached_prompt_tokens == 12 and again.output_ids == first.output_ids
    q, h = engine.cache.pool.queries_tokens, engine.cache.pool.hits_tokens
    assert q == 2 * 16 and h == 12


def test_salts_keep_callers_apart_and_resumes_hit(model):
    engine = Engine(model, kv_cache_tokens=512, block_size=4)
    a = run(engine, "a", SYSTEM, GREEDY, salt=salt_bytes("key-a"))
    assert run(engine, "b", SYSTEM, GREEDY, salt=salt_bytes("key-b")).cached_prompt_tokens == 0
    assert run(engine, "a2", SYSTEM, GREEDY, salt=salt_bytes("key-a")).cached_prompt_tokens == 44
    # a resumed stream (prompt + the tokens delivered) starts from the cached prompt and output
    resumed = run(engine, "r", SYSTEM, GREEDY, output_ids=a.output_ids[:6], salt=salt_bytes("key-a"))
    assert resumed.cached_prompt_tokens == 46 and engine.cache.pool.hits_tokens >= 44 + 48
    assert resumed.output_ids == a.output_ids
    assert salt_bytes("ab", "c") != salt_bytes("a", "bc") and salt_bytes(None, "") == b""


def test_eviction_under_preemption_loses_nothing(model):
    """A cache too small for every conversation: sequences are preempted and come back from their
    cached prefix when it survived, cached blocks are evicted for admissions, and every output is
    the one the sequence gives alone without any cache."""
    engine = Engine(model, kv_cache_tokens=112, block_size=4)  # 28 blocks
    prompts = [SYSTEM[:20] + [100 + i, 200 + i, 300 + i] for i in range(5)]
    params = [GREEDY, SEEDED, GREEDY, SEEDED, GREEDY]
    params = [SamplingParams(**{**p.__dict__, "max_tokens": 24}) for p in params]
    seqs = engine.generate(prompts, params)
    assert engine.preemptions > 0
    for prompt, p, seq in zip(prompts, params, seqs):
        ref = Engine(model, kv_cache_tokens=512, block_size=4, prefix_caching=False).generate([prompt], p)[0]
        assert seq.output_ids == ref.output_ids
        # a preempted sequence recomputes its decoded tokens' keys in a prefill, which may round
        # differently from the decode steps that computed them (model/row_stable.py: decode-only
        # steps keep the fastest kernels); a hit and a miss, by contrast, compute the same steps
        assert seq.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    check_blocks(engine)
    assert engine.cache.used_blocks == 0 and engine.cache.pool.evictions > 0


def test_stale_prefixes_never_make_a_request_wait(model):
    """A cache full of prefixes nobody holds: a request needing almost every block starts at once."""
    engine = Engine(model, kv_cache_tokens=128, block_size=4)  # 32 blocks
    for i in range(8):
        run(engine, i, [1, 500 + i] + list(range(10 * i, 10 * i + 12)), GREEDY)
    assert engine.cache.pool.num_cached_unheld > 20 and engine.cache.free_blocks == 32
    big = engine.add("big", list(range(1, 110)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert big.seq_id in engine.running and big.cached_prompt_tokens == 0
    check_blocks(engine)


def test_a_failed_sequence_leaves_nothing_to_reuse():
    pool = BlockPool(4)
    blocks = pool.take_new(2)
    pool.commit(blocks[0], b"h0")
    pool.commit(blocks[1], b"h1")
    pool.release(blocks, keep=False)
    assert pool.match([b"h0", b"h1"], 2) == [] and pool.counts() == (4, 0, 0)
    blocks = pool.take_new(2)
    pool.commit(blocks[0], b"h0")
    pool.release(blocks)  # kept: h0 cached, the unnamed block free
    assert pool.counts() == (3, 1, 0) and pool.match([b"h0", b"h1"], 2) == [blocks[0]]
    assert len(pool.take_new(4)) == 4 and pool.evictions == 1 and pool.match([b"h0"], 1) == []


def test_hash_chain_depends_on_every_earlier_token_and_the_salt():
    a, b, c = [], [], []
    extend_hashes(a, [1, 2, 3, 4, 5, 6, 7, 8], 4, b"")
    extend_hashes(b, [9, 2, 3, 4, 5, 6, 7, 8], 4, b"")
    extend_hashes(c, [1, 2, 3, 4, 5, 6, 7, 8], 4, b"s")
    assert len(a) == 2 and a[1] != b[1] and a[0] != c[0] and a[1] != c[1]


def test_randomized_multi_turn_traffic_keeps_every_block_accounted(model):
    """Conversations that resend their history plus a new message, arriving at random, some
    cancelled mid-way, in a cache small enough to preempt and evict: after every step every block
    is free, cached or held exactly by the tables that name it; at the end nothing is held."""
    rng = random.Random(3)
    engine = Engine(model, kv_cache_tokens=160, block_size=4, max_running=6)
    histories = {c: [1, 400 + c] + [rng.randrange(3, 500) for _ in range(rng.randrange(4, 12))] for c in range(6)}
    live: dict = {}
    turns = hits = 0
    for step in range(250):
        if len(live) < 5 and rng.random() < 0.4:
            c = rng.choice([c for c in histories if c not in {k[0] for k in live}])
            prompt = histories[c] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 6))]
            sp = SamplingParams(max_tokens=rng.randrange(2, 10), ignore_eos=True,
                                temperature=rng.choice([0.0, 0.8]), seed=step)
            live[(c, step)] = engine.add((c, step), prompt, sp, cache_salt=salt_bytes(str(c % 2)))
        if live and rng.random() < 0.05:
            engine.abort(rng.choice(list(live)))
        engine.step()
        check_blocks(engine)
        for key, seq in list(live.items()):
            if seq.finish_reason is not None:
                del live[key]
                if seq.finish_reason == "length":
                    histories[key[0]] = seq.prompt_ids + seq.output_ids
                    turns += 1
                    hits += seq.cached_prompt_tokens > 0
    for key in list(live):
        engine.abort(key)
    check_blocks(engine)
    assert engine.cache.used_blocks == 0 and turns > 12 and hits > turns // 4

