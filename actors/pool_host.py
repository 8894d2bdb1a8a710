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
  new key (a redeploy with other settings) gets a new pool; the old one keeps serving the old
  replicas for `RETIRE_AFTER_S` and is then removed (actors, placement group, GPUs).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from .pool import ExpertPool, PoolConfig, pool_key

NAMESPACE = "raymoe"
RETIRE_AFTER_S = 120.0  # how long an old pool serves the replicas of the previous deployment


class PoolHost:
    def __init__(self, app: str) -> None:
        self.app = app
        self.pools: dict[str, ExpertPool] = {}
        self.retiring: dict[str, float] = {}  # key → when to remove it
        self._lock = threading.Lock()  # get_pool may be called concurrently (threaded actor)

    def get_pool(self, checkpoint: str, config: dict[str, Any]) -> ExpertPool:
        cfg = PoolConfig(**config)
        key = pool_key(checkpoint, cfg)
        with self._lock:
            self._retire_due()
            if key not in self.pools:  # new to this host process: attach to a live one or start it
                self.pools[key] = ExpertPool(checkpoint, cfg, name=f"{self.app}-experts-{key}")
                for other in self.pools:
                    if other != key:
                        self.retiring.setdefault(other, time.monotonic() + RETIRE_AFTER_S)
            self.retiring.pop(key, None)
            pool = self.pools[key]
            pool.config = cfg  # this caller's timeouts
            return pool

    def ping(self) -> int:
        with self._lock:
            self._retire_due()
            return len(self.pools)

    def _retire_due(self) -> None:
        now = time.monotonic()
        for key, when in list(self.retiring.items()):
            if when <= now:
                self.pools.pop(key).shutdown()
                del self.retiring[key]

    def shutdown(self) -> None:
        with self._lock:
            for pool in self.pools.values():
                pool.shutdown()
            self.pools.clear()
            self.retiring.clear()


def host_name(app: str) -> str:
    return f"{app}-expert-pool-host"


def _head_node_strategy():
    """Pin the host to the head node: the autoscaler never removes it, and it outlives workers."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive")
                 and "node:__internal_head__" in n.get("Resources", {})), None)
    return "DEFAULT" if head is None else NodeAffinitySchedulingStrategy(head, soft=True)


def shared_pool(checkpoint: str, config: PoolConfig, app: str = "raymoe") -> ExpertPool:
    """The pool for (checkpoint, config), creating the server's host on first use."""
    import ray

    host = ray.remote(PoolHost).options(
        name=host_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_task_retries=-1, max_concurrency=4,
        scheduling_strategy=_head_node_strategy()).remote(app)
    return ray.get(host.get_pool.remote(checkpoint, dataclasses.asdict(config)),
                   timeout=config.start_timeout_s + 30)


def pool_host(app: str = "raymoe"):
    """The server's pool host actor, or None."""
    import ray

    try:
        return ray.get_actor(host_name(app), namespace=NAMESPACE)
    except ValueError:
        return None


def release_shared_pool(app: str = "raymoe") -> None:
    """Stop every pool of the server and its host (what `raymoe serve` does on Ctrl-C)."""
    import ray

    host = pool_host(app)
    if host is None:
        return
    try:
        ray.get(host.shutdown.remote(), timeout=30)
    finally:
        ray.kill(host, no_restart=True)
