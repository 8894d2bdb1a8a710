"""EngineLoop without Serve: the engine on its thread, asyncio consumers, and the stream interval
(a stream's tokens travel together at most every `stream_interval_s`; its first token and its end
are never held back)."""

from __future__ import annotations

import asyncio
import time

import pytest

from raymoe.cluster.engine_loop import EngineLoop
from raymoe.model.engine import Engine
from raymoe.model.sampling import SamplingParams


@pytest.fixture
def make_loop(model):
    loops = []

    def make(interval: float) -> EngineLoop:
        loops.append(EngineLoop(Engine(model, kv_cache_tokens=1024), None, stream_interval_s=interval))
        return loops[-1]

    yield make
    for loop in loops:
        loop.stop()


async def collect(loop: EngineLoop, n: int, prompt=(1, 7, 9)) -> tuple[list, list[float], float]:
    t0 = time.perf_counter()
    chunks, stamps = [], []
    async for chunk in loop.generate(list(prompt), SamplingParams(max_tokens=n, ignore_eos=True), []):
        chunks.append(chunk)
        stamps.append(time.perf_counter() - t0)
    return chunks, stamps, time.perf_counter() - t0


def test_interval_gathers_tokens_without_changing_them(make_loop, model):
    want = Engine(model, kv_cache_tokens=1024).generate([[1, 7, 9]], SamplingParams(max_tokens=40,
                                                                                    ignore_eos=True))[0]
    per_token, _, _ = asyncio.run(collect(make_loop(0.0), 40))
    gathered, stamps, _ = asyncio.run(collect(make_loop(0.05), 40))
    for chunks in (per_token, gathered):
        assert [t for c in chunks for t in c.token_ids] == want.output_ids
        assert [lp for c in chunks for lp in c.logprobs] == pytest.approx(want.logprobs, abs=1e-6)
        assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
        assert [c.completion_tokens for c in chunks] == sorted(c.completion_tokens for c in chunks)
    assert len(gathered[0].token_ids) < 40  # the first token is not held back until the rest
    assert len(gathered) < len(per_token)
    gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:-1])]  # between chunks, the last one excepted
    assert all(g >= 0.045 for g in gaps), gaps


def test_interval_never_delays_the_end(make_loop):
    """A stream that ends inside the interval is answered when it ends, not when the interval does."""
    loop = make_loop(5.0)
    chunks, _, took = asyncio.run(collect(loop, 6))
    assert sum(len(c.token_ids) for c in chunks) == 6 and chunks[-1].finish_reason == "length"
    assert len(chunks) <= 2 and took < 4.0  # first token (with any already made), then the rest at the end


def test_interval_stretches_with_the_running_streams(make_loop):
    loop = make_loop(0.05)
    loop.max_messages_per_s = 100.0
    assert loop.stream_interval() == 0.05  # nothing running
    loop.num_running = 20  # 20 streams at 100 messages/s in all: each every 0.2 s
    assert loop.stream_interval() == pytest.approx(0.2)
    loop.max_messages_per_s = 0.0
    assert loop.stream_interval() == 0.05


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=30, ignore_eos=True),
                                    SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)])
def test_resumed_stream_continues_exactly(make_loop, params, tokenizer):
    """A stream broken after k tokens, resumed with those tokens (and the text bytes delivered), goes on
    with exactly the tokens and text the unbroken stream has; usage counts every token once."""
    loop = make_loop(0.0)
    loop.tokenizer = tokenizer
    prompt = tokenizer.encode("The cluster sends")

    async def run(resume=(), text_bytes=0):
        return [c async for c in loop.generate(prompt, params, [], list(resume), text_bytes)]

    whole = asyncio.run(run())
    ids = [t for c in whole for t in c.token_ids]
    text = "".join(c.text for c in whole)
    for k in (1, 7, 29):
        delivered = [c for c in whole if c.completion_tokens <= k]
        k = sum(len(c.token_ids) for c in delivered)
        sent_text = "".join(c.text for c in delivered)
        rest = asyncio.run(run(ids[:k], len(sent_text.encode())))
        assert [t for c in rest for t in c.token_ids] == ids[k:]
        assert sent_text + "".join(c.text for c in rest) == text
        assert rest[-1].completion_tokens == len(ids) and rest[-1].finish_reason == "length"
    done = asyncio.run(run(ids, len(text.encode())))  # it had in fact ended: one empty last chunk
    assert len(done) == 1 and done[0].token_ids == [] and done[0].finish_reason == "length"


def test_requests_wait_while_loading_then_run(model):
    """With wait_ready (the expert actors still loading) requests queue; they run, with the tokens
    they would have had, once it returns."""
    import threading

    want = Engine(model, kv_cache_tokens=1024).generate([[1, 7, 9]], SamplingParams(max_tokens=8,
                                                                                   ignore_eos=True))[0]
    release = threading.Event()
    loop = EngineLoop(Engine(model, kv_cache_tokens=1024), None, wait_ready=release.wait)
    try:
        assert loop.loading and loop.alive

        async def run():
            task = asyncio.ensure_future(collect(loop, 8))
            await asyncio.sleep(0.3)
            assert not task.done() and loop.loading  # queued, not failed
            release.set()
            return await asyncio.wait_for(task, 30)

        chunks, _, _ = asyncio.run(run())
        assert [t for c in chunks for t in c.token_ids] == want.output_ids
        assert not loop.loading and loop.load_error is None
        loop.wait_loaded(timeout=1)
    finally:
        release.set()
        loop.stop()


def test_a_failed_load_fails_queued_and_later_requests(model):
    import threading

    from raymoe.model.errors import BackendUnavailable

    release, error = threading.Event(), BackendUnavailable("experts [0, 1] unavailable: disk on fire")

    def wait_ready():
        release.wait()
        raise error

    loop = EngineLoop(Engine(model, kv_cache_tokens=1024), None, wait_ready=wait_ready)

    async def run():
        queued = asyncio.ensure_future(collect(loop, 4))
        await asyncio.sleep(0.2)
        release.set()
        with pytest.raises(BackendUnavailable, match="disk on fire"):
            await asyncio.wait_for(queued, 10)
        with pytest.raises(BackendUnavailable, match="disk on fire"):
            await collect(loop, 4)  # a request after the failure

    try:
        asyncio.run(run())
        assert loop.load_error is error and not loop.loading and not loop.alive
        with pytest.raises(BackendUnavailable):
            loop.wait_loaded(timeout=1)
    finally:
        loop.stop()
