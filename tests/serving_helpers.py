"""Start a real Ray + Serve deployment of raymoe on loopback for a test module, and tear it down."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

from raymoe.cluster.client import Client
from raymoe.cluster.settings import ServeSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(namespace: str, ready_timeout: float = 120, ray_options: dict | None = None,
                   **settings) -> Iterator[Client]:
    """A local Ray instance serving ServeSettings(**settings) on a free port; yields a connected client."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from raymoe.cluster.deploy import deploy, release_pool

    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace=namespace, log_to_driver=False, **(ray_options or {}))
    config = ServeSettings(grpc_port=free_port(), http_port=free_port(), **settings)
    try:
        deploy(config)
        # Named by its application, so that its calls still reach it once another application is deployed.
        with Client(f"127.0.0.1:{config.grpc_port}", app=config.app_name) as client:
            client.http_port = config.http_port  # the OpenAI-compatible API, for tests that use it
            from raymoe.model.default import default_checkpoint

            client.checkpoint = config.checkpoint or str(default_checkpoint())
            client.wait_ready(ready_timeout)
            yield client
    finally:
        serve.shutdown()
        release_pool(config)
        ray.shutdown()
