"""What a front replica loads: the checkpoint's dense part, its experts (local or remote), the engine."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import ray
import torch

from raymoe.actors.pool import named_pools
from raymoe.actors.pool_host import request_shared_pool, shared_pool
from raymoe.actors.remote_experts import remote_experts_factory
from raymoe.model.config import resolve_dtype
from raymoe.model.default import default_checkpoint
from raymoe.model.engine import Engine
from raymoe.model.progress import progress_line
from raymoe.model.tokenizer import Tokenizer
from raymoe.model.torch_threads import on_passing_thread
from raymoe.model.weights import Checkpoint, load_model

from .engine_loop import EngineLoop
from .metrics import ServingMetrics
from .settings import ServeSettings


STATS_TIMEOUT_S = 2.0  # ModelInfo reports an actor that takes longer as UNREACHABLE
ACTOR_STATE = {"READY": "ALIVE"}  # an actor's load state as ModelInfo names it (LOADING and FAILED as they are)


def _progress_logger(every_s: float = 2.0):
    """An on_progress callback writing a line to the replica's log at most every `every_s`."""
    last = [0.0]

    def log(snapshots: list[dict]) -> None:
        if time.monotonic() - last[0] >= every_s:
            last[0] = time.monotonic()
            logging.getLogger("ray.serve").info("loading experts: %s", progress_line(snapshots))

    return log


def front_device(s: ServeSettings) -> str:
    """Where the replica's dense part runs (Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU)."""
    return "cuda" if s.replica_num_gpus > 0 else "cpu"


def pool_request(s: ServeSettings, ckpt: Checkpoint):
    """(checkpoint directory, PoolConfig) of the expert pool these settings ask for, or None."""
    pool_config = s.pool_config(resolve_dtype(s.dtype, ckpt.config, front_device(s)), ckpt.quantization)
    return None if pool_config is None else (str(ckpt.dir.resolve()), pool_config)


def prestart_pool(s: ServeSettings) -> None:
    """Ask for the deployment's expert pool now, without waiting: its actors start and load their
    experts while Serve starts its controller, proxies and replicas (which then attach to it).
    Skipped where this process cannot read the checkpoint (a replica asks for it then)."""
    if not s.expert_actors:
        return
    try:
        ckpt = Checkpoint(s.checkpoint or default_checkpoint())
    except (OSError, ValueError):
        return
    try:
        request = pool_request(s, ckpt)
    except ValueError:
        return
    finally:
        ckpt.close()
    if request is not None:
        request_shared_pool(*request, s.app_name)


def build_engine_loop(s: ServeSettings) -> tuple[EngineLoop, dict[str, Any]]:
    """The replica's engine loop, once its dense part is loaded. With expert actors the loop starts
    at once but steps only when every actor has loaded its experts (requests queue meanwhile, and
    ModelInfo reports the actors LOADING with their progress)."""
    torch.set_num_threads(max(1, int(s.replica_num_cpus)))  # the replica's CPU share, not the host's cores
    ckpt = Checkpoint(s.checkpoint or default_checkpoint())
    dtype = resolve_dtype(s.dtype, ckpt.config, front_device(s))  # the expert actors use the same
    tokenizer = Tokenizer(ckpt.dir) if (ckpt.dir / "tokenizer.model").exists() else None
    factory, pool, request, replacing = None, None, pool_request(s, ckpt), False
    if request is not None:
        pool = shared_pool(*request, s.app_name)
        factory = remote_experts_factory(pool)
        # Another pool of this server still serves: a redeploy with other settings, whose old
        # replicas keep the traffic until this one can take it (see Generator.__init__).
        replacing = bool(named_pools(f"{s.app_name}-experts-") - {pool.name})

    def build() -> Engine:
        model = load_model(ckpt, dtype=getattr(torch, dtype), experts_factory=factory, device=front_device(s),
                           quantization=s.quantization)
        return Engine(model, kv_cache_tokens=s.kv_cache_tokens, max_batch_tokens=s.effective_max_batch_tokens(front_device(s)),
                      prefix_caching=s.prefix_cache, max_running=s.max_running,
                      micro_batches=s.effective_micro_batches(pool.device if pool else None))

    # The engine thread must own the process's only OpenMP team: with a second one (this thread's,
    # had it loaded the model) each step takes about twice as long (model/torch_threads.py).
    engine = on_passing_thread(build)
    model = engine.model
    metrics = ServingMetrics(model.cfg.num_hidden_layers, model.cfg.num_local_experts)
    # the actors load their experts meanwhile (they started before this replica's dense part)
    wait = None if pool is None else (lambda: pool.wait_loaded(_progress_logger()))
    loop = EngineLoop(engine, tokenizer, max_queue=s.max_queue, metrics=metrics, wait_ready=wait,
                      stream_interval_s=s.stream_interval_ms / 1e3, max_messages_per_s=s.stream_messages_per_s)
    quantization = s.quantization or ckpt.quantization or ""
    return loop, {"checkpoint": str(ckpt.dir), "dtype": dtype, "pool": pool, "replacing": replacing,
                  "quantization": quantization}


