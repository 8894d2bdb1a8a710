"""Deploying the Serve application on the Ray cluster this process is connected to, and taking
down the expert pool it leaves behind (used by `raymoe serve`, the tests and the benchmarks)."""

from __future__ import annotations

from .settings import SERVICER_FUNCTIONS, ServeSettings


def deploy(settings: ServeSettings, proxy_location: str | None = None, api_key: str | None = None) -> None:
    """Start Serve's proxies (on every node by default; "HeadOnly" where several Ray nodes share one
    machine and so one port) and deploy the application; return once it serves (its expert actors
    loaded, or the error that stopped them). api_key: put the key in the replicas' runtime
    environment (when joining a cluster whose processes do not have it in theirs)."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    from .app import build_app
    from .replica import prestart_pool

    prestart_pool(settings)  # the expert actors load while Serve starts
    serve.start(proxy_location=proxy_location,
                http_options={"host": settings.http_host, "port": settings.http_port,
                              "request_timeout_s": settings.request_timeout_s},
                grpc_options=gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS,
                                         request_timeout_s=settings.request_timeout_s))
    app = build_app(settings.to_dict(), api_key=api_key)
    from model.errors import BackendUnavailable

    try:
        handle = serve.run(app, name=settings.app_name, route_prefix=settings.http_route_prefix())
        handle.wait_loaded.remote().result()  # a replica is up once its dense part is; the experts may still load
    except Exception as e:  # noqa: BLE001 — Ray's wrappers carry remote tracebacks; keep the reason
        from actors.pool import remote_cause

        cause = remote_cause(e)
        if isinstance(cause, BackendUnavailable):
            raise BackendUnavailable(str(cause).splitlines()[0]) from None
        failed = [s for s in _pool_progress(settings) if s["state"] == "FAILED"]
        if failed:  # Serve gave up on replicas whose experts could not load: say why
            raise BackendUnavailable(f"{failed[0]['what']} could not load its experts: {failed[0]['error']}") from None
        reason = replica_error(settings.app_name)
        if reason:  # e.g. the replicas could not read the checkpoint
            raise DeployFailed(f"application {settings.app_name!r}: {reason}") from None
        raise


class DeployFailed(RuntimeError):
    """Serve gave up deploying the application; the message is the replicas' own error, one line."""


def replica_error(app: str) -> str | None:
    """The last error line of what Serve reports for the application's failed deployments (their
    replicas' constructor tracebacks), without the module path: e.g. 'CheckpointError: DIR: …'."""
    import re

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
    from actors.pool_host import pool_progress

    return pool_progress(settings.app_name)


def release_pool(settings: ServeSettings) -> None:
    """Stop the expert actors the deployment started (they outlive replicas by design)."""
    if settings.expert_actors:
        from actors.pool_host import release_shared_pool

        release_shared_pool(settings.app_name)
