"""The expert pool shared by every front replica: owned by one named, detached Ray actor.

Front replicas come and go (Serve autoscaling, restarts), but the expert actors must outlive any
one of them and be started once. The first replica to ask creates `PoolHost` (get_if_exists makes
the race harmless); it builds the ExpertPool, so it owns the actors and their placement group,
and hands every replica a copy of the pool (actor handles + placement), which they call directly.
The host's name is derived from the checkpoint and pool config, so a new config gets new actors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from .pool import ExpertPool, PoolConfig

NAMESPACE = "raymoe"


class PoolHost:
    def __init__(self, checkpoint: str, config: dict[str, Any]) -> None:
        self.pool = ExpertPool(checkpoint, PoolConfig(**config))

    def get_pool(self) -> ExpertPool:
        return self.pool

    def shutdown(self) -> None:
        self.pool.shutdown()


def host_name(checkpoint: str, config: PoolConfig) -> str:
    key = json.dumps([checkpoint, dataclasses.asdict(config)], sort_keys=True, default=str)
    return f"raymoe-experts-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def shared_pool(checkpoint: str, config: PoolConfig) -> ExpertPool:
    """The pool for (checkpoint, config), creating its host on first use."""
    import ray

    host = ray.remote(PoolHost).options(
        name=host_name(checkpoint, config), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=0).remote(checkpoint, dataclasses.asdict(config))
    return ray.get(host.get_pool.remote(), timeout=config.start_timeout_s + 30)


def release_shared_pool(checkpoint: str, config: PoolConfig) -> None:
    """Stop the pool's actors and its host (what `raymoe serve` does on Ctrl-C)."""
    import ray

    try:
        host = ray.get_actor(host_name(checkpoint, config), namespace=NAMESPACE)
    except ValueError:
        return
    try:
        ray.get(host.shutdown.remote(), timeout=30)
    finally:
        ray.kill(host)
