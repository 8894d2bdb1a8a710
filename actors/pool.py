"""ExpertPool: the expert actors of a plan on a Ray cluster, as one object the model's experts call.

It composes three parts, one concern each:
- actors/actor_group.py  `group`: the actors' lifecycle and the placement group reserving them;
- actors/live_plan.py    `live`: the plan layer calls route by, its version and the calls in flight
                         under each, and (in a copy of a named pool) the thread following the creator;
- actors/failover.py     `failover`: actors suspected dead, routed around while they have copies.
Placement changes (actors/live.py) work on those parts through their methods; RemoteExperts uses
the methods here, and the transports (actors/transport.py) the group's actor handles. Every wait has a timeout, after which `ExpertsUnavailable`
(actors/errors.py) names the experts that are missing.

A pool pickles (handles, plan, config), so other processes such as Serve replicas can build
RemoteExperts on it; only its creator should call `shutdown()`. Without a `name`, actors live as
long as the process that created the pool. With a `name` (the shared pool of a server), the
placement group and the actors are detached and named after it, so they outlive their creator;
a new ExpertPool with the same name and config attaches to them instead of loading new ones.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import ray
from ray.util import get_placement_group, list_named_actors, placement_group_table
from ray.util.placement_group import remove_placement_group

from raymoe.model.config import ModelConfig

from .actor_group import ActorGroup, actor_resources
from .expert_actor import forget_assignment
from .failover import Failover
from .live_plan import Follower, LayerRoute, LivePlan, forget, published
from .placement import plan_placement
from .plan import Plan, widen
from .transport import make_transport


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    num_actors: int | None = 2  # per layer group; None → derived from experts_per_actor
    replicas: int = 1
    experts_per_actor: int | None = None
    expert_slots: int | None = None  # experts an actor may hold per layer (> its share: room for hot copies)
    layer_groups: int = 1  # >1: each contiguous group of layers gets its own actors
    num_cpus: float | None = None  # per actor on CPU; None → the cluster's CPUs minus one, shared
    num_threads: int | None = None  # torch threads per actor; None → max(1, int(num_cpus))
    device: str = "auto"  # auto: one GPU per actor when the cluster has GPUs at start, else CPU | cpu | gpu
    num_gpus: float = 1.0  # per actor on GPU (a fraction shares a GPU, e.g. with the front on a 1-GPU host)
    resources: Mapping[str, float] = dataclasses.field(default_factory=dict)  # extra, per actor
    strategy: str = "SPREAD"  # placement group strategy: SPREAD | STRICT_SPREAD | PACK | STRICT_PACK
    pin_nodes: bool = False  # pin bundles to the nodes assign_nodes picks
    dtype: str = "float32"
    quantization: str | None = None  # "experts_int8": the actors hold their experts as int8 (model/quant.py)
    transport: str = "direct"  # how layer calls travel: "direct" (sockets) or "ray" (object store); see transport.py
    call_timeout_s: float = 60.0  # longest wait for one layer's experts (covers an actor restart)
    rebalance_every_s: float = 0.0  # >0: the pool host applies the planner's placement this often
    autoscale_min: int = 0  # autoscale_max > 0: the pool host scales the actors between these (actors/autoscale.py)
    autoscale_max: int = 0
    target_busy: float = 0.5
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    start_timeout_s: float = 120.0  # longest wait for the reservation and the actors' weights


# How the pool host changes a pool while it runs: not part of what makes two pools interchangeable.
LIVE_SETTINGS = ("transport", "rebalance_every_s", "autoscale_min", "autoscale_max", "target_busy",
                 "upscale_delay_s", "downscale_delay_s")
SAMPLES = 8192  # per DispatchMetrics series


@dataclasses.dataclass
class DispatchMetrics:
    """Front-side counters for benchmarks: per-layer timings (µs) and bytes over the wire."""

    # The latest samples only: a serving replica records three per layer call for as long as it runs.
    dispatch_us: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=SAMPLES))
    wait_us: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=SAMPLES))
    combine_us: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=SAMPLES))
    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0  # actor calls
    layer_calls: int = 0  # dispatches (one per MoE layer and micro-batch)
    # Totals over every layer call: dispatch to combined output, and the slowest actor's own
    # compute in it (what no transport can remove; the difference is transport and front work).
    layer_wall_s: float = 0.0
    slowest_compute_s: float = 0.0
    failovers: int = 0  # actors whose calls went to other copies after they failed

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def pool_key(checkpoint: str, config: PoolConfig) -> str:
    """What makes two pools interchangeable: the checkpoint and everything that shapes the actors
    (not the timeouts or the transport, which any user of the pool may choose for itself)."""
    shape = {k: v for k, v in dataclasses.asdict(config).items()
             if not k.endswith("timeout_s") and k not in LIVE_SETTINGS}
    return hashlib.sha1(json.dumps([checkpoint, shape], sort_keys=True, default=str).encode()).hexdigest()[:10]


def named_pools(prefix: str) -> set[str]:
    """Names (starting with `prefix`) of the named pools alive in the cluster: their actors are named
    `…/NAME` and their placement group `NAME/pg`."""
    names = {a["name"].rsplit("/", 1)[1] for a in list_named_actors(all_namespaces=True) if "/" in a["name"]}
    names |= {pg["name"][:-3] for pg in placement_group_table().values()
              if pg.get("name", "").endswith("/pg") and pg.get("state") != "REMOVED"}
    return {n for n in names if n.startswith(prefix)}


def remove_named_pool(name: str) -> None:
    """Kill every actor of the named pool, remove its placement group (its GPUs and CPUs) and what
    it published."""
    for a in list_named_actors(all_namespaces=True):
        if a["name"].endswith("/" + name):
            try:
                handle = ray.get_actor(a["name"], namespace=a["namespace"])
                forget_assignment(handle)
                ray.kill(handle, no_restart=True)
            except ValueError:  # gone meanwhile
                pass
    try:
        remove_placement_group(get_placement_group(f"{name}/pg"))
    except ValueError:
        pass
    forget(name)


class ExpertPool:
    """The expert actors of one model checkpoint, laid out by PoolConfig: what RemoteExperts calls."""

    def __init__(self, checkpoint: str | Path, config: PoolConfig | None = None, name: str | None = None,
                 on_progress: Callable[[list[dict]], None] | None = None, wait: bool = True) -> None:
        """on_progress(snapshots) is called about every second while the actors load their experts
        (each snapshot: what, state, bytes_read, total_bytes, seconds; see model/progress.py).
        wait=False returns once the actors exist; the caller then does other loading and calls
        wait_loaded() itself."""
        if not ray.is_initialized():
            raise RuntimeError("ExpertPool needs a Ray connection: call ray.init() first")
        self.config = config = config or PoolConfig()
        self.checkpoint = str(Path(checkpoint).resolve())
        self.model_config = cfg = ModelConfig.from_file(Path(self.checkpoint) / "config.json")
        startup = plan_placement(cfg.num_local_experts, cfg.num_hidden_layers, config.num_actors, config.replicas,
                                 config.experts_per_actor, config.layer_groups)
        self.name = name
        self.metrics = DispatchMetrics()
        bundle = actor_resources(config.device, config.num_gpus, config.num_cpus, config.resources,
                                 len(startup.actors))
        self.group = ActorGroup(self.checkpoint, bundle, config.dtype, config.num_threads, name,
                                config.quantization)
        self.live = LivePlan(startup if config.expert_slots is None else widen(startup, config.expert_slots))
        self.failover = Failover(self.group, self.metrics)
        self._creator = True  # copies (unpickled) follow the creator's plan instead
        self._transport = None
        self._follower: Follower | None = None  # a copy's thread following the creator's plan
        if name is not None and self._attach(name, startup):
            return
        self.group.reserve(startup, config.strategy, config.pin_nodes, config.start_timeout_s)
        self.group.start(startup)
        if not wait:
            return
        try:
            self.wait_loaded(on_progress)
        except BaseException:
            self.shutdown()
            raise

    def _attach(self, name: str, startup: Plan) -> bool:
        """Use the named pool's placement group, actors and published plan if they all exist (a
        restarted pool host); else clean up what is left of it and start afresh."""
        state = published(name)
        if not self.group.attach(startup, *(state[1:3] if state is not None else (None, None))):
            remove_named_pool(name)
            return False
        if state is not None:
            self.live.install(state[0], state[3])
        return True

    def __getstate__(self) -> dict[str, Any]:  # a copy for another process: no sockets, no threads
        return {**self.__dict__, "group": copy.copy(self.group), "live": copy.copy(self.live), "failover": None,
                "_transport": None, "_follower": None, "_creator": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.failover = Failover(self.group, self.metrics)

    # --- what RemoteExperts uses ---------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        return self.live.plan

    @property
    def actors(self) -> list[Any]:
        """Actor handles by actor id (None where one was retired)."""
        return self.group.actors

    @property
    def device(self) -> str:
        return self.group.device

    def transport(self):
        """This process's way of calling the actors (config.transport), made on first use; a copy
        of a named pool then starts following its creator's placement changes (actors/live_plan.py)."""
        if self._transport is None:
            if self.name is not None and self._follower is None and not self._creator:
                self._follower = Follower(self.name, self.live, self.group)
            self._transport = make_transport(self.config.transport, self.group)
        return self._transport

    def begin_call(self, layer: int, failed: frozenset = frozenset()) -> tuple[int, LayerRoute]:
        """The plan version and route a layer call uses (`failed`: actors that just failed it, for
        its resend); end_call(version) once it has returned."""
        return self.live.begin_call(layer, self.failover.down, failed)

    def end_call(self, version: int) -> None:
        self.live.end_call(version)

    def route(self, layer: int) -> LayerRoute:
        return self.live.route(layer, self.failover.down)

    def suspect(self, actor: int) -> None:
        """A call to `actor` failed: route around it where its experts have copies (actors/failover.py)."""
        self.failover.suspect(actor)

    def hosted(self, actor: int, layer: int) -> tuple[int, ...]:
        try:
            return self.plan.actor(actor).experts[layer]
        except KeyError:
            return ()

    def actor_name(self, actor: int) -> str:
        return self.group.actor_name(actor)

    # --- lifetime ------------------------------------------------------------------------------

    def wait_loaded(self, on_progress: Callable[[list[dict]], None] | None = None, every_s: float = 1.0) -> None:
        """Wait until every actor has loaded its experts (bounded by progress, see ActorGroup.wait_loaded:
        a 90 GB Mixtral takes minutes)."""
        self.group.wait_loaded(range(self.model_config.num_local_experts), self.config.start_timeout_s,
                               on_progress, every_s)

    def failed(self) -> bool:
        """Whether an actor failed to load its experts (the pool is then of no use)."""
        return self.group.failed()

    def stats(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return self.group.stats(timeout_s or self.config.call_timeout_s)

    def shutdown(self) -> None:
        if self._follower is not None:
            self._follower.stop()
        self.group.shutdown()

    def __enter__(self) -> "ExpertPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
