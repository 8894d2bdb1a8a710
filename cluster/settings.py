"""Serving settings: one dataclass, parsed once at the entry point (CLI flags or Serve config args).

The same object builds the Serve application (cluster/app.py) whether it comes from
`raymoe serve` or from the `serveConfigV2` of a Kubernetes RayService, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from raymoe.actors import EXPERT_DEVICES, TRANSPORTS
from raymoe.model.config import DTYPE_CHOICES, check_quantization

APP_NAME = "raymoe"  # the default application name (each server in one Ray cluster needs its own)
DEPLOYMENT_NAME = "Generator"
SERVICER_FUNCTIONS = [
    "raymoe.protos.generator_pb2_grpc.add_GeneratorServicer_to_server",
    "raymoe.protos.generator_pb2_grpc.add_ExpertsServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    checkpoint: str | None = None  # None → the default (demo) model
    # Several servers (models) share one Ray cluster as Serve applications of their own names: gRPC
    # clients name theirs in the `application` metadata (once there are several), HTTP clients by
    # its route prefix ("" → "/" for the default name, "/<app_name>" for any other).
    app_name: str = APP_NAME
    route_prefix: str = ""
    dtype: str = "auto"  # auto → the checkpoint's own (config.json torch_dtype / dtype)
    expert_actors: int = 0  # 0 → experts inside each front replica
    # "experts_int8" (vLLM's name): the experts' weights as int8 per output channel, quantized as they
    # load (in the actors, or in each front replica for local experts); None: the serving dtype
    quantization: str | None = None
    expert_replicas: int = 1  # copies of each expert across the actors
    expert_num_cpus: float = 0.5  # CPU share of each expert actor when there are no GPUs
    expert_timeout_s: float = 30.0  # bound on every wait for an expert actor
    expert_device: str = "auto"  # auto (GPU when the cluster has GPUs at start) | cpu | gpu (an error without)
    expert_num_gpus: float = 1.0  # GPU share of each expert actor on GPUs
    expert_transport: str = "direct"  # how layer calls reach the actors: direct (sockets) | ray (object store)
    expert_resources: dict[str, float] = dataclasses.field(default_factory=dict)  # custom Ray resources per actor
    expert_slots: int = 0  # experts an actor may hold per layer; 0 → its share (more: room for hot copies)
    rebalance_every_s: float = 0.0  # > 0: apply the expert planner's placement this often (actors/planner.py)
    # > 0: the pool host grows and shrinks the expert actors between these, following their busy time
    expert_autoscale_min: int = 0
    expert_autoscale_max: int = 0
    expert_target_busy: float = 0.5  # busy fraction an expert actor should run at when autoscaling
    replicas: int = 1  # front replicas (ignored when autoscaling is on)
    autoscale_max_replicas: int = 0  # > replicas turns on Serve autoscaling between the two
    target_ongoing_requests: int = 16
    # How long load must ask for more (fewer) front replicas or expert actors before they change
    # (Serve's upscale_delay_s / downscale_delay_s, used for both).
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    # Tokens per engine step (decodes + prompt chunks); 0 = auto: 512 on a CPU front, where a step of
    # 2,048 prompt tokens held streams running beside it for 3-4 s (a 512-token step: 0.5-0.7 s; the
    # prompts themselves finished sooner too), and 2,048 on a GPU front (effective_max_batch_tokens).
    max_batch_tokens: int = 0
    micro_batches: int = 0  # split each step in N parts to overlap attention with remote experts; 0 = auto
    max_running: int = 64  # sequences decoded together
    kv_cache_tokens: int = 32768  # KV cache size per front replica, in tokens
    # Reuse the KV blocks of prompt prefixes seen before (docs/prefix-cache.md); off: every request
    # computes its whole prompt.
    prefix_cache: bool = True
    # With several front replicas (or autoscaling), run a request on the replica that holds the
    # longest prefix of it, balanced against load (cluster/prefix_router.py, docs/prefix-cache.md).
    prefix_routing: bool = True
    max_queue: int = 256  # requests waiting for admission before RESOURCE_EXHAUSTED
    # Each front replica also serves gRPC and HTTP on ports of its own (Ray Serve's direct ingress,
    # cluster/direct_ingress.py), beside the proxy: a client that connects there skips the proxy's
    # hop (with local experts, 32 streams: +17-24% tokens/s, 2.0 against 2.45 CPU ms per token).
    # Serve reads it from the environment of the Ray nodes when they start: `raymoe serve` sets it
    # on the private Ray instance it starts; a cluster you start needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1.
    direct_ingress: bool = False
    # A stream's chunks go out at most this often (first token and end at once), as Ray Serve LLM's
    # stream_batching_interval_ms; with many streams the interval stretches so that a replica sends
    # about stream_messages_per_s messages in all (each costs ≈0.9 ms of CPU in replica and proxy).
    stream_interval_ms: float = 50.0
    stream_messages_per_s: float = 320.0  # 0 = no bound
    # Limits on one request (INVALID_ARGUMENT / HTTP 400 beyond them); 0 = derived from the model.
    max_prompt_tokens: int = 0  # 0 → the context minus one
    max_tokens_limit: int = 0  # cap on max_tokens; 0 → what the context leaves after the prompt
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # per stop string
    max_stop_token_ids: int = 64
    max_logprobs: int = 20  # top alternatives per token (gRPC logprobs, OpenAI logprobs / top_logprobs)
    # Guided decoding (response_format, tools, GenerateRequest.guided_decoding): a larger spec, or one
    # slower to compile, is refused with INVALID_ARGUMENT / 400; compiled grammars kept per replica.
    guided_max_spec_bytes: int = 65536
    guided_compile_timeout_s: float = 10.0
    guided_cache_size: int = 256
    replica_num_cpus: float = 1.0
    replica_num_gpus: float = 0.0  # > 0: the front replica (attention, KV cache, dense layers) runs on a GPU
    replica_resources: dict[str, float] = dataclasses.field(default_factory=dict)  # custom Ray resources per replica
    grpc_port: int = 9000
    http_port: int = 8000  # the OpenAI-compatible HTTP API
    http_host: str = "127.0.0.1"  # where Serve's HTTP proxy binds (0.0.0.0 in a pod)
    request_timeout_s: float = 600.0  # covers a whole stream
    # A replica Serve stops (scale-down, redeploy) takes no new requests and lets its streams finish
    # for up to this long; streams still running then are cut, and the project's clients resume them.
    graceful_shutdown_s: float = 30.0
    # A replica is up for Serve once its dense part is loaded: while the expert actors load it
    # answers ModelInfo (LOADING, with their progress) and health checks (NOT_SERVING), and requests
    # wait. Not so when another pool of the server still serves (a redeploy with other settings: the
    # old replicas keep the traffic until the new ones can serve), nor with True: up only once the
    # experts are loaded (a RayService upgrade then moves traffic only to a cluster that serves).
    ready_when_loaded: bool = False
    # What /v1/models and ModelInfo call the model ("" → the checkpoint directory's name); requests
    # naming another model get 404. Never the path: clients learn nothing of the server's files.
    served_model_name: str = ""
    # YAML of tenants (keys, admin role, quotas, weights; cluster/tenants.py), read by every replica
    # (the path must exist on its node: a mounted Secret in Kubernetes) and reloaded when it changes.
    tenants_file: str = ""
    # Bound on ScaleExperts' `actors` (0 → the model's experts per layer × expert_replicas, and at
    # least expert_actors and the autoscaling maximum: more actors than that would hold nothing).
    max_expert_actors: int = 0
    # The largest gRPC message Serve's proxy accepts (RESOURCE_EXHAUSTED beyond it, before parsing).
    max_message_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", self.app_name):
            raise ValueError(f"app_name must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or "
                             f"digit (got {self.app_name!r})")
        if self.http_route_prefix().strip("/").split("/")[0] in ("v1", "health"):
            raise ValueError(f"route prefix {self.http_route_prefix()!r} would hide the default application's "
                             f"/v1 and /health routes: choose another app_name or route_prefix")
        if self.route_prefix and not re.fullmatch(r"/([A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*)?", self.route_prefix):
            raise ValueError(f"route_prefix must be '/' or a path such as /models/a, without a trailing / "
                             f"(got {self.route_prefix!r})")
        for name in ("expert_actors", "max_batch_tokens", "max_running", "kv_cache_tokens", "max_queue"):
            zero_allowed = name in ("expert_actors", "max_batch_tokens")  # none / auto
            if getattr(self, name) < (0 if zero_allowed else 1):
                raise ValueError(f"{name} must be {'>= 0' if zero_allowed else 'positive'} (got {getattr(self, name)})")
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1 (got {self.replicas})")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} (got {self.dtype!r})")
        if self.expert_device not in EXPERT_DEVICES:
            raise ValueError(f"expert_device must be one of {', '.join(EXPERT_DEVICES)} (got {self.expert_device!r})")
        object.__setattr__(self, "quantization", check_quantization(self.quantization))  # "none" / "" → None
        if self.expert_transport not in TRANSPORTS:
            raise ValueError(f"expert_transport must be one of {', '.join(TRANSPORTS)} (got {self.expert_transport!r})")
        if self.expert_autoscale_max:
            if not 1 <= self.expert_autoscale_min <= self.expert_actors <= self.expert_autoscale_max:
                raise ValueError(f"expert autoscaling needs 1 <= MIN <= expert_actors <= MAX (got "
                                 f"{self.expert_autoscale_min} <= {self.expert_actors} <= {self.expert_autoscale_max})")
            if not 0 < self.expert_target_busy <= 1:
                raise ValueError(f"expert_target_busy must be in (0, 1] (got {self.expert_target_busy})")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("upscale_delay_s and downscale_delay_s must be >= 0")
        if self.expert_slots < 0 or self.rebalance_every_s < 0:
            raise ValueError("expert_slots and rebalance_every_s must be >= 0")
        if self.stream_messages_per_s < 0:
            raise ValueError(f"stream_messages_per_s must be >= 0 (got {self.stream_messages_per_s})")
        if not 0 <= self.stream_interval_ms <= 10_000:
            raise ValueError(f"stream_interval_ms must be between 0 and 10000 (got {self.stream_interval_ms})")
        if not 1 << 16 <= self.max_message_bytes < 1 << 31:
            raise ValueError(f"max_message_bytes must be between 64 KiB and 2 GiB (got {self.max_message_bytes})")
        if self.served_model_name != self.served_model_name.strip() or len(self.served_model_name) > 256:
            raise ValueError(f"served_model_name must be at most 256 characters without surrounding spaces "
                             f"(got {self.served_model_name!r})")
        if self.max_expert_actors < 0:
            raise ValueError(f"max_expert_actors must be >= 0 (got {self.max_expert_actors})")
        self.request_limits()  # validates the limits
        if self.guided_max_spec_bytes < 1 or self.guided_compile_timeout_s <= 0 or self.guided_cache_size < 1:
            raise ValueError("guided_max_spec_bytes, guided_compile_timeout_s and guided_cache_size must be positive")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ServeSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def http_route_prefix(self) -> str:
        """Where the application's HTTP routes live: /v1/... under it."""
        return self.route_prefix or ("/" if self.app_name == APP_NAME else f"/{self.app_name}")

    def local_ray_cpus(self) -> int:
        """Logical CPUs for a local Ray instance: the host's cores, or enough to place every replica
        and expert actor plus one for the driver (logical shares; threads are set per process)."""
        needed = self.replicas * self.replica_num_cpus + self.expert_actors * self.expert_num_cpus
        return max(os.cpu_count() or 1, math.ceil(needed) + 1)

    def guided_limits(self):
        from raymoe.model.guided import GuidedLimits  # here: model.guided imports torch

        return GuidedLimits(max_spec_bytes=self.guided_max_spec_bytes,
                            compile_timeout_s=self.guided_compile_timeout_s, cache_size=self.guided_cache_size)

    def request_limits(self):
        from .requests import RequestLimits  # here: it imports torch, and settings load at CLI start-up

        return RequestLimits(max_prompt_tokens=self.max_prompt_tokens, max_tokens=self.max_tokens_limit,
                             max_stop_strings=self.max_stop_strings, max_stop_chars=self.max_stop_chars,
                             max_stop_token_ids=self.max_stop_token_ids, max_logprobs=self.max_logprobs)

    def effective_max_batch_tokens(self, front_device: str) -> int:
        """`max_batch_tokens`, or by default 2048 on a GPU front and 512 on a CPU one."""
        return self.max_batch_tokens or (2048 if front_device == "cuda" else 512)

    def effective_micro_batches(self, expert_device: str | None) -> int:
        """`micro_batches`, or by default 2 when the experts run on GPUs of their own (the front's
        attention of one half then overlaps the other half's experts) and 1 otherwise: on CPUs the
        front and the actors share the cores, and a second micro-batch only streams every expert's
        weights twice per step (measured: +0.8 ms CPU per token at 32 streams, bench/bench_serving.py)."""
        return self.micro_batches or (2 if expert_device == "cuda" else 1)

    def pool_config(self, dtype: str, quantization: str | None = None):
        """The expert pool these settings ask for, in `dtype` (the resolved one; None: experts inside
        each front replica), quantized as asked here or by the checkpoint (`quantization`)."""
        if not self.expert_actors:
            return None
        from raymoe.actors.pool import PoolConfig  # here: it imports Ray (settings load at CLI start-up)

        return PoolConfig(num_actors=self.expert_actors, replicas=self.expert_replicas, num_cpus=self.expert_num_cpus,
                          resources=dict(self.expert_resources), dtype=dtype,
                          quantization=self.quantization or quantization,
                          device=self.expert_device, num_gpus=self.expert_num_gpus, transport=self.expert_transport,
                          call_timeout_s=self.expert_timeout_s, expert_slots=self.expert_slots or None,
                          rebalance_every_s=self.rebalance_every_s, autoscale_min=self.expert_autoscale_min,
                          autoscale_max=self.expert_autoscale_max, target_busy=self.expert_target_busy,
                          upscale_delay_s=self.upscale_delay_s, downscale_delay_s=self.downscale_delay_s)

    def routes_by_prefix(self) -> bool:
        """Whether requests go through the prefix-aware router (cluster/prefix_router.py): with the
        prefix cache and more than one front replica possible."""
        return self.prefix_cache and self.prefix_routing and max(self.replicas, self.autoscale_max_replicas) > 1

    def deployment_options(self) -> dict[str, Any]:
        """Options of the front deployment (`Deployment.options`, and `deployments:` in a Serve config)."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.replica_num_cpus,
                                  **({"num_gpus": self.replica_num_gpus} if self.replica_num_gpus else {}),
                                  **({"resources": dict(self.replica_resources)} if self.replica_resources else {})},
            # Room above our own bounded queue, so a full queue answers RESOURCE_EXHAUSTED at once
            # (from the replica, with our message) instead of waiting in Serve's queue.
            "max_ongoing_requests": self.max_running + self.max_queue + 16,
            # Serve's own queue also holds a burst while its router assigns replicas, so it must take a
            # whole batch's worth; our queue (QueueFull) is the bound clients normally meet.
            "max_queued_requests": self.max_running + self.max_queue,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_s,
            "graceful_shutdown_wait_loop_s": min(1.0, self.graceful_shutdown_s),
        }
        if self.prefix_cache:  # replicas report what they cache every second (router, raymoe status)
            from .prefix_router import ROUTER_CLASS, ROUTING_STATS_PERIOD_S

            router: dict[str, Any] = {"request_routing_stats_period_s": ROUTING_STATS_PERIOD_S}
            if self.routes_by_prefix():
                router["request_router_class"] = ROUTER_CLASS
                # a request holds a door slot and, while it runs, an engine slot (maybe on another replica)
                opts["max_ongoing_requests"] += self.max_running + self.max_queue
            opts["request_router_config"] = router
        if self.autoscale_max_replicas > self.replicas:
            opts["autoscaling_config"] = {"min_replicas": self.replicas, "max_replicas": self.autoscale_max_replicas,
                                          "target_ongoing_requests": self.target_ongoing_requests,
                                          "upscale_delay_s": self.upscale_delay_s,
                                          "downscale_delay_s": self.downscale_delay_s}
        else:
            opts["num_replicas"] = self.replicas
        return opts

    def proxy_env(self) -> dict[str, str]:
        """Environment of Serve's controller, which its proxies inherit: Serve's proxy reads its
        gRPC message bound from RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (ray.serve._private.constants),
        applied as grpc.max_receive_message_length (the proxy answers RESOURCE_EXHAUSTED beyond it)."""
        return {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(self.max_message_bytes)}

    def serve_config(self) -> dict[str, Any]:
        """A Serve config (the `serveConfigV2` of a RayService) deploying exactly this."""
        return {
            "controller_options": {"runtime_env": {"env_vars": self.proxy_env()}},
            "grpc_options": {"port": self.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS,
                             "request_timeout_s": self.request_timeout_s},
            "http_options": {"host": self.http_host, "port": self.http_port,
                             "request_timeout_s": self.request_timeout_s},
            "applications": [{
                "name": self.app_name,
                "route_prefix": self.http_route_prefix(),
                "import_path": "raymoe.cluster.app:build_app",
                "args": self.to_dict(),
                "deployments": [{"name": DEPLOYMENT_NAME, **self.deployment_options()}],
            }],
        }
