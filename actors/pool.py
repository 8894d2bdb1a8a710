"""ExpertPool: starts the expert actors of a placement on a Ray cluster and holds their handles.

One placement-group bundle per actor reserves its share (num_gpus=1 when the cluster has GPUs,
else a real num_cpus share plus any custom resources such as {"expert_host": 1}); the group's
strategy spreads the actors over nodes, and `pin_nodes` additionally pins each bundle to the node
chosen by actors.placement.assign_nodes (so replicas of an expert never share a node). Actors
restart without limit and their calls are retried (forward is idempotent); every wait here and in
RemoteExperts has a timeout, after which `ExpertsUnavailable` names the experts that are missing.

A pool pickles (handles, placement, config), so other processes such as Serve replicas can build
RemoteExperts on it; only its creator should call `shutdown()`. Without a `name`, actors live as
long as the process that created the pool. With a `name` (the shared pool of a server), the
placement group and the actors are detached and named after it, so they outlive their creator;
a new ExpertPool with the same name and config attaches to them instead of loading new ones.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymoe.model.config import ModelConfig
from raymoe.model.errors import BackendUnavailable

from . import EXPERT_DEVICES
from .expert_actor import ExpertActor
from .placement import Placement, assign_nodes, plan_placement
from .plan import Plan, from_placement, widen


class ExpertsUnavailable(BackendUnavailable):
    """Some experts could not be reached in time (actor dead, restarting with nowhere to go, hung)."""

    def __init__(self, layer: int | None, experts: Sequence[int], reason: str) -> None:
        self.layer, self.experts, self.reason = layer, sorted(set(experts)), reason
        where = "" if layer is None else f"layer {layer}: "
        super().__init__(f"{where}experts {self.experts} unavailable: {reason}")

    def __reduce__(self):  # across Ray (a remote error's cause) it is rebuilt from its parts
        return type(self), (self.layer, self.experts, self.reason)


def remote_cause(error: BaseException) -> BaseException:
    """The exception a remote call raised, out of Ray's wrapper (RayTaskError.cause), or `error`."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def brief(error: BaseException) -> str:
    """A Ray error's first and last lines: what happened, without the remote traceback between."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return " … ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(error).__name__


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
SUSPECT_CHECK_S = 0.2  # how often an actor suspected dead is asked whether it is back


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


@dataclasses.dataclass(frozen=True)
class LayerRoute:
    """How one layer's experts map to actor handles: owner[e, r] = r-th actor (pool index) of expert e."""

    owner: torch.Tensor  # [E, Rmax] long
    num_owners: torch.Tensor  # [E] long
    replicated: bool
    # actors whose every expert here has another copy: a failed call to one goes to those copies
    spare: frozenset = frozenset()
    owner_lists: tuple = ()  # owner and num_owners as Python lists (split_by_load reads them per call)
    num_owner_list: tuple = ()


def layer_route(plan: Plan | Placement, layer: int, down: frozenset = frozenset(),
                failed: frozenset = frozenset()) -> LayerRoute:
    """The route of `layer`; actors in `down` (suspected dead) are left out wherever their experts
    have another copy (an expert with no other copy keeps them: its calls wait for the restart),
    and actors in `failed` (that just failed this very call) before any other suspect."""
    owners = [[a for a in o if a not in down] or [a for a in o if a not in failed] or list(o)
              for o in plan.owners(layer)]
    missing = [e for e, o in enumerate(owners) if not o]
    if missing:
        raise ValueError(f"layer {layer}: experts {missing} have no actor")
    rmax = max(len(o) for o in owners)
    hosted: dict[int, list[int]] = collections.defaultdict(list)
    for e, o in enumerate(owners):
        for a in o:
            hosted[a].append(e)
    spare = frozenset(a for a, experts in hosted.items() if all(len(owners[e]) > 1 for e in experts))
    # explicit device: the model may be built under torch.device("meta")
    rows = [list(o) + [o[0]] * (rmax - len(o)) for o in owners]
    counts = [len(o) for o in owners]
    table = torch.tensor(rows, dtype=torch.long, device="cpu")
    return LayerRoute(table, torch.tensor(counts, device="cpu"), rmax > 1, spare, tuple(rows), tuple(counts))