async def actor_infos(pool) -> list[dict[str, Any]]:
    """Each expert actor as ModelInfo reports it, asked concurrently; one that does not answer within
    STATS_TIMEOUT_S (dead, restarting, hung) is UNREACHABLE. Never blocks the event loop."""
    if pool is None:
        return []
    plan = pool.plan
    refs = [pool.actors[a.id].stats.remote() for a in plan.actors]
    tasks = [asyncio.ensure_future(_await(r)) for r in refs]
    await asyncio.wait(tasks, timeout=STATS_TIMEOUT_S)
    out = []
    for spec, task in zip(plan.actors, tasks):
        experts = sorted({e for layer in spec.layers for e in spec.experts[layer]})
        info = {"name": pool.actor_name(spec.id), "experts": experts, "layers": list(spec.layers),
                "state": "UNREACHABLE"}
        if task.done() and task.exception() is None:
            st = task.result()
            info.update(state=ACTOR_STATE.get(st["state"], st["state"]), node_id=st["node_id"],
                        weight_bytes=st["weight_bytes"], quantization=st.get("quantization", ""),
                        tokens_processed=st["tokens"], device=st["device"],
                        load_bytes_read=st["bytes_read"], load_total_bytes=st["total_bytes"],
                        load_seconds=st["load_s"])
        elif not task.done():
            task.cancel()
        out.append(info)
    return out


async def _await(ref):
    return await ref


class PoolHealth:
    """Whether the replica's expert pool answers, checked on a background thread (never on the event
    loop): every actor must have answered a ping within `stale_s` (a restart of a few seconds is
    tolerated). Without a pool, always healthy."""

    def __init__(self, pool, stale_s: float = 15.0) -> None:
        every_s = stale_s / 5
        self.pool, self.stale_s, self._clock = pool, stale_s, time.monotonic
        self.last_ok: dict[int, float] = {}  # actor id → when it last answered (first seen: now)
        self._stop = threading.Event()
        if pool is not None:
            threading.Thread(target=self._run, args=(every_s,), name="raymoe-pool-health", daemon=True).start()

    def _current(self) -> dict[int, float]:
        """last_ok for the actors of the pool's plan now (the placement may change while it serves)."""
        now = self._clock()
        return {a.id: self.last_ok.setdefault(a.id, now) for a in self.pool.plan.actors} if self.pool else {}

    @property
    def ok(self) -> bool:
        now = self._clock()
        return all(now - t < self.stale_s for t in self._current().values())

    def unreachable(self) -> list[str]:
        now = self._clock()
        return [self.pool.actor_name(i) for i, t in self._current().items() if now - t >= self.stale_s]

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            ids = list(self._current())
            refs = [self.pool.actors[i].ping.remote() for i in ids]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=every_s)
            now = self._clock()
            for i, ref in zip(ids, refs):
                if ref in ready:
                    try:
                        ray.get(ref, timeout=0)
                        self.last_ok[i] = now
                    except Exception:  # noqa: BLE001 — a dead actor's ping raises; it stays stale
                        pass

    def stop(self) -> None:
        self._stop.set()
