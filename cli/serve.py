"""`raymoe serve` (start or join a Ray cluster, deploy, run until Ctrl-C) and `raymoe generate` (client)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from raymoe.cluster.auth import ADMIN_KEY_ENV, ENV
from raymoe.cluster.deploy import DeployFailed, deploy, release_pool
from raymoe.cluster.settings import APP_NAME
from raymoe.cluster.tenants import Tenants, TenantsError
from raymoe.model.default import default_checkpoint
from raymoe.model.errors import BackendUnavailable

from .errors import UserError
from .prefetch import prefetch
from .progress import Ticker, serve_progress_line
from .serve_flags import settings_from_args


def cmd_serve(args: argparse.Namespace) -> int:
    from .ray_session import check_expert_device, ray_connection

    settings = settings_from_args(args)
    _check_checkpoint(settings.checkpoint, joining=bool(args.address))
    # the replicas read the keys from their environment (see cluster/auth.py)
    for value, env in ((args.api_key, ENV), (args.admin_key, ADMIN_KEY_ENV)):
        if value is not None:
            os.environ[env] = value
    try:  # the replicas check the same; here a mistake is one line before anything starts
        keyed = not Tenants(settings.tenants_file).open
    except TenantsError as e:
        raise UserError(str(e)) from None
    stop, starting, signals = threading.Event(), threading.Event(), []

    def on_signal(signum, _frame) -> None:
        signals.append(signum)
        stop.set()
        if starting.is_set():  # a Mixtral loads for minutes: stop now, taking down what started
            starting.clear()
            raise KeyboardInterrupt

    starting.set()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    dashboard = None if args.address or args.no_dashboard else args.dashboard_port
    try:
        if not args.address:  # a private Ray on this machine: read the checkpoint ahead while it starts
            prefetch(settings.checkpoint or default_checkpoint())
        with ray_connection(args.address, settings.local_ray_cpus(), dashboard_port=dashboard,
                            direct_ingress=settings.direct_ingress) as started:
            if settings.expert_actors:
                check_expert_device(settings.expert_device, started)
            _serve_until_stopped(settings, args.address, dashboard, stop, starting, keyed)
    except KeyboardInterrupt:  # stopped while starting (cleaned up above)
        return 128 + (signals[0] if signals else signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _serve_until_stopped(settings, address: str | None, dashboard: int | None, stop: threading.Event,
                         starting: threading.Event, keyed: bool) -> None:
    """Deploy, print where it serves, wait for a signal, take down what this command owns: on a
    private Ray all of Serve; on a shared cluster its application and expert pool, unless it was
    replacing a running one and that failed (deploy rolled it back to its settings)."""
    from ray import serve

    replacing = bool(address) and settings.app_name in serve.status().applications
    owned = not replacing
    try:
        t0 = time.monotonic()
        try:
            with Ticker(lambda: serve_progress_line(settings.app_name, t0)):  # on stderr, like every progress line
                ports = deploy(settings, api_key=os.environ.get(ENV) if address else None,
                               admin_key=os.environ.get(ADMIN_KEY_ENV) if address else None)
        except (BackendUnavailable, DeployFailed) as e:  # e.g. the checkpoint, or the experts, could not load
            kept = (f"; the application {settings.app_name!r} that was running runs on with its settings"
                    if replacing else "")
            raise UserError(f"cannot serve: {e}{kept}") from None
        owned = True
        starting.clear()
        print(_banner(settings, ports, dashboard, keyed), flush=True)
        if settings.direct_ingress:
            print(_direct_ingress_lines(settings, ports), flush=True)
        stop.wait()
    finally:
        starting.clear()
        print("raymoe: shutting down", file=sys.stderr, flush=True)
        if not address:
            serve.shutdown()
        elif owned:  # a shared cluster: this application only, not the other servers
            try:
                serve.delete(settings.app_name)
            except Exception as e:  # noqa: BLE001 — e.g. it never deployed; the pool is released below
                print(f"raymoe: could not delete application {settings.app_name!r}: {e}", file=sys.stderr)
        if owned:
            release_pool(settings)


def _banner(settings, ports, dashboard: int | None, keyed: bool) -> str:
    grpc_at = f"127.0.0.1:{ports.grpc_port}"
    http_at = f"http://{settings.http_host}:{ports.http_port}{settings.http_route_prefix().rstrip('/')}"
    key = " (API key required)" if keyed else ""
    app = "" if settings.app_name == APP_NAME else f" --app-name {settings.app_name}"
    lines = [f"raymoe: serving {settings.checkpoint or 'the default model'}{key} as application "
             f"{settings.app_name!r}; Ctrl-C stops",
             f"  gRPC       {grpc_at} (all interfaces)   try: raymoe generate --target {grpc_at}{app} "
             f"--prompt '123+456=' --stream",
             f"  HTTP       {http_at}/v1   (OpenAI-compatible)   try: curl {http_at}/v1/completions "
             f"-d '{{\"prompt\": \"123+456=\", \"max_tokens\": 8}}'"]
    if dashboard is not None:
        lines.append(f"  dashboard  http://127.0.0.1:{dashboard}")
    return "\n".join(lines)


def _direct_ingress_lines(settings, ports) -> str:
    """Each replica's own endpoints (--direct-ingress), or why there are none."""
    from raymoe.cluster.direct_ingress import ENV, endpoints

    found = endpoints(settings.app_name, (ports.grpc_port, ports.http_port), settings.http_host, timeout_s=30)
    if not found.grpc:
        return (f"raymoe: --direct-ingress, but no replica serves on a port of its own: the Ray nodes need "
                f"{ENV}=1 in their environment when they start (the proxy above serves as usual)")
    return "\n".join([f"  direct     gRPC {', '.join(found.grpc)}   (each replica's own port, no proxy hop; "
                      f"try: raymoe generate --target {found.grpc[0]} --prompt '123+456=')",
                      f"             HTTP {', '.join(u + settings.http_route_prefix().rstrip('/') + '/v1' for u in found.http)}"])