def pool_key(checkpoint: str, config: PoolConfig) -> str:
    """What makes two pools interchangeable: the checkpoint and everything that shapes the actors
    (not the timeouts or the transport, which any user of the pool may choose for itself)."""
    import hashlib
    import json

    shape = {k: v for k, v in dataclasses.asdict(config).items()
             if not k.endswith("timeout_s") and k not in LIVE_SETTINGS}
    return hashlib.sha1(json.dumps([checkpoint, shape], sort_keys=True, default=str).encode()).hexdigest()[:10]


def named_pools(prefix: str) -> set[str]:
    """Names (starting with `prefix`) of the named pools alive in the cluster: their actors are named
    `…/NAME` and their placement group `NAME/pg`."""
    from ray.util import list_named_actors, placement_group_table

    names = {a["name"].rsplit("/", 1)[1] for a in list_named_actors(all_namespaces=True) if "/" in a["name"]}
    names |= {pg["name"][:-3] for pg in placement_group_table().values()
              if pg.get("name", "").endswith("/pg") and pg.get("state") != "REMOVED"}
    return {n for n in names if n.startswith(prefix)}


def remove_named_pool(name: str) -> None:
    """Kill every actor of the named pool and remove its placement group (its GPUs and CPUs)."""
    from ray.util import get_placement_group, list_named_actors

    from .expert_actor import forget_assignment
    from .live import forget

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
        self.placement: Placement = plan_placement(
            cfg.num_local_experts, cfg.num_hidden_layers, config.num_actors, config.replicas,
            config.experts_per_actor, config.layer_groups)
        n = len(self.placement.actors)
        self.bundle = self._bundle(n)
        self.device = "cuda" if self.bundle.get("GPU") else "cpu"
        self.nodes: tuple[str, ...] | None = None
        self.name = name
        self.metrics = DispatchMetrics()
        self.actors: list[Any] = []  # by actor id (Plan's); None where an actor was retired
        self.names: dict[int, str] = {}  # actor id → Ray actor name
        self.namespace = ray.get_runtime_context().namespace
        self.bundles: dict[int, int | None] = {}  # actor id → its bundle in `pg` (None: placed on its own)
        self.history: list[dict[str, Any]] = []  # the placement changes so far (see actors/live.py)
        self.load_seen: dict[int, list[list[int]]] = {}  # actor id → its pair counts at the last rebalance
        self._inflight: collections.Counter = collections.Counter()  # plan version → layer calls in flight
        self._lock = threading.Lock()
        self._creator = True  # copies (unpickled) follow the creator's plan instead
        self._down: frozenset = frozenset()  # actors suspected dead (see suspect)
        self._checker: threading.Thread | None = None
        self._set_plan(from_placement(self.placement))
        if config.expert_slots is not None:
            self._set_plan(widen(self.plan, config.expert_slots))
        self.pg = None
        self._transport = None
        self._follower = None  # a copy's thread following the creator's plan (actors/live.py)
        if name is not None and self._attach(name):
            return
        selectors = None
        if config.pin_nodes:
            self.nodes = assign_nodes(self.placement, self._eligible_nodes())
            selectors = [{"ray.io/node-id": node} for node in self.nodes]
        detached = {} if name is None else {"name": f"{name}/pg", "lifetime": "detached"}
        self.pg = placement_group([dict(self.bundle) for _ in range(n)], strategy=config.strategy,
                                  bundle_label_selector=selectors, **detached)
        every = list(range(cfg.num_local_experts))
        try:
            ray.get(self.pg.ready(), timeout=config.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            total = ray.cluster_resources()
            why = " — the cluster has no GPUs (expert device gpu)" if self.bundle.get("GPU") and \
                not total.get("GPU") else ""
            raise ExpertsUnavailable(None, every, f"could not reserve {n} × {self.bundle} for the expert actors "
                                     f"within {config.start_timeout_s:g} s{why} (cluster has {total})") from None
        try:
            self._start_actors(name)
        except Exception as e:  # noqa: BLE001 — nothing half-made is left behind
            self.shutdown()
            raise ExpertsUnavailable(None, every, f"expert actors could not be created: {brief(e)}") from None
        if not wait:
            return
        try:
            self.wait_loaded(on_progress)
        except BaseException:
            self.shutdown()
            raise

    def _start_actors(self, name: str | None) -> None:
        tag = uuid.uuid4().hex[:6]
        for spec in self.placement.actors:
            actor_name = f"{spec.name}#{spec.index}.{tag}" if name is None else self._actor_name(name, spec.index)
            self.actors.append(self.start_actor(spec.index, actor_name, {layer: spec.experts for layer in spec.layers},
                                                bundle=spec.index))

    def start_actor(self, actor_id: int, actor_name: str, assignment: dict[int, Sequence[int]],
                    bundle: int | None = None, node: str = "") -> Any:
        """Create one expert actor holding `assignment` {layer: experts}: in bundle `bundle` of the
        pool's placement group, or on its own with the same resources (on `node` if given, else
        spread), detached when the pool is named."""
        config = self.config
        threads = config.num_threads or max(1, int(self.bundle.get("CPU", 1)))
        # progress, stats, pings and endpoints answer while a layer call waits for a reload
        remote_class = ray.remote(concurrency_groups={"control": 2})(ExpertActor)
        if bundle is not None:
            strategy: Any = PlacementGroupSchedulingStrategy(self.pg, bundle)
        elif node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            strategy = NodeAffinitySchedulingStrategy(node, soft=True)
        else:
            strategy = "SPREAD"
        options = dict(name=actor_name, namespace=self.namespace, num_cpus=self.bundle.get("CPU", 0),
                       **({} if self.name is None else {"lifetime": "detached"}),
                       num_gpus=self.bundle.get("GPU", 0),
                       resources={k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")},
                       max_restarts=-1, max_task_retries=-1, scheduling_strategy=strategy)
        layers = sorted(assignment)
        handle = remote_class.options(**options).remote(
            self.checkpoint, [], layers, dtype=config.dtype, device=self.device, num_threads=threads,
            name=actor_name.split("#")[0], assignment={int(k): list(v) for k, v in assignment.items()},
            quantization=config.quantization)
        self.names[actor_id] = actor_name
        self.bundles[actor_id] = bundle
        return handle

    def failed(self) -> bool:
        """Whether an actor failed to load its experts (the pool is then of no use)."""
        try:
            snaps = ray.get([a.progress.remote() for a in self.live_actors()], timeout=5.0)
        except ray.exceptions.RayError:
            return False  # restarting or unreachable is for the callers' timeouts, not a load failure
        return any(s["state"] == "FAILED" for s in snaps)

    def wait_loaded(self, on_progress: Callable[[list[dict]], None] | None = None, every_s: float = 1.0) -> None:
        """Wait until every actor has loaded its experts, calling on_progress(snapshots) about every
        `every_s`. The wait is bounded by progress, not by the size: ExpertsUnavailable when an
        actor failed to load or nothing was read for start_timeout_s (a 90 GB Mixtral takes minutes)."""
        every, limit = list(range(self.model_config.num_local_experts)), self.config.start_timeout_s
        last_read, last_change = -1, time.monotonic()
        while True:
            try:
                snaps = ray.get([a.progress.remote() for a in self.live_actors()], timeout=limit)
            except ray.exceptions.GetTimeoutError:
                raise ExpertsUnavailable(None, every, f"expert actors did not start within {limit:g} s") from None
            except ray.exceptions.RayError as e:
                raise ExpertsUnavailable(None, every, f"expert actors failed to start: {brief(e)}") from None
            if on_progress is not None:
                on_progress(snaps)
            failed = [s for s in snaps if s["state"] == "FAILED"]
            if failed:
                raise ExpertsUnavailable(None, every, f"{failed[0]['what']} could not load its experts: "
                                         f"{failed[0]['error']}")
            if all(s["state"] == "READY" for s in snaps):
                return
            read = sum(s["bytes_read"] for s in snaps)
            if read > last_read:
                last_read, last_change = read, time.monotonic()
            elif time.monotonic() - last_change > limit:
                raise ExpertsUnavailable(None, every, f"loading made no progress for {limit:g} s")
            time.sleep(every_s)

    # --- a named pool: find what an earlier creator started -----------------------------------

    def _actor_name(self, name: str, index: int) -> str:
        return f"{self.placement.actors[index].name}#{index}/{name}"

    def _attach(self, name: str) -> bool:
        """Use the named placement group and actors if they all exist (a restarted pool host)."""
        from ray.util import get_placement_group

        from .live import published

        try:
            pg = get_placement_group(f"{name}/pg")
            state = published(name)
            if state is None:  # never changed: the startup placement
                self.names = {a.index: self._actor_name(name, a.index) for a in self.placement.actors}
                self.bundles = {a.index: a.index for a in self.placement.actors}
            else:
                plan, self.names, self.bundles, self.history = state
                self._set_plan(plan)
            actors: list[Any] = [None] * (max(self.names) + 1)
            for actor_id, actor_name in self.names.items():
                actors[actor_id] = ray.get_actor(actor_name, namespace=self.namespace)
        except ValueError:  # some part is missing: clean up what is left and start afresh
            remove_named_pool(name)
            return False
        self.pg, self.actors = pg, actors
        return True

    # --- resources ---------------------------------------------------------------------------

    def _bundle(self, num_actors: int) -> dict[str, float]:
        c, total = self.config, ray.cluster_resources()
        if c.device not in EXPERT_DEVICES:
            raise ValueError(f"expert device must be auto, cpu or gpu (got {c.device!r})")
        use_gpu = c.device == "gpu" or (c.device == "auto" and total.get("GPU", 0) >= 1)
        extra = {k: float(v) for k, v in c.resources.items()}
        if use_gpu:
            return {"GPU": float(c.num_gpus), "CPU": c.num_cpus if c.num_cpus is not None else 1.0, **extra}
        cpus = c.num_cpus
        if cpus is None:  # leave one core to the driver (attention, routing), share what is free
            cpus = max(0.25, (ray.available_resources().get("CPU", 1) - 1) / num_actors)
        return {"CPU": float(cpus), **extra}

    def _eligible_nodes(self) -> list[str]:
        nodes = [n for n in ray.nodes() if n.get("Alive")
                 and all(n["Resources"].get(k, 0) >= v for k, v in self.bundle.items())]
        if not nodes:
            raise ExpertsUnavailable(None, range(self.model_config.num_local_experts),
                                     f"no alive node offers {self.bundle} for an expert actor")
        return sorted(n["NodeID"] for n in nodes)

    # --- calls -------------------------------------------------------------------------------

    def transport(self):
        """This process's way of calling the actors (config.transport), made on first use; a copy
        of a named pool then starts following its creator's placement changes (actors/live.py)."""
        if self._transport is None:
            from .live import Follower
            from .transport import make_transport

            if self.name is not None and self._follower is None and not self._creator:
                self._follower = Follower(self)
            self._transport = make_transport(self.config.transport, self)
        return self._transport

    def __getstate__(self) -> dict[str, Any]:  # a copy for another process: no sockets, no threads
        return {**self.__dict__, "_transport": None, "_follower": None, "_creator": False,
                "_inflight": collections.Counter(), "_lock": None, "_down": frozenset(), "_checker": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --- the live plan (changed by actors/live.py) ----------------------------------------------

    def _set_plan(self, plan: Plan) -> None:
        """Install `plan`: every layer call dispatched from now on routes by it (one assignment, so
        a call sees the old plan or the new one whole)."""
        self._live = (plan, {})  # the plan and its routes, cached by (layer, suspects, failed)

    @property
    def plan(self) -> Plan:
        return self._live[0]

    def begin_call(self, layer: int, failed: frozenset = frozenset()) -> tuple[int, LayerRoute]:
        """The plan version and route a layer call uses (`failed`: actors that just failed it, for
        its resend); end_call(version) once it has returned."""
        plan, routes = self._live
        route = self._route(plan, routes, layer, failed)
        with self._lock:
            self._inflight[plan.version] += 1
        return plan.version, route

    def _route(self, plan: Plan, routes: dict, layer: int, failed: frozenset) -> LayerRoute:
        key = (layer, self._down, failed)
        if key not in routes:
            routes[key] = layer_route(plan, layer, key[1], failed)
        return routes[key]

    def end_call(self, version: int) -> None:
        with self._lock:
            self._inflight[version] -= 1
            if not self._inflight[version]:
                del self._inflight[version]

    # --- failover: a dead copy's pairs go to a live copy at once ---------------------------------

    def suspect(self, actor: int) -> None:
        """Route nothing to `actor` where its experts have other copies, until it answers as loaded
        again (a restarted process reloads its experts first), checked on a background thread."""
        from .metrics import count_failover

        with self._lock:
            if actor in self._down:
                return
            self._down = self._down | {actor}
            self.metrics.failovers += 1
            if self._checker is None:
                self._checker = threading.Thread(target=self._check_suspects, name="raymoe-failover", daemon=True)
                self._checker.start()
        count_failover(self.actor_name(actor))

    def _check_suspects(self) -> None:
        while True:
            with self._lock:
                if not self._down:
                    self._checker = None
                    return
            for actor in list(self._down):
                handle = self.actors[actor] if actor < len(self.actors) else None
                try:
                    back = handle is not None and ray.get(handle.progress.remote(), timeout=1.0)["state"] == "READY"
                except Exception:  # noqa: BLE001 — still dead, or restarting
                    back = False
                if back or handle is None:
                    with self._lock:
                        self._down = self._down - {actor}
            time.sleep(SUSPECT_CHECK_S)

    def oldest_in_use(self) -> int:
        """The oldest plan version a call still in flight here uses (or the current one)."""
        with self._lock:
            return min([v for v, n in self._inflight.items() if n > 0] + [self.plan.version])

    def bundles_free(self) -> list[int]:
        """Bundles of the placement group that no live actor uses (a retired actor's)."""
        if self.pg is None:
            return []
        used = {b for i, b in self.bundles.items() if b is not None and i < len(self.actors) and self.actors[i]}
        return [b for b in range(len(self.placement.actors)) if b not in used]

    def retire_actor(self, actor_id: int) -> None:
        """Kill an actor the plan no longer has; its bundle (if any) is free for the next one."""
        handle = self.actors[actor_id]
        if handle is None:
            return
        from .expert_actor import forget_assignment

        try:
            forget_assignment(handle)
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 — already gone
            pass
        self.actors[actor_id] = None

    def live_actors(self) -> list[Any]:
        return [a for a in self.actors if a is not None]

    def actor_name(self, actor: int) -> str:
        """What the actor is called in errors, stats and the dashboard, e.g. 'experts[0-1]@layers[0-31]'
        (as it started) or 'actor5' (started by a placement change)."""
        return self.names.get(actor, f"actor{actor}").split("#")[0]

    # --- lookups -----------------------------------------------------------------------------

    def route(self, layer: int) -> LayerRoute:
        return self._route(*self._live, layer, frozenset())

    def actor_id(self, actor: int) -> str | None:
        """Ray's hex id of the actor at pool index `actor` (errors carry it)."""
        try:
            return self.actors[actor]._actor_id.hex()
        except (AttributeError, IndexError):
            return None

    def hosted(self, actor: int, layer: int) -> tuple[int, ...]:
        try:
            return self.plan.actor(actor).experts[layer]
        except KeyError:
            return ()

    def stats(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return ray.get([a.stats.remote() for a in self.live_actors()], timeout=timeout_s or self.config.call_timeout_s)

    def describe(self) -> str:
        return ", ".join(self.actor_name(a.id) for a in self.plan.actors)

    # --- lifetime ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._follower is not None:
            self._follower.stop()
        for a in self.live_actors():
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None

    def __enter__(self) -> "ExpertPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

