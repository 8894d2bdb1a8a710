"""Remote experts for a command: join (or start) Ray, start the expert pool, tear down what we started.

Used by `raymoe run --expert-actors N [--expert-replicas R] [--actor-cpus C] [--address ADDR]`, by
`raymoe eval-demo --expert-actors N` and (the connection only) by `raymoe serve`. Without
--address a private local Ray instance is started for the command (even when another Ray cluster runs
on the machine; `--address auto` joins that one instead) (token auth off unless RAY_AUTH_MODE is
set, no dashboard, actor logs kept out of our stdout so --json output stays one object) and shut
down at the end; with --address the command joins that cluster and leaves it running.

Ray and the expert pool are imported where they are used: `raymoe run` without --expert-actors
passes through here and needs neither (start-up time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from raymoe.cluster.direct_ingress import DRAIN_ENV as DIRECT_INGRESS_DRAIN_ENV, ENV as DIRECT_INGRESS_ENV
from raymoe.cluster.serve_env import apply_serve_env
from raymoe.model.transformer import ExpertsFactory

from .errors import UserError
from .prefetch import prefetch
from .progress import PoolProgress, Ticker


@contextlib.contextmanager
def ray_connection(address: str | None, num_cpus: int | None = None,
                   dashboard_port: int | None = None, direct_ingress: bool = False) -> Iterator[bool]:
    """Connect to Ray for the duration; yields whether this call started the connection. A private
    instance gets the Ray dashboard on 127.0.0.1:dashboard_port when that is given, and Serve's
    direct ingress with `direct_ingress` (cluster/direct_ingress.py)."""
    import ray

    if ray.is_initialized():  # e.g. a test or a notebook already connected: reuse, leave it be
        yield False
        return
    if address:
        print(f"raymoe: joining the Ray cluster at {address}", file=sys.stderr, flush=True)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise UserError(f"cannot join the Ray cluster at {address}: {e}") from None
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance for this command
        apply_serve_env()  # Serve's proxy and replicas read these when they start
        if direct_ingress:
            os.environ[DIRECT_INGRESS_ENV] = "1"
            # Serve holds a stopping replica open 30 s for load balancers to deregister it; a private
            # instance has none (a stopping replica still waits for its requests in flight)
            os.environ.setdefault(DIRECT_INGRESS_DRAIN_ENV, "0")
        t0 = time.monotonic()
        with Ticker(lambda: f"raymoe: starting a private Ray instance ({time.monotonic() - t0:.0f} s)"):
            # address="local": always a private instance, even when `ray start` left a cluster running
            # on this machine (a plain ray.init() would join it and then refuse num_cpus).
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), log_to_driver=False,
                     include_dashboard=dashboard_port is not None, dashboard_host="127.0.0.1",
                     **({"dashboard_port": dashboard_port} if dashboard_port is not None else {}))
    try:
        yield True
    finally:
        ray.shutdown()


def check_expert_device(device: str, started: bool) -> None:
    """`gpu` on a Ray instance this command started without GPUs can never be placed: say so now
    (on a joined cluster the autoscaler may still bring GPU nodes; the pool's start timeout bounds that)."""
    import ray

    if device == "gpu" and started and not ray.cluster_resources().get("GPU"):
        raise UserError("--expert-device gpu, but this machine has no GPUs visible to Ray; "
                        "use --expert-device cpu (or auto)")


@contextlib.contextmanager
def experts_factory_from_args(args: argparse.Namespace, checkpoint: str | Path) -> Iterator[ExpertsFactory | None]:
    """None (every expert in this process) unless --expert-actors is given; else remote experts."""
    num_actors = getattr(args, "expert_actors", None)
    if num_actors is None:
        if getattr(args, "address", None):
            raise UserError("--address joins a Ray cluster for remote experts; also give --expert-actors N")
        yield None
        return
    from raymoe.actors.errors import ExpertsUnavailable
    from raymoe.actors.pool import ExpertPool, PoolConfig
    from raymoe.actors.remote_experts import remote_experts_factory

    if num_actors < 1:
        raise UserError(f"--expert-actors must be at least 1 (got {num_actors})")
    try:
        config = PoolConfig(num_actors=num_actors, replicas=getattr(args, "expert_replicas", 1) or 1,
                            num_cpus=getattr(args, "actor_cpus", None), dtype=getattr(args, "dtype", "float32"),
                            device=getattr(args, "expert_device", "auto"),
                            transport=getattr(args, "expert_transport", "direct"),
                            call_timeout_s=getattr(args, "expert_timeout", None) or 60.0,
                            quantization=getattr(args, "quantization", None))
        progress = PoolProgress(num_actors)
        if not getattr(args, "address", None):  # the actors run on this machine: read ahead meanwhile
            prefetch(checkpoint)
        with ray_connection(getattr(args, "address", None)) as started:
            check_expert_device(config.device, started)
            with Ticker(progress.line):  # on stderr: stdout stays the command's own output
                pool = ExpertPool(checkpoint, config, on_progress=progress, wait=False)
            with pool:
                yield LoadingExperts(remote_experts_factory(pool), pool, progress)
    except ExpertsUnavailable as e:
        raise UserError(str(e)) from None


class LoadingExperts:
    """An experts factory whose actors are still loading: the command loads its own part (the
    dense weights) meanwhile, then calls wait_loaded() (progress on stderr)."""

    def __init__(self, factory: ExpertsFactory, pool, progress) -> None:
        self.factory, self.pool, self.progress = factory, pool, progress

    def __call__(self, layer: int):
        return self.factory(layer)

    def wait_loaded(self) -> None:
        with Ticker(self.progress.line):
            self.pool.wait_loaded(self.progress)
