"""The engine on its own thread, fed by asyncio callers: the scheduler side of the front replica.

The Engine (model/engine.py) is single-threaded and steps synchronously (a step may wait on expert
actors). EngineLoop owns it on a background thread; coroutines submit requests and receive
per-token chunks through asyncio queues. A cancelled coroutine (client gone, deadline passed)
aborts its sequence, which frees its KV cache at the next step. A sequence the engine fails (its
own numbers went bad, or the experts it needed are unreachable) ends with that error; the others
and the loop itself keep going.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from raymoe.model.completion import CompletionTracker
from raymoe.model.engine import Engine
from raymoe.model.errors import InvalidRequest
from raymoe.model.sampling import SamplingParams
from raymoe.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from .metrics import ServingMetrics


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class Chunk:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    finish_reason: str | None
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the prefix cache held when the sequence started


def merge(a: Chunk, b: Chunk) -> Chunk:
    """Two consecutive chunks of one sequence as one."""
    return Chunk(a.text + b.text, a.token_ids + b.token_ids, a.logprobs + b.logprobs, a.top + b.top,
                 b.finish_reason, b.completion_tokens, b.cached_tokens)


def _send_all(items: list[tuple["_Request", "Chunk | BaseException"]]) -> None:
    """A step's chunks, handed to their event loops with one wake-up per loop (not one per token)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for req, item in items:
        by_loop.setdefault(req.loop, []).append((req, item))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list) -> None:
    for req, item in batch:
        req._put(item)  # noqa: SLF001 — the event loop's half of _Request.send


@dataclasses.dataclass
class Owner:
    """Whose sequences these are (shared by a request's choices): the tenant's name, weight and
    priority class (its share of the engine, model/fair.py) and its quota lease (cluster/quota.py:
    `finished(generated)` once per sequence)."""

    tenant: str = ""
    weight: float = 1.0
    priority: int = 0
    lease: Any = None

    def finished(self, generated: int, metrics: "ServingMetrics | None") -> None:
        if self.lease is not None:
            self.lease.finished(generated)
        if metrics is not None and self.tenant and generated > 0:
            metrics.tenant_tokens.inc(generated, tags={"tenant": self.tenant})


