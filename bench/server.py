"""Shared by the benchmarks that measure a real `raymoe serve`: the checkpoint they serve and the
server's lifetime on a private Ray instance."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def checkpoint_or_small(checkpoint: str | None) -> Iterator[str]:
    """`checkpoint`, or the `small` preset written in bfloat16 to a temp dir for the block's length."""
    if checkpoint:
        yield checkpoint
        return
    import torch

    from raymoe.model.presets import init_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        yield str(init_checkpoint("small", Path(tmp) / "small", dtype=torch.bfloat16))


@contextlib.contextmanager
def served(settings, ready_timeout_s: float = 300) -> Iterator[str]:
    """`settings` deployed on a private Ray instance and ready: its gRPC target ("host:port"). The
    server, its expert pool and the instance go when the block ends."""
    from ray import serve

    from raymoe.cli.ray_session import ray_connection
    from raymoe.cluster.client import Client
    from raymoe.cluster.deploy import deploy, release_pool

    with ray_connection(None, settings.local_ray_cpus()):
        try:
            deploy(settings)
            target = f"127.0.0.1:{settings.grpc_port}"
            with Client(target) as c:
                c.wait_ready(ready_timeout_s)
            yield target
        finally:
            serve.shutdown()
            release_pool(settings)
