"""`raymoe serve`'s flags: one per ServeSettings field, plus --config FILE (YAML of the same fields,
the object a Kubernetes RayService's serveConfigV2 carries as its application args).

A flag given on the command line wins over the file; anything given nowhere keeps ServeSettings'
default. The table below is the only place that names the flags, so help texts show the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from raymoe.actors import EXPERT_DEVICES, TRANSPORTS
from raymoe.cluster.settings import ServeSettings
from raymoe.model.config import DTYPE_CHOICES, QUANTIZATIONS

# flag, ServeSettings field, type, help (the default is appended)
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--checkpoint", "checkpoint", str, "Hugging Face Mixtral directory (default: the demo model)"),
    ("--app-name", "app_name", str, "the Serve application's name; several servers (models) share one Ray cluster "
                                    "under names of their own (clients: raymoe generate --app-name)"),
    ("--route-prefix", "route_prefix", str, "where the HTTP API lives (default: / for the default app name, "
                                            "/APP_NAME for any other)"),
    ("--dtype", "dtype", DTYPE_CHOICES, "weights and activations; auto: the checkpoint's own"),
    ("--quantization", "quantization", QUANTIZATIONS, "experts_int8: the experts' w1/w3/w2 as int8 per output "
                                                          "channel, quantized as each actor loads (implied by a "
                                                          "`raymoe quantize` checkpoint)"),
    ("--expert-actors", "expert_actors", int, "host the experts on N Ray actors (0: inside each front replica)"),
    ("--expert-replicas", "expert_replicas", int, "copies of each expert, on different actors"),
    ("--expert-device", "expert_device", EXPERT_DEVICES, "where expert actors compute; gpu without GPUs is an error"),
    ("--expert-transport", "expert_transport", TRANSPORTS, "how layer calls reach the actors"),
    ("--actor-cpus", "expert_num_cpus", float, "CPU share of each expert actor"),
    ("--expert-gpus", "expert_num_gpus", float, "GPU share of each expert actor on GPUs"),
    ("--expert-timeout", "expert_timeout_s", float, "seconds any wait for an expert actor may take"),
    ("--expert-slots", "expert_slots", int, "experts an actor may hold per layer (0: its share; more leaves room for "
                                            "copies of hot experts, see `raymoe experts rebalance`)"),
    ("--rebalance-every", "rebalance_every_s", float, "apply the expert planner's placement every N seconds "
                                                      "(0: only on `raymoe experts rebalance`)"),
    ("--expert-target-busy", "expert_target_busy", float, "with --expert-autoscale: the busy fraction an expert "
                                                          "actor should run at"),
    ("--upscale-delay-s", "upscale_delay_s", float, "with --autoscale / --expert-autoscale: how long load must ask "
                                                    "for more before replicas or actors are added"),
    ("--downscale-delay-s", "downscale_delay_s", float, "... and for fewer before they are removed"),
    ("--replicas", "replicas", int, "front replicas (attention, KV cache, batching, sampling)"),
    ("--target-ongoing-requests", "target_ongoing_requests", int, "with --autoscale: requests per replica to aim at"),
    ("--replica-cpus", "replica_num_cpus", float, "CPUs (and torch threads) of each front replica"),
    ("--replica-gpus", "replica_num_gpus", float, "GPU share of each front replica (> 0: it runs on a GPU)"),
    ("--grpc-port", "grpc_port", int, "Serve's gRPC proxy port (all interfaces)"),
    ("--http-port", "http_port", int, "the OpenAI-compatible HTTP API's port"),
    ("--http-host", "http_host", str, "where the HTTP proxy binds"),
    ("--max-running", "max_running", int, "sequences decoded together per replica"),
    ("--max-batch-tokens", "max_batch_tokens", int, "tokens per engine step (decode + prompt chunks); default 512 on a CPU "
                                                       "front, 2048 on a GPU one"),
    ("--kv-cache-tokens", "kv_cache_tokens", int, "KV cache size per replica, in tokens"),
    ("--no-prefix-cache", "prefix_cache", bool, "compute every prompt whole (default: reuse the KV blocks of "
                                                "prompt prefixes seen before)"),
    ("--no-prefix-routing", "prefix_routing", bool, "route requests to front replicas by load only (default: to "
                                                    "the replica holding their prefix, balanced against load)"),
    ("--max-queue", "max_queue", int, "waiting requests before RESOURCE_EXHAUSTED / 429"),
    ("--direct-ingress", "direct_ingress", bool, "each front replica also serves gRPC and HTTP on ports of its own "
                                                 "(printed at start), beside the proxy: no proxy hop (a cluster you "
                                                 "start needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1 on its nodes)"),
    ("--micro-batches", "micro_batches", int, "split each step in N parts (0: 2 when experts have GPUs, else 1)"),
    ("--stream-interval-ms", "stream_interval_ms", float, "send a stream's tokens at most this often; 0: every token"),
    ("--stream-messages-per-s", "stream_messages_per_s", float, "stretch the interval so a replica sends about this "
                                                                 "many stream messages per second (0: no bound)"),
    ("--graceful-shutdown-s", "graceful_shutdown_s", float, "how long a stopping replica lets its streams finish"),
    ("--request-timeout-s", "request_timeout_s", float, "longest request (a whole stream) through the proxies"),
    ("--max-prompt-tokens", "max_prompt_tokens", int, "limit on a prompt (0: the context minus one)"),
    ("--max-tokens-limit", "max_tokens_limit", int, "cap on max_tokens (0: what the context leaves)"),
    ("--max-stop-strings", "max_stop_strings", int, "limit on stop strings per request"),
    ("--max-stop-chars", "max_stop_chars", int, "limit on characters per stop string"),
    ("--max-stop-token-ids", "max_stop_token_ids", int, "limit on stop_token_ids per request"),
    ("--max-logprobs", "max_logprobs", int, "limit on top alternatives per token"),
    ("--served-model-name", "served_model_name", str, "the model's name in /v1/models, ModelInfo and requests "
                                                      "(default: the checkpoint directory's name, never its path)"),
    ("--max-message-bytes", "max_message_bytes", int, "largest gRPC message Serve's proxy accepts "
                                                      "(RESOURCE_EXHAUSTED beyond)"),
    ("--tenants", "tenants_file", str, "YAML of tenants: `tenants:` a list of {name, key | key_sha256, admin, "
                                       "max_concurrent, tokens_per_minute, weight, priority}; reloaded when it "
                                       "changes (see docs/tenants.md)"),
    ("--max-expert-actors", "max_expert_actors", int, "bound on `raymoe experts scale` (0: the model's experts per "
                                                      "layer × --expert-replicas, at least --expert-actors)"),
    ("--guided-max-spec-bytes", "guided_max_spec_bytes", int, "limit on a JSON schema, regex, grammar or choice list"),
    ("--guided-compile-timeout-s", "guided_compile_timeout_s", float, "refuse a guided-decoding spec that takes "
                                                                      "longer to compile"),
    ("--guided-cache-size", "guided_cache_size", int, "compiled grammars kept per replica"),
    ("--ready-when-loaded", "ready_when_loaded", bool, "a replica is up for Serve only once the expert actors are "
                                                       "loaded (default: once its dense part is; it then answers "
                                                       "ModelInfo LOADING and requests wait)"),
]


def add_serve_args(p: argparse.ArgumentParser) -> None:
    defaults = ServeSettings()
    for flag, field, kind, help_ in FLAGS:
        default = getattr(defaults, field)
        shown = f" (default: {default})" if default not in (None, "") else ""
        if kind is bool:  # a switch: given → True (a --no-… switch: given → False)
            p.add_argument(flag, dest=field, action="store_const", const=not flag.startswith("--no-"), default=None,
                           help=help_)
        elif isinstance(kind, tuple):
            p.add_argument(flag, dest=field, choices=kind, default=None, help=help_ + shown)
        else:
            p.add_argument(flag, dest=field, type=kind, default=None, help=help_ + shown)
    p.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                   help="let Serve scale the front replicas between MIN and MAX (overrides --replicas)")
    p.add_argument("--expert-autoscale", metavar="MIN:MAX", default=None,
                   help="scale the expert actors between MIN and MAX following their busy and queued time, with live "
                        "placement changes (starts with --expert-actors, default MIN)")
    p.add_argument("--config", metavar="FILE", help="YAML (or JSON) of ServeSettings fields; flags override it")
    p.add_argument("--address", help="join this Ray cluster instead of starting a private one (e.g. auto)")
    p.add_argument("--api-key", default=None,
                   help="require 'authorization: Bearer KEY' on every call: the tenant 'default', also the admin "
                        "when no admin is configured otherwise (default: $RAYMOE_API_KEY, which keeps the key out "
                        "of `ps`; no key at all: open)")
    p.add_argument("--admin-key", default=None,
                   help="the key of the tenant 'admin', which alone may use the Experts service "
                        "(default: $RAYMOE_ADMIN_KEY)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="the Ray dashboard of a private instance (127.0.0.1)")
    p.add_argument("--no-dashboard", action="store_true", help="start a private Ray instance without its dashboard")


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """ServeSettings from --config, then the flags given; a bad value is a ValueError naming it."""
    raw: dict[str, Any] = {}
    if args.config:
        raw = _read_config(Path(args.config))
    for _, field, _, _ in FLAGS:
        value = getattr(args, field)
        if value is not None:
            raw[field] = value
    if args.autoscale:
        raw["replicas"], raw["autoscale_max_replicas"] = _min_max("--autoscale", args.autoscale)
    if raw.get("tenants_file"):  # the replicas read it from their own working directory
        raw["tenants_file"] = str(Path(raw["tenants_file"]).expanduser().resolve())
    if args.expert_autoscale:
        low, high = _min_max("--expert-autoscale", args.expert_autoscale)
        raw["expert_autoscale_min"], raw["expert_autoscale_max"] = low, high
        raw.setdefault("expert_actors", low)
    return ServeSettings.from_dict(raw)


def _min_max(flag: str, value: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in value.split(":"))
    except ValueError:
        raise ValueError(f"{flag} must be MIN:MAX, e.g. 1:4 (got {value!r})") from None
    if not 1 <= low <= high:
        raise ValueError(f"{flag} needs 1 <= MIN <= MAX (got {value!r})")
    return low, high


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings")
    known = {f.name for f in dataclasses.fields(ServeSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    return data
