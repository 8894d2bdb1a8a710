"""The expert pool shared by every front replica: owned by one named, detached Ray actor per server.

Front replicas come and go (Serve autoscaling, restarts, redeploys), but the expert actors must
outlive any one of them and be started once. The first replica to ask creates `PoolHost`
(get_if_exists makes the race harmless); the host builds the ExpertPool and hands every replica a
copy (actor handles + placement), which they call directly: the host is never on the data path.

Surviving faults and redeploys:
- The host restarts without limit and runs on the head node by default (the autoscaler never
  removes it). Its placement group and expert actors are detached and named after the pool, so
  they do not die with the host, and a restarted host attaches to them without reloading weights.
- A pool is identified by its key (checkpoint + the settings that shape the actors; timeouts are
  not part of it). A replica asking for the key in use gets the same pool. A replica asking for a
  new key (a redeploy with other settings) gets a new pool; every other pool of the server (known
  to this host process, or found by name after a restart) keeps serving the old replicas for
  `RETIRE_AFTER_S` and is then removed (actors, placement group, GPUs) by a background thread.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from typing import Any

import ray
from ray.util import list_named_actors
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import live
from .autoscale import ExpertAutoscaler, actor_demand
from .pool import LIVE_SETTINGS, ExpertPool, PoolConfig, named_pools, pool_key, remove_named_pool

NAMESPACE = "raymoe"
RETIRE_AFTER_S = 120.0  # how long an old pool serves the replicas of the previous deployment
AUTOSCALE_SAMPLE_S = 2.0  # how often expert autoscaling samples the actors' busy time
DEAD_CHECK_S = 5.0  # how often the host looks for expert actors dead for good (and replaces them)
# A placement change waits this long for the one running before it, then gives up: a caller must
# not hold one of the host's few threads (max_concurrency) while another change takes minutes.
CHANGE_LOCK_WAIT_S = 5.0


class ChangeBusy(RuntimeError):
    """Another placement change is running; try again when it has finished."""


class PoolHost:
    def __init__(self, app: str, retire_after_s: float = RETIRE_AFTER_S) -> None:
        self.app, self.retire_after_s = app, retire_after_s
        self.pools: dict[str, ExpertPool] = {}  # pool name → pool, as handed out by this process
        self.retiring: dict[str, float] = {}  # pool name → when to remove it
        self.current: str | None = None  # the pool asked for last: the deployment's
        self._lock = threading.Lock()  # get_pool may be called concurrently (threaded actor)
        self._changing = threading.Lock()  # one placement change at a time (they take seconds)
        self._stop = threading.Event()
        self._last_rebalance = time.monotonic()
        self._autoscaler: ExpertAutoscaler | None = None
        self._samples: dict[int, tuple[float, float, float]] = {}  # actor → (when, busy_s, queued_s)
        self._sampled = 0.0
        self._dead_checked = time.monotonic()
        threading.Thread(target=self._janitor, name="raymoe-pool-janitor", daemon=True).start()

    def pool_name(self, key: str) -> str:
        return f"{self.app}-experts-{key}"

    def get_pool(self, checkpoint: str, config: dict[str, Any]) -> ExpertPool:
        cfg = PoolConfig(**config)
        name = self.pool_name(pool_key(checkpoint, cfg))
        with self._lock:
            if name in self.pools and self.pools[name].failed():  # e.g. the checkpoint was unreadable then
                self.pools.pop(name).shutdown()
            if name not in self.pools:  # new to this host process: attach to a live one or start it
                # Without waiting for the weights: each replica loads its own part meanwhile, then
                # waits (ExpertPool.wait_loaded) with its own progress.
                self.pools[name] = ExpertPool(checkpoint, cfg, name=name, wait=False)
                live.show_metrics(self.pools[name])
            self.retiring.pop(name, None)
            self.current = name
            self.pools[name].config = dataclasses.replace(self.pools[name].config, **{
                k: getattr(cfg, k) for k in LIVE_SETTINGS if k != "transport"})
            # The pool asked for last is the deployment's: every other one of this app (known here,
            # or left by an earlier host process) serves its old replicas a while longer, then goes.
            deadline = time.monotonic() + self.retire_after_s
            for other in (named_pools(self.pool_name("")) | set(self.pools)) - {name}:
                self.retiring.setdefault(other, deadline)
            pool = copy.copy(self.pools[name])  # this caller's copy, with its timeouts and transport
            pool.config = cfg
            return pool

    def start_pool(self, checkpoint: str, config: dict[str, Any]) -> None:
        """get_pool, for a caller that does not wait (the pool's actors start loading now)."""
        try:
            self.get_pool(checkpoint, config)
        except Exception as e:  # noqa: BLE001 — the replicas asking for it next get the error
            print(f"raymoe: starting the expert pool failed: {e}", flush=True)

    # --- live placement (actors/live.py): what `raymoe experts` asks for ----------------------

    def _pool(self) -> ExpertPool:
        with self._lock:
            if self.current is None or self.current not in self.pools:
                raise LookupError("no expert pool is running yet")
            return self.pools[self.current]

    def placement(self) -> dict[str, Any]:
        return live.report(self._pool())

    def scale(self, num_actors: int) -> dict[str, Any]:
        pool = self._pool()
        with self._change():
            return live.scale_pool(pool, num_actors)

    def rebalance(self) -> dict[str, Any]:
        pool = self._pool()
        with self._change():
            self._last_rebalance = time.monotonic()
            return live.rebalance_pool(pool)

    @contextlib.contextmanager
    def _change(self):
        if not self._changing.acquire(timeout=CHANGE_LOCK_WAIT_S):
            raise ChangeBusy(f"another placement change is running (waited {CHANGE_LOCK_WAIT_S:g} s); retry when "
                             f"it has finished")
        try:
            yield
        finally:
            self._changing.release()

    def _maybe_rebalance(self) -> None:
        try:
            pool = self._pool()
        except LookupError:
            return
        every = pool.config.rebalance_every_s
        if every > 0 and time.monotonic() - self._last_rebalance >= every and self._changing.acquire(blocking=False):
            try:
                self._last_rebalance = time.monotonic()
                live.rebalance_pool(pool)
            except Exception as e:  # noqa: BLE001 — try again next period; the old placement serves
                print(f"raymoe: periodic rebalance failed: {e}", flush=True)
            finally:
                self._changing.release()

    def ping(self) -> list[str]:
        """The pools this host process knows (for tests and status)."""
        with self._lock:
            return sorted(self.pools)

    def _maybe_autoscale(self) -> None:
        """Sample the actors' busy and queued time (every AUTOSCALE_SAMPLE_S) and let the policy decide; a
        change runs on its own thread (it waits for new actors, and perhaps for new nodes)."""
        try:
            pool = self._pool()
        except LookupError:
            return
        c = pool.config
        if not c.autoscale_max or time.monotonic() - self._sampled < AUTOSCALE_SAMPLE_S:
            return
        policy = self._autoscaler
        if policy is None or (policy.min_actors, policy.max_actors) != (c.autoscale_min, c.autoscale_max):
            policy = self._autoscaler = ExpertAutoscaler(c.autoscale_min, c.autoscale_max, c.target_busy,
                                                         c.upscale_delay_s, c.downscale_delay_s)
        self._sampled = time.monotonic()
        ids = [a.id for a in pool.plan.actors]
        try:
            stats = ray.get([pool.actors[i].stats.remote() for i in ids], timeout=5)
        except Exception:  # noqa: BLE001 — an actor restarting: sample again next time
            return
        now = time.monotonic()
        sample = {i: (now, st["busy_s"], st["queued_s"]) for i, st in zip(ids, stats)}
        demand = actor_demand(self._samples, sample)
        self._samples = sample
        if len(demand) != len(ids):
            return
        want = policy.decide(now, len(ids), demand)
        if want != len(ids) and self._changing.acquire(blocking=False):
            def scale() -> None:
                try:
                    live.scale_pool(pool, want, kind="autoscale")
                except Exception as e:  # noqa: BLE001 — the old placement keeps serving
                    print(f"raymoe: expert autoscaling to {want} actors failed: {e}", flush=True)
                finally:
                    self._samples = {}
                    self._changing.release()

            threading.Thread(target=scale, name="raymoe-expert-autoscale", daemon=True).start()

    def _maybe_replace_dead(self) -> None:
        """Replace the expert actors Ray says are dead for good (ray.kill, out of restarts): Ray
        re-creates a restartable actor itself (also on another node when its node is gone)."""
        if time.monotonic() - self._dead_checked < DEAD_CHECK_S:
            return
        self._dead_checked = time.monotonic()
        try:
            pool = self._pool()
        except LookupError:
            return
        if not self._changing.acquire(blocking=False):  # (a pool that failed to load has no dead actors)
            return
        try:
            dead = live.dead_actors(pool)
            if dead:
                print(f"raymoe: replacing expert actor(s) {[pool.actor_name(i) for i in dead]}, dead for good",
                      flush=True)
                live.replace_dead(pool, dead)
        except Exception as e:  # noqa: BLE001 — tried again next time; copies (if any) serve meanwhile
            print(f"raymoe: replacing dead expert actors failed: {e}", flush=True)
        finally:
            self._changing.release()

    def _janitor(self) -> None:
        while not self._stop.wait(1.0):
            self._maybe_rebalance()
            self._maybe_autoscale()
            self._maybe_replace_dead()
            with self._lock:
                now = time.monotonic()
                for name in [n for n, when in self.retiring.items() if when <= now]:
                    self.pools.pop(name, None)
                    remove_named_pool(name)
                    del self.retiring[name]

    def shutdown(self) -> None:
        with self._lock:
            self._stop.set()
            for name in named_pools(self.pool_name("")) | set(self.pools):
                remove_named_pool(name)
            self.pools.clear()
            self.retiring.clear()


def host_name(app: str) -> str:
    return f"{app}-expert-pool-host"


def _head_node_strategy():
    """Pin the host to the head node: the autoscaler never removes it, and it outlives workers."""
    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive")
                 and "node:__internal_head__" in n.get("Resources", {})), None)
    return "DEFAULT" if head is None else NodeAffinitySchedulingStrategy(head, soft=True)


