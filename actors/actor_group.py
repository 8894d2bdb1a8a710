"""ActorGroup: the expert actors of one pool and the placement group that reserves their resources.

One placement-group bundle per actor of the startup plan reserves its share (num_gpus when the
cluster has GPUs, else a real num_cpus share plus any custom resources such as
{"expert_host": 1}); the group's strategy spreads the actors over nodes, and `pin_nodes`
additionally pins each bundle to the node chosen by actors.placement.assign_nodes (so replicas of
an expert never share a node). Actors restart without limit and their calls are retried (forward
is idempotent). An actor started by a placement change takes a bundle a retired actor freed, or
runs on its own with the same resources.

Without a pool name, actors live as long as the process that created them. With one, the
placement group and the actors are detached and named after it (`…/NAME`, `NAME/pg`), so they
outlive their creator and a restarted creator attaches to them (`attach`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import ray
from ray.util import get_placement_group
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from . import EXPERT_DEVICES
from .errors import ExpertsUnavailable, brief
from .expert_actor import ExpertActor, forget_assignment
from .placement import assign_nodes
from .plan import ActorSlots, Plan


def actor_resources(device: str, num_gpus: float, num_cpus: float | None, resources: Mapping[str, float],
                    num_actors: int) -> dict[str, float]:
    """One actor's bundle: on GPU (device gpu, or auto on a cluster with GPUs) num_gpus and a CPU,
    else num_cpus (None: the cluster's free CPUs minus one for the driver, shared by the actors)."""
    if device not in EXPERT_DEVICES:
        raise ValueError(f"expert device must be auto, cpu or gpu (got {device!r})")
    total = ray.cluster_resources()
    use_gpu = device == "gpu" or (device == "auto" and total.get("GPU", 0) >= 1)
    extra = {k: float(v) for k, v in resources.items()}
    if use_gpu:
        return {"GPU": float(num_gpus), "CPU": num_cpus if num_cpus is not None else 1.0, **extra}
    if num_cpus is None:  # leave one core to the driver (attention, routing), share what is free
        num_cpus = max(0.25, (ray.available_resources().get("CPU", 1) - 1) / num_actors)
    return {"CPU": float(num_cpus), **extra}


class ActorGroup:
    """Ray handles of a pool's expert actors by actor id (None where one was retired), their Ray
    names and bundles, and the placement group."""

    def __init__(self, checkpoint: str, bundle: dict[str, float], dtype: str, num_threads: int | None,
                 pool_name: str | None = None, quantization: str | None = None) -> None:
        self.checkpoint, self.bundle, self.dtype, self.pool_name = checkpoint, bundle, dtype, pool_name
        self.quantization = quantization  # "experts_int8": the actors hold their experts as int8 (model/quant.py)
        self.num_threads = num_threads or max(1, int(bundle.get("CPU", 1)))  # torch threads per actor
        self.device = "cuda" if bundle.get("GPU") else "cpu"
        self.namespace = ray.get_runtime_context().namespace
        self.actors: list[Any] = []  # by actor id (the plan's); None where an actor was retired
        self.names: dict[int, str] = {}  # actor id → Ray actor name
        self.bundles: dict[int, int | None] = {}  # actor id → its bundle in `pg` (None: placed on its own)
        self.nodes: tuple[str, ...] | None = None  # per bundle, when pinned
        self.num_bundles = 0
        self.pg = None

    # --- start ---------------------------------------------------------------------------------

    def reserve(self, plan: Plan, strategy: str, pin_nodes: bool, timeout_s: float) -> None:
        """The placement group: one bundle per actor of `plan`; ExpertsUnavailable if the cluster
        cannot give it within timeout_s."""
        n, every = len(plan.actors), range(plan.num_experts)
        selectors = None
        if pin_nodes:
            self.nodes = assign_nodes(plan, self._eligible_nodes(every))
            selectors = [{"ray.io/node-id": node} for node in self.nodes]
        detached = {} if self.pool_name is None else {"name": f"{self.pool_name}/pg", "lifetime": "detached"}
        self.pg = placement_group([dict(self.bundle) for _ in range(n)], strategy=strategy,
                                  bundle_label_selector=selectors, **detached)
        self.num_bundles = n
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            self.pg = None
            total = ray.cluster_resources()
            why = " — the cluster has no GPUs (expert device gpu)" if self.bundle.get("GPU") and \
                not total.get("GPU") else ""
            raise ExpertsUnavailable(None, every, f"could not reserve {n} × {self.bundle} for the expert actors "
                                     f"within {timeout_s:g} s{why} (cluster has {total})") from None

    def start(self, plan: Plan) -> None:
        """Start the actors of `plan` (the startup plan), actor i in bundle i; ExpertsUnavailable
        (and nothing left behind) if Ray refuses one."""
        tag = uuid.uuid4().hex[:6]
        try:
            for a in plan.actors:
                name = f"{a.label}#{a.id}.{tag}" if self.pool_name is None else self._startup_name(a)
                self.actors.append(self.start_actor(a.id, name, holding(a), bundle=a.id))
        except Exception as e:  # noqa: BLE001 — nothing half-made is left behind
            self.shutdown()
            raise ExpertsUnavailable(None, range(plan.num_experts),
                                     f"expert actors could not be created: {brief(e)}") from None

    def start_actor(self, actor_id: int, actor_name: str, assignment: Mapping[int, Sequence[int]],
                    bundle: int | None = None, node: str = "") -> Any:
        """Create one expert actor holding `assignment` {layer: experts}: in bundle `bundle` of the
        placement group, or on its own with the same resources (on `node` if given, else spread),
        detached when the pool is named. It joins `actors` once `adopt`ed (or `start`ed)."""
        # progress, stats, pings and endpoints answer while a layer call waits for a reload
        remote_class = ray.remote(concurrency_groups={"control": 2})(ExpertActor)
        if bundle is not None:
            strategy: Any = PlacementGroupSchedulingStrategy(self.pg, bundle)
        elif node:
            strategy = NodeAffinitySchedulingStrategy(node, soft=True)
        else:
            strategy = "SPREAD"
        options = dict(name=actor_name, namespace=self.namespace, num_cpus=self.bundle.get("CPU", 0),
                       **({} if self.pool_name is None else {"lifetime": "detached"}),
                       num_gpus=self.bundle.get("GPU", 0),
                       resources={k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")},
                       max_restarts=-1, max_task_retries=-1, scheduling_strategy=strategy)
        layers = sorted(assignment)
        handle = remote_class.options(**options).remote(
            self.checkpoint, [], layers, dtype=self.dtype, device=self.device, num_threads=self.num_threads,
            name=actor_name.split("#")[0], assignment={int(k): list(v) for k, v in assignment.items()},
            quantization=self.quantization)
        self.names[actor_id] = actor_name
        self.bundles[actor_id] = bundle
        return handle

    def adopt(self, started: Mapping[int, Any]) -> None:
        """Add actors made by start_actor (actor id → handle), all in one assignment."""
        actors = list(self.actors) + [None] * (max(started, default=-1) + 1 - len(self.actors))
        for actor_id, handle in started.items():
            actors[actor_id] = handle
        self.actors = actors

    def adopt_named(self, names: dict[int, str], bundles: dict[int, int | None]) -> None:
        """Take the creator's actors (a copy following its plan): look up by name the ones new here,
        including an id whose actor was retired and started again (another name), and drop the ids
        the creator no longer has (their actors were killed there)."""
        actors: list[Any] = [None] * (max(names) + 1)
        for actor_id, actor_name in names.items():
            known = actor_id < len(self.actors) and self.actors[actor_id] is not None
            if known and self.names.get(actor_id) == actor_name:
                actors[actor_id] = self.actors[actor_id]
            else:
                actors[actor_id] = ray.get_actor(actor_name, namespace=self.namespace)
        self.actors, self.names, self.bundles = actors, names, bundles

    def attach(self, startup: Plan, names: dict[int, str] | None, bundles: dict[int, int | None] | None) -> bool:
        """Use the named placement group and actors if they all exist (a restarted pool host):
        `names` and `bundles` as last published, or None when the startup plan never changed."""
        try:
            pg = get_placement_group(f"{self.pool_name}/pg")
            if names is None or bundles is None:
                names = {a.id: self._startup_name(a) for a in startup.actors}
                bundles = {a.id: a.id for a in startup.actors}
            actors: list[Any] = [None] * (max(names) + 1)
            for actor_id, actor_name in names.items():
                actors[actor_id] = ray.get_actor(actor_name, namespace=self.namespace)
        except ValueError:  # some part is missing
            return False
        self.pg, self.actors, self.names, self.bundles = pg, actors, names, bundles
        self.num_bundles = len(startup.actors)
        return True

    def _startup_name(self, actor: ActorSlots) -> str:
        return f"{actor.label}#{actor.id}/{self.pool_name}"

    def _eligible_nodes(self, experts: Sequence[int]) -> list[str]:
        nodes = [n for n in ray.nodes() if n.get("Alive")
                 and all(n["Resources"].get(k, 0) >= v for k, v in self.bundle.items())]
        if not nodes:
            raise ExpertsUnavailable(None, experts, f"no alive node offers {self.bundle} for an expert actor")
        return sorted(n["NodeID"] for n in nodes)

    # --- loading ---------------------------------------------------------------------------------

    def failed(self) -> bool:
        """Whether an actor failed to load its experts (the pool is then of no use)."""
        try:
            snaps = ray.get([a.progress.remote() for a in self.live_actors()], timeout=5.0)
        except ray.exceptions.RayError:
            return False  # restarting or unreachable is for the callers' timeouts, not a load failure
        return any(s["state"] == "FAILED" for s in snaps)

    def wait_loaded(self, experts: Sequence[int], limit_s: float,
                    on_progress: Callable[[list[dict]], None] | None = None, every_s: float = 1.0) -> None:
        """Wait until every actor has loaded its experts, calling on_progress(snapshots) about every
        `every_s`. The wait is bounded by progress, not by the size: ExpertsUnavailable (naming
        `experts`) when an actor failed to load or nothing was read for limit_s."""
        last_read, last_change = -1, time.monotonic()
        while True:
            try:
                snaps = ray.get([a.progress.remote() for a in self.live_actors()], timeout=limit_s)
            except ray.exceptions.GetTimeoutError:
                raise ExpertsUnavailable(None, experts, f"expert actors did not start within {limit_s:g} s") from None
            except ray.exceptions.RayError as e:
                raise ExpertsUnavailable(None, experts, f"expert actors failed to start: {brief(e)}") from None
            if on_progress is not None:
                on_progress(snaps)
            failed = [s for s in snaps if s["state"] == "FAILED"]
            if failed:
                raise ExpertsUnavailable(None, experts, f"{failed[0]['what']} could not load its experts: "
                                         f"{failed[0]['error']}")
            if all(s["state"] == "READY" for s in snaps):
                return
            read = sum(s["bytes_read"] for s in snaps)
            if read > last_read:
                last_read, last_change = read, time.monotonic()
            elif time.monotonic() - last_change > limit_s:
                raise ExpertsUnavailable(None, experts, f"loading made no progress for {limit_s:g} s")
            time.sleep(every_s)

    # --- lookups ---------------------------------------------------------------------------------

    def live_actors(self) -> list[Any]:
        return [a for a in self.actors if a is not None]

    def actor_name(self, actor: int) -> str:
        """What the actor is called in errors, stats and the dashboard, e.g. 'experts[0-1]@layers[0-31]'
        (as it started) or 'actor5' (started by a placement change)."""
        return self.names.get(actor, f"actor{actor}").split("#")[0]

    def actor_id(self, actor: int) -> str | None:
        """Ray's hex id of the actor at pool index `actor` (errors carry it)."""
        try:
            return self.actors[actor]._actor_id.hex()
        except (AttributeError, IndexError):
            return None

    def stats(self, timeout_s: float) -> list[dict[str, Any]]:
        return ray.get([a.stats.remote() for a in self.live_actors()], timeout=timeout_s)

    def bundles_free(self) -> list[int]:
        """Bundles of the placement group that no live actor uses (a retired actor's)."""
        if self.pg is None:
            return []
        used = {b for i, b in self.bundles.items() if b is not None and i < len(self.actors) and self.actors[i]}
        return [b for b in range(self.num_bundles) if b not in used]

    # --- stop ----------------------------------------------------------------------------------

    def retire(self, actor_id: int) -> None:
        """Kill an actor the plan no longer has; its bundle (if any) is free for the next one."""
        handle = self.actors[actor_id]
        if handle is None:
            return
        try:
            forget_assignment(handle)
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 — already gone
            pass
        self.actors[actor_id] = None
        self.names.pop(actor_id, None)  # published: the pool's copies drop it too (adopt_named)

    def shutdown(self) -> None:
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


def holding(actor: ActorSlots) -> dict[int, tuple[int, ...]]:
    """An actor's {layer: experts} in a plan (what ExpertActor takes, and `ExpertActor.hold`)."""
    return {layer: actor.experts[layer] for layer in actor.layers if actor.experts[layer]}