class _Request:
    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams,
                 tracker: CompletionTracker, resume_ids: list[int], owner: Owner, cache_salt: bytes = b"") -> None:
        self.loop, self.prompt_ids, self.params, self.tracker = loop, prompt_ids, params, tracker
        self.resume_ids, self.owner, self.cache_salt = resume_ids, owner, cache_salt
        self.out: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        self.ended = asyncio.Event()  # its last chunk or its error has arrived
        self.t_last = time.perf_counter()  # arrival, then each token's time (TTFT / ITL)
        self.first = True

    def send(self, item: Chunk | BaseException) -> None:
        """From the engine thread."""
        self.loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: Chunk | BaseException) -> None:
        self.out.put_nowait(item)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.ended.set()

    async def gather_for(self, seconds: float) -> None:
        """Let tokens gather for up to `seconds`; the stream's end cuts the wait short."""
        try:
            await asyncio.wait_for(self.ended.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass


class EngineLoop:
    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, *, max_queue: int = 256,
                 metrics: ServingMetrics | None = None, stream_interval_s: float = 0.0,
                 max_messages_per_s: float = 0.0, wait_ready: Callable[[], None] | None = None) -> None:
        """stream_interval_s: a stream's chunks go out at most this often (its first token and its
        end at once); the tokens of the meantime travel together. max_messages_per_s (0 = no
        bound): with many streams the interval stretches so that all of them together send about
        that many messages per second. Every message through Serve's proxy costs ≈0.9 ms of CPU
        (replica and proxy, measured on 2 cores), so with many streams per-token messages cost
        more than the tokens. wait_ready (e.g. the expert actors still loading): called first on the
        loop thread; requests queue meanwhile, and if it raises they and all later ones fail with
        that error and the loop stops."""
        self.engine, self.tokenizer, self.max_queue, self.metrics = engine, tokenizer, max_queue, metrics
        self.stream_interval_s, self.max_messages_per_s = stream_interval_s, max_messages_per_s
        if metrics is not None:
            engine.model.set_route_observer(metrics.observe_route)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[int, _Request] = {}  # touched only by the loop thread
        self._ids = itertools.count()
        self._stopped = False
        self.num_waiting = 0  # queued for admission (approximate outside the loop thread)
        self.num_running = 0
        self._wait_ready = wait_ready
        self._settled = threading.Event()  # wait_ready returned or raised (at once without one)
        self.load_error: BaseException | None = None  # what wait_ready raised
        self._thread = threading.Thread(target=self._run, name="raymoe-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, stop: list[str],
                       resume_ids: list[int] = (), resume_text_bytes: int = 0,
                       owner: Owner | None = None, cache_salt: bytes = b"") -> AsyncIterator[Chunk]:
        """Yield chunks of new tokens; the last carries finish_reason. resume_ids continues a
        generation whose first tokens (and resume_text_bytes of their text) were delivered already:
        only what follows is yielded. Raises InvalidRequest for a bad request, QueueFull when too
        many are waiting, or the error that ended the sequence. owner: the tenant's share of the
        engine, and its quota lease, told how many tokens the sequence generated however it ends.
        cache_salt: only sequences with the same salt share cached prompt blocks (Generator.cache_salt)."""
        tracker = None
        try:
            async with contextlib.aclosing(self._generate(prompt_ids, params, stop, resume_ids, resume_text_bytes,
                                                          owner or Owner(), cache_salt)) as chunks:
                async for tracker, chunk in chunks:
                    yield chunk
        finally:
            if owner is not None:
                generated = len(tracker.completion.token_ids) - len(resume_ids) if tracker is not None else 0
                owner.finished(generated, self.metrics)

    async def _generate(self, prompt_ids: list[int], params: SamplingParams, stop: list[str],
                        resume_ids: list[int], resume_text_bytes: int, owner: Owner, cache_salt: bytes):
        """generate's body: (its tracker, each chunk)."""
        if self.load_error is not None:
            raise self.load_error
        if not self.alive:
            raise RuntimeError("the engine loop has stopped")
        tracker = CompletionTracker(prompt_ids, self.tokenizer, stop)
        if resume_ids:
            try:
                # The replay decodes every resumed token: on a thread, never on the event loop
                done = await asyncio.to_thread(tracker.resume, list(resume_ids), resume_text_bytes, params,
                                               self.engine.cfg.eos_token_ids)
            except ValueError as e:
                raise InvalidRequest(str(e), "resume_text_bytes") from None
            if done:  # the broken stream had in fact ended: say so, generate nothing
                yield tracker, Chunk("", [], [], [], done, len(resume_ids))
                return
        self.engine.check(prompt_ids, params, resume_ids)
        free_slots = self.engine.max_running - self.num_running  # requests that can start right away
        if self.num_waiting + self._inbox.qsize() >= self.max_queue + max(0, free_slots):
            raise QueueFull(f"server busy: {self.max_queue} requests already waiting; retry later")
        seq_id = next(self._ids)
        req = _Request(asyncio.get_running_loop(), prompt_ids, params, tracker, list(resume_ids), owner, cache_salt)
        self._post(("add", seq_id, req))
        if self.load_error is not None:  # loading failed while this request was being posted
            raise self.load_error
        finished = False
        try:
            while True:
                item = await req.out.get()
                # Tokens that arrived while the consumer was busy go out together: under load one
                # message per token through Serve's proxy would cost more than the tokens themselves.
                while not isinstance(item, BaseException) and item.finish_reason is None and not req.out.empty():
                    nxt = req.out.get_nowait()
                    item = nxt if isinstance(nxt, BaseException) else merge(item, nxt)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield tracker, item
                if finished:
                    return
                interval = self.stream_interval()
                if interval > 0:
                    await req.gather_for(interval)
        finally:
            if not finished:  # cancelled, deadline passed, or the consumer stopped reading
                self._post(("abort", seq_id, None))

    def stream_interval(self) -> float:
        """Seconds a stream waits between messages now (see __init__)."""
        stretched = self.num_running / self.max_messages_per_s if self.max_messages_per_s > 0 else 0.0
        return max(self.stream_interval_s, stretched)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    @property
    def loading(self) -> bool:
        """Still waiting for wait_ready (requests queue meanwhile)."""
        return not self._settled.is_set()

    def wait_loaded(self, timeout: float | None = None) -> None:
        """Block until ready; raise what loading raised."""
        if not self._settled.wait(timeout):
            raise TimeoutError("the model is still loading")
        if self.load_error is not None:
            raise self.load_error

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _post(self, msg: tuple) -> None:
        self._inbox.put(msg)
        self._wake.set()

    # --- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        if self._wait_ready is not None:
            try:
                self._wait_ready()
            except Exception as e:  # noqa: BLE001 — every request, queued or later, gets this error
                self.load_error = e
                self._stopped = True
                self._settled.set()
                for kind, _, req in self._take_inbox():
                    if kind == "add":
                        req.send(e)
                return
        self._settled.set()
        while not self._stopped:
            try:
                self._iterate()
            except Exception as e:  # noqa: BLE001 — a bug outside the step: fail what is in flight, go on
                logging.getLogger("ray.serve").error("engine loop error", exc_info=e)
                self._fail_all(e)
                time.sleep(0.01)  # never a hot loop

    def _iterate(self) -> None:
        """One turn of the loop: take new requests and aborts, run a step, hand out its tokens."""
        self._drain_inbox()
        if not self.engine.has_work():
            self._observe(0.0, (0, 0))
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            return
        t0 = time.perf_counter()
        events = self.engine.step()  # fails sequences, not the step; a raise here is a bug (see _run)
        now = time.perf_counter()
        self._observe(now - t0, self.engine.last_batch)
        out: list[tuple[_Request, Chunk | BaseException]] = []
        for ev in events:
            req = self._requests.get(ev.seq_id)
            if req is None:
                continue
            if ev.error is not None:
                self._requests.pop(ev.seq_id)
                out.append((req, ev.error))
                continue
            text, done = req.tracker.on_token(ev)
            c = req.tracker.completion
            if done and ev.finish_reason is None:  # a stop string ended it
                self.engine.abort(ev.seq_id, "stop")
            if done:
                self._requests.pop(ev.seq_id)
            if self.metrics is not None:
                (self.metrics.ttft if req.first else self.metrics.itl).observe(now - req.t_last)
            req.first, req.t_last = False, now
            out.append((req, Chunk(text, [ev.token_id], [ev.logprob], [ev.top], c.finish_reason if done else None,
                                   len(c.token_ids), ev.cached_tokens)))
        _send_all(out)
        self._update_counts()

    def _take_inbox(self):
        """The messages posted so far (new requests and aborts), in order."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for kind, seq_id, req in self._take_inbox():
            if kind == "add":
                try:
                    o = req.owner
                    self.engine.add(seq_id, req.prompt_ids, req.params, req.resume_ids, tenant=o.tenant,
                                    weight=o.weight, priority=o.priority, cache_salt=req.cache_salt)
                    self._requests[seq_id] = req
                except Exception as e:  # noqa: BLE001 — InvalidRequest (checked again here), or a bug
                    req.send(e)
            elif seq_id in self._requests:  # abort
                self._requests.pop(seq_id)
                self.engine.abort(seq_id, "cancelled")
        self._update_counts()

    def _fail_all(self, error: Exception) -> None:
        """Every sequence in the engine (running or waiting) ends with `error`; memory is freed."""
        for seq_id in [*self.engine.running, *(s.seq_id for s in self.engine.waiting)]:
            self.engine.abort(seq_id, "error")
            req = self._requests.pop(seq_id, None)
            if req is not None:
                req.send(error)
        self._update_counts()

    def _observe(self, step_seconds: float, batch: tuple[int, int]) -> None:
        if self.metrics is not None:
            cache = self.engine.cache
            self.metrics.observe_step(*batch, step_seconds, len(self.engine.waiting),
                                      len(self.engine.running), cache.used_blocks * cache.block_size,
                                      cache.capacity_tokens, self.engine.preemptions)
            pool = cache.pool
            self.metrics.observe_prefix_cache(pool.queries_tokens, pool.hits_tokens, pool.evictions, pool.num_cached)

    def _update_counts(self) -> None:
        self.num_waiting, self.num_running = len(self.engine.waiting), len(self.engine.running)