def _check_checkpoint(path: str | None, joining: bool) -> None:
    """A checkpoint this machine can see is checked before anything starts (a CheckpointError is
    the one-line message); joining a cluster, a path only its nodes have is left to them."""
    if path is None:
        return
    if joining and not Path(path).exists():
        return
    from raymoe.model.weights import Checkpoint

    Checkpoint(path).close()


def _direct_target(args: argparse.Namespace) -> str:
    """--direct: the server's front replicas' own gRPC endpoints, as its ModelInfo lists them (the
    client goes round robin over them)."""
    import grpc

    from raymoe.cluster.client import Client, NoDirectIngress, direct_targets

    try:
        if args.wait_ready:
            with Client(args.target, api_key=args.api_key, app=args.app_name) as client:
                client.wait_ready(args.wait_ready)
        return ",".join(direct_targets(args.target, api_key=args.api_key, app=args.app_name,
                                       timeout=args.timeout or 30))
    except grpc.RpcError as e:
        raise UserError(f"--direct: asking {args.target} for its replicas' ports: {e.code().name}: "
                        f"{e.details()}") from None
    except TimeoutError as e:
        raise UserError(str(e)) from None
    except NoDirectIngress:
        raise UserError(f"--direct: the server at {args.target} serves through its proxy only "
                        f"(start it with --direct-ingress)") from None


def _guided_args(request, args: argparse.Namespace) -> None:
    """--json-schema FILE, --regex, --choice → GenerateRequest.guided_decoding (the server checks them)."""
    if args.json_schema:
        try:
            request.guided_decoding.json_schema = Path(args.json_schema).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--json-schema: cannot read {args.json_schema} ({e})") from None
    elif args.regex is not None:
        request.guided_decoding.regex = args.regex
    elif args.choice:
        request.guided_decoding.choice.choice.extend(args.choice)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from raymoe.protos import generator_pb2 as pb

    from raymoe.cluster.client import Client, completion_json

    request = pb.GenerateRequest(max_tokens=args.max_tokens or 0, top_k=args.top_k, logprobs=args.logprobs,
                                 stop=args.stop, ignore_eos=args.ignore_eos, temperature=args.temperature,
                                 top_p=args.top_p)
    if args.seed is not None:
        request.seed = args.seed
    if args.prompt_ids is not None:
        try:
            request.prompt_token_ids.extend(int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t)
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers (got {args.prompt_ids!r})") from None
    else:
        request.prompt = args.prompt
    _guided_args(request, args)
    target = _direct_target(args) if args.direct else args.target
    with Client(target, api_key=args.api_key, app=args.app_name) as client:
        try:
            if args.wait_ready:
                client.wait_ready(args.wait_ready)
            if args.stream:
                chunks = []
                for chunk in client.stream(request, timeout=args.timeout, retries=args.retries):
                    chunks.append(chunk)
                    if not args.json:
                        print(chunk.text, end="", flush=True)
                responses = chunks
            else:
                responses = [client.generate(request, timeout=args.timeout, retries=args.retries)]
        except grpc.RpcError as e:
            print(f"\nraymoe: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except TimeoutError as e:
            print(f"raymoe: {e}", file=sys.stderr)
            return 1
    result = completion_json(responses)
    if args.json:
        print(json.dumps(result))
    elif args.stream:
        print()
    else:
        print(result["text"])
    return 0
