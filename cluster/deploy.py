"""Deploying the Serve application on the Ray cluster this process is connected to, and taking
down the expert pool it leaves behind (used by `raymoe serve`, the tests and the benchmarks).

Ray, Serve, the expert pool and the replica's code are imported inside the functions (start-up time):
cli/serve.py imports this module, and the CLI's dispatch imports cli/serve.py for every command,
most of which need none of them (`raymoe generate`, `raymoe status`)."""

from __future__ import annotations

import dataclasses
import re
import sys

from raymoe.model.errors import BackendUnavailable

from .settings import SERVICER_FUNCTIONS, ServeSettings


@dataclasses.dataclass(frozen=True)
class ServePorts:
    """Where the cluster's Serve proxies listen (they keep the options of whoever started Serve)."""

    http_port: int
    grpc_port: int


def deploy(settings: ServeSettings, proxy_location: str | None = None, api_key: str | None = None,
           admin_key: str | None = None) -> ServePorts:
    """Start Serve's proxies (on every node by default; "HeadOnly" where several Ray nodes share one
    machine and so one port) and deploy the application; return once it serves (its expert actors
    loaded, or the error that stopped them), with the ports it is served on. api_key, admin_key: put
    the keys in the replicas' runtime environment (when joining a cluster whose processes do not have it in theirs)."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    from .replica import prestart_pool

    from .tenants import ADMIN_KEY_ENV, API_KEY_ENV

    keys = {env: key for env, key in ((API_KEY_ENV, api_key), (ADMIN_KEY_ENV, admin_key)) if key}
    prestart_pool(settings)  # the expert actors load while Serve starts
    ports = _running_serve(settings)
    previous = _running_settings(settings.app_name) if ports is not None else None
    serve.start(proxy_location=proxy_location, controller_options={"runtime_env": {"env_vars": settings.proxy_env()}},
                http_options={"host": settings.http_host, "port": settings.http_port,
                              "request_timeout_s": settings.request_timeout_s},
                grpc_options=gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS,
                                         request_timeout_s=settings.request_timeout_s))
    try:
        _run(settings, keys)
    except Exception as e:  # noqa: BLE001 — Ray's wrappers carry remote tracebacks; keep the reason
        error = _why_not(settings, e)  # read before a roll-back replaces what Serve reports
        if previous is not None and previous != settings.to_dict():  # Serve stops serving a failed update
            _roll_back(previous, keys)
        if error is not None:
            raise error from None
        raise
    return ports or ServePorts(settings.http_port, settings.grpc_port)


def _run(settings: ServeSettings, keys: dict[str, str]) -> None:
    """serve.run the application; return once it serves (a replica is up once its dense part is,
    and the experts may still be loading: wait_loaded waits for them)."""
    from ray import serve

    from .app import build_app

    handle = serve.run(build_app(settings.to_dict(), env=keys), name=settings.app_name,
                       route_prefix=settings.http_route_prefix())
    handle.wait_loaded.remote().result()


def _why_not(settings: ServeSettings, error: Exception) -> Exception | None:
    """The one-line error to raise for a failed deployment (None: keep Serve's own)."""
    from raymoe.actors.errors import remote_cause

    cause = remote_cause(error)
    if isinstance(cause, BackendUnavailable):
        return BackendUnavailable(str(cause).splitlines()[0])
    failed = [s for s in _pool_progress(settings) if s["state"] == "FAILED"]
    if failed:  # Serve gave up on replicas whose experts could not load: say why
        return BackendUnavailable(f"{failed[0]['what']} could not load its experts: {failed[0]['error']}")
    reason = replica_error(settings.app_name)
    if reason:  # e.g. the replicas could not read the checkpoint
        return DeployFailed(f"application {settings.app_name!r}: {reason}")
    return None


def _running_settings(app: str) -> dict | None:
    """The settings the application of that name runs with now (None: it does not run)."""
    from ray import serve

    if app not in serve.status().applications:
        return None
    try:
        return serve.get_app_handle(app).settings_dict.remote().result(timeout_s=30)
    except Exception:  # noqa: BLE001 — not serving (failed, or still starting): nothing to return to
        return None


def _roll_back(previous: dict, keys: dict[str, str]) -> None:
    """Deploy the application again with the settings it ran with (its pool is still there)."""
    settings = ServeSettings.from_dict(previous)
    print(f"raymoe: the new deployment of {settings.app_name!r} failed; deploying it again with the settings "
          "it ran with", file=sys.stderr, flush=True)
    try:
        _run(settings, keys)
    except Exception as e:  # noqa: BLE001 — the reason of the new deployment's failure matters more
        print(f"raymoe: rolling back failed too: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)


def _running_serve(settings: ServeSettings) -> ServePorts | None:
    """The ports of a Serve already running on the cluster (None: none runs); says on stderr where
    they are not the settings' (serve.start keeps a running Serve's options) or where it lacks
    raymoe's gRPC services (started by something else: the gRPC API will answer UNIMPLEMENTED)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    details = client.get_serve_details()
    http = (details.get("http_options") or {}).get("port", 8000)
    grpc_options = details.get("grpc_options") or {}
    ports = ServePorts(int(http), int(grpc_options.get("port", 9000)))
    if (ports.http_port, ports.grpc_port) != (settings.http_port, settings.grpc_port):
        print(f"raymoe: Serve already runs on this cluster with HTTP port {ports.http_port} and gRPC port "
              f"{ports.grpc_port}; the application is served there", file=sys.stderr, flush=True)
    missing = sorted(set(SERVICER_FUNCTIONS) - set(grpc_options.get("grpc_servicer_functions") or []))
    if missing:
        print(f"raymoe: the running Serve was started without raymoe's gRPC services ({', '.join(missing)}): "
              "only the HTTP API will answer; start Serve with them (cluster.settings.SERVICER_FUNCTIONS)",
              file=sys.stderr, flush=True)
    return ports


class DeployFailed(RuntimeError):
    """Serve gave up deploying the application; the message is the replicas' own error, one line."""


def replica_error(app: str) -> str | None:
    """The last error line of what Serve reports for the application's failed deployments (their
    replicas' constructor tracebacks), without the module path: e.g. 'CheckpointError: DIR: …'."""

    from ray import serve

    try:
        status = serve.status().applications[app]
    except Exception:  # noqa: BLE001 — no such application (any more)
        return None
    for message in [d.message for d in status.deployments.values()] + [status.message]:
        errors = re.findall(r"^(?:[\w]+\.)*(\w+(?:Error|Exception|Unavailable)): (.+)$", message or "", re.MULTILINE)
        if errors:
            return ": ".join(errors[-1])
    return None


def _pool_progress(settings: ServeSettings) -> list[dict]:
    if not settings.expert_actors:
        return []
    from raymoe.actors.pool_host import pool_progress

    return pool_progress(settings.app_name)


def release_pool(settings: ServeSettings) -> None:
    """Stop the expert actors the deployment started (they outlive replicas by design), and the
    tenants' quota ledger (cluster/quota.py)."""
    from .quota import remove_ledger

    remove_ledger(settings.app_name)
    if settings.expert_actors:
        from raymoe.actors.pool_host import release_shared_pool

        release_shared_pool(settings.app_name)
