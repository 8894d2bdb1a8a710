"""One private Ray instance, and one Serve on it, shared by the test modules that need them.

Starting a local Ray instance costs about 5 s on 2 cores and starting Serve's controller and proxies
about as much again; some fifteen modules need them. So the first module that asks starts them, and
later ones reuse them: each module deploys its own application (or starts its own expert pool) and
takes it down again at its end, leaving the instance as it found it (`clear_serve`). A module that
needs Ray started with other options asks for them (`connect(**options)`: the shared instance is
shut down and one with those options started; the next module that asks for the default gets a new
default one); one that starts a cluster of its own (ray.cluster_utils) calls `leave()` first.
Serve is started again only when a module needs other proxy options (they are fixed at start).
"""

from __future__ import annotations

import os

import ray

from bench.machine import free_port  # one way to pick a port (also imported from here by tests)
from raymoe.cluster.settings import ServeSettings

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance: no token auth
# Serve kills a proxy that is not ready within 5 s of starting (ray.serve._private.constants) and
# serve.start fails with it; on 2 cores busy with other work a proxy's start takes longer than that.
# Ray's processes inherit this process's environment at ray.init.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

# Logical CPUs (the tests' actors ask for fractions of them); the largest any module asked for on its own.
DEFAULT_OPTIONS = {"num_cpus": 4}
_BASE = {"address": "local", "include_dashboard": False, "log_to_driver": False, "namespace": "raymoe-tests"}

_options: dict | None = None  # the options of the instance this process started (None: none runs)
_serve: tuple | None = None  # (proxy options, http port, grpc port) of the Serve this process started


def connect(**options) -> None:
    """Be connected to a private local instance started with DEFAULT_OPTIONS and these, reusing the
    running one when its options are the same."""
    global _options
    options = {**DEFAULT_OPTIONS, **options}  # a module's own options never cost it the logical CPUs
    if ray.is_initialized() and _options == options:
        return
    leave()
    # Ray's processes inherit this process's environment at ray.init: keep out the API keys a module
    # may have set (tests/test_openai_api.py), or every later module's server would demand them.
    # A server gets them in its replicas' runtime environment (serving_helpers.running_server).
    keys = {k: os.environ.pop(k) for k in ("RAYMOE_API_KEY", "RAYMOE_ADMIN_KEY") if k in os.environ}
    try:
        ray.init(**_BASE, **options)
    finally:
        os.environ.update(keys)
    _options = options


def leave() -> None:
    """Shut down the instance this process is connected to (and its Serve), if any."""
    global _options, _serve
    if ray.is_initialized():
        from ray import serve

        serve.shutdown()  # nothing to do where Serve does not run
        ray.shutdown()
    _options, _serve = None, None


def _proxy_options(settings: ServeSettings) -> tuple:
    """What serve.start fixes for the life of Serve (cluster/deploy.py)."""
    return (tuple(sorted(settings.proxy_env().items())), settings.request_timeout_s, settings.http_host)




def serve_ports(settings: ServeSettings) -> dict[str, int]:
    """The ports to deploy `settings` on: those of the running Serve where its proxy options are the
    settings' own (deploy() reuses a running Serve), else new ones (a running Serve is shut down,
    and deploy() starts it again with the settings' options)."""
    global _serve
    from ray import serve
    from ray.serve.context import _get_global_client

    running = _get_global_client(raise_if_no_controller_running=False) is not None
    if running and _serve is not None and _serve[0] == _proxy_options(settings):
        return {"http_port": _serve[1], "grpc_port": _serve[2]}
    if running:
        serve.shutdown()
    ports = {"http_port": free_port(), "grpc_port": free_port()}
    _serve = (_proxy_options(settings), ports["http_port"], ports["grpc_port"])
    return ports


def clear_serve(*settings: ServeSettings) -> None:
    """Take down every Serve application and the expert pools and quota ledgers of these settings:
    the instance as the next module expects it. Serve itself keeps running."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from raymoe.cluster.deploy import release_pool

    if _get_global_client(raise_if_no_controller_running=False) is not None:
        for app in list(serve.status().applications):
            serve.delete(app)
    for s in settings:
        release_pool(s)
