"""`raymoe serve` (start or join a Ray cluster, deploy, run until Ctrl-C) and `raymoe generate` (client)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from .settings import APP_NAME, SERVICER_FUNCTIONS, ServeSettings


def deploy(settings: ServeSettings, http_port: int = 8000, proxy_location: str | None = None) -> None:
    """Start Serve's proxies (on every node by default; "HeadOnly" where several Ray nodes share one
    machine and so one port) and deploy the application."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    from .app import build_app

    serve.start(proxy_location=proxy_location, http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS,
                                         request_timeout_s=settings.request_timeout_s))
    serve.run(build_app(settings.to_dict()), name=APP_NAME, route_prefix="/")


def release_pool(settings: ServeSettings) -> None:
    """Stop the expert actors the deployment started (they outlive replicas by design)."""
    if settings.expert_actors:
        from actors.pool_host import release_shared_pool

        release_shared_pool(APP_NAME)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = ServeSettings(checkpoint=args.checkpoint, dtype=args.dtype, expert_actors=args.expert_actors,
                             expert_replicas=args.expert_replicas, replicas=args.replicas, grpc_port=args.grpc_port,
                             max_running=args.max_running, kv_cache_tokens=args.kv_cache_tokens,
                             max_queue=args.max_queue, expert_device=args.expert_device,
                             expert_transport=args.expert_transport, stream_interval_ms=args.stream_interval_ms,
                             stream_messages_per_s=args.stream_messages_per_s,
                             max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
                             max_stop_strings=args.max_stop_strings, max_stop_chars=args.max_stop_chars,
                             max_stop_token_ids=args.max_stop_token_ids, max_logprobs=args.max_logprobs)
    from ray import serve

    from .remote_session import check_expert_device, ray_connection

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with ray_connection(args.address, settings.local_ray_cpus()) as started:
        if settings.expert_actors:
            check_expert_device(settings.expert_device, started)
        try:
            import time

            from .startup import Ticker, serve_progress_line

            t0 = time.monotonic()
            with Ticker(lambda: serve_progress_line(APP_NAME, t0)):  # on stderr, like every progress line
                deploy(settings, args.http_port)
            target = f"127.0.0.1:{settings.grpc_port}"
            print(f"raymoe: serving {settings.checkpoint or 'the default model'} on {target} (gRPC); Ctrl-C stops\n"
                  f"  try: raymoe generate --target {target} --prompt '123+456=' --stream", flush=True)
            stop.wait()
        finally:
            print("raymoe: shutting down", file=sys.stderr, flush=True)
            serve.shutdown()
            release_pool(settings)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from protos import generator_pb2 as pb

    from .client import Client, completion_json

    request = pb.GenerateRequest(max_tokens=args.max_tokens, top_k=args.top_k, logprobs=args.logprobs,
                                 stop=args.stop, ignore_eos=args.ignore_eos, temperature=args.temperature,
                                 top_p=args.top_p)
    if args.seed is not None:
        request.seed = args.seed
    if args.prompt_ids is not None:
        from .commands import UserError

        try:
            request.prompt_token_ids.extend(int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t)
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers (got {args.prompt_ids!r})") from None
    else:
        request.prompt = args.prompt
    with Client(args.target) as client:
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
