"""Deploy raymoe on the tests' shared Ray instance and Serve (tests/shared_ray.py) on loopback for a
test module, and take it down again."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import shared_ray
from raymoe.cluster.client import Client
from raymoe.cluster.settings import ServeSettings


@contextlib.contextmanager
def running_server(ready_timeout: float = 120, ray_options: dict | None = None, **settings) -> Iterator[Client]:
    """ServeSettings(**settings) served on the shared instance (one started with ray_options where
    given); yields a connected client. The API keys in this process's environment (RAYMOE_API_KEY,
    RAYMOE_ADMIN_KEY) reach the replicas, as they would from the environment of `raymoe serve`."""
    from raymoe.cluster.deploy import deploy
    from raymoe.cluster.tenants import ADMIN_KEY_ENV, API_KEY_ENV
    from raymoe.model.default import default_checkpoint

    shared_ray.connect(**(ray_options or {}))
    config = ServeSettings(**settings)
    config = ServeSettings(**shared_ray.serve_ports(config), **settings)
    try:
        deploy(config, api_key=os.environ.get(API_KEY_ENV), admin_key=os.environ.get(ADMIN_KEY_ENV))
        # Named by its application, so that its calls still reach it once another application is deployed.
        with Client(f"127.0.0.1:{config.grpc_port}", app=config.app_name) as client:
            client.http_port = config.http_port  # the OpenAI-compatible API, for tests that use it
            client.checkpoint = config.checkpoint or str(default_checkpoint())
            client.wait_ready(ready_timeout)
            yield client
    finally:
        shared_ray.clear_serve(config)