def _host(app: str, retire_after_s: float):
    """The server's host, created on first use."""
    return ray.remote(PoolHost).options(
        name=host_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_task_retries=-1, max_concurrency=4,
        scheduling_strategy=_head_node_strategy()).remote(app, retire_after_s)


def shared_pool(checkpoint: str, config: PoolConfig, app: str = "raymoe",
                retire_after_s: float = RETIRE_AFTER_S) -> ExpertPool:
    """The pool for (checkpoint, config), creating the server's host on first use."""
    host = _host(app, retire_after_s)
    return ray.get(host.get_pool.remote(checkpoint, dataclasses.asdict(config)),
                   timeout=config.start_timeout_s + 30)


def request_shared_pool(checkpoint: str, config: PoolConfig, app: str = "raymoe",
                        retire_after_s: float = RETIRE_AFTER_S) -> None:
    """Start the pool for (checkpoint, config) without waiting for it (`shared_pool` later attaches
    to it). A failure shows when a replica asks for the pool."""
    _host(app, retire_after_s).start_pool.remote(checkpoint, dataclasses.asdict(config))


def pool_host(app: str = "raymoe"):
    """The server's pool host actor, or None."""
    try:
        return ray.get_actor(host_name(app), namespace=NAMESPACE)
    except ValueError:
        return None


def pool_progress(app: str = "raymoe", timeout_s: float = 2.0) -> list[dict]:
    """Loading snapshots of the expert actors of the server's pools, asked by name (those that
    answer within timeout_s): for a server that is starting."""
    names = named_pools(f"{app}-experts-")
    handles = []
    for a in list_named_actors(all_namespaces=True):
        if any(a["name"].endswith("/" + n) for n in names):
            try:
                handles.append(ray.get_actor(a["name"], namespace=a["namespace"]))
            except ValueError:  # gone since it was listed
                pass
    if not handles:
        return []
    ready, _ = ray.wait([h.progress.remote() for h in handles], num_returns=len(handles), timeout=timeout_s)
    out = []
    for ref in ready:
        try:
            out.append(ray.get(ref, timeout=0))
        except ray.exceptions.RayError:  # dead meanwhile
            pass
    return out


def release_shared_pool(app: str = "raymoe") -> None:
    """Stop every pool of the server and its host (what `raymoe serve` does on Ctrl-C)."""
    host = pool_host(app)
    if host is None:
        return
    try:
        ray.get(host.shutdown.remote(), timeout=30)
    finally:
        ray.kill(host, no_restart=True)
