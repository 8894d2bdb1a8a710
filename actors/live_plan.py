"""The live plan: the Plan a pool's layer calls route by now, and how every copy of a pool follows
its creator's plan.

- `LivePlan` (one per process and pool): the current plan and its layer routes, swapped with one
  assignment so a layer call routes by the old plan or the new one, whole; the layer calls in
  flight under each plan version (a placement change waits for the old ones to return); the
  placement changes so far.
- The creator (the pool host, for a server) publishes its plan, actor names and placement-group
  bundles in Ray's KV store under the pool's name (`publish`); a copy's `Follower` thread installs
  each newer one and acknowledges the oldest version it still has calls in flight under. The
  change itself (load, switch, drain, retire) is actors/live.py's.
- `layer_route`: one layer's experts → actor ids as tensors, leaving suspected actors out where
  their experts have another copy (actors/failover.py says which are suspected).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import torch
from ray.experimental import internal_kv as _kv

from .plan import Plan, from_json, to_json

if TYPE_CHECKING:
    from .actor_group import ActorGroup

FOLLOW_S = 0.1  # how often a copy looks for a new plan (and says which version it uses)
ACK_STALE_S = 5.0  # a copy that has not acknowledged for this long is taken for gone
HEARTBEAT_S = 1.0  # an unchanged acknowledgement is written again this often
HISTORY = 100  # placement changes remembered


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


def layer_route(plan: Plan, layer: int, down: frozenset = frozenset(),
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


class LivePlan:
    """The plan this process routes a pool's layer calls by, and the calls in flight under each version."""

    def __init__(self, plan: Plan) -> None:
        self._live: tuple[Plan, dict] = (plan, {})  # the plan and its routes, cached by (layer, suspects, failed)
        self._inflight: collections.Counter = collections.Counter()  # plan version → layer calls in flight
        self._lock = threading.Lock()
        self.history: list[dict[str, Any]] = []  # the placement changes so far (see actors/live.py)
        self.load_seen: dict[int, list[list[int]]] = {}  # actor id → its pair counts at the last rebalance

    def __getstate__(self) -> dict[str, Any]:  # a copy for another process counts its own calls
        return {**self.__dict__, "_inflight": collections.Counter(), "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def plan(self) -> Plan:
        return self._live[0]

    def install(self, plan: Plan, history: list[dict[str, Any]] | None = None) -> None:
        """Route every layer call dispatched from now on by `plan` (one assignment, so a call sees
        the old plan or the new one whole); `history`: the creator's, for a copy that follows it."""
        if history is not None:
            self.history = history
        self._live = (plan, {})

    def record(self, entry: dict[str, Any]) -> None:
        """Remember a placement change (the latest HISTORY of them)."""
        self.history = self.history[-(HISTORY - 1):] + [entry]

    def begin_call(self, layer: int, down: frozenset, failed: frozenset = frozenset()) -> tuple[int, LayerRoute]:
        """The plan version and route a layer call uses (`down`: the suspected actors; `failed`:
        actors that just failed it, for its resend); end_call(version) once it has returned."""
        plan, routes = self._live
        route = self._route(plan, routes, layer, down, failed)
        with self._lock:
            self._inflight[plan.version] += 1
        return plan.version, route

    def end_call(self, version: int) -> None:
        with self._lock:
            self._inflight[version] -= 1
            if not self._inflight[version]:
                del self._inflight[version]

    def route(self, layer: int, down: frozenset = frozenset()) -> LayerRoute:
        return self._route(*self._live, layer, down, frozenset())

    @staticmethod
    def _route(plan: Plan, routes: dict, layer: int, down: frozenset, failed: frozenset) -> LayerRoute:
        key = (layer, down, failed)
        if key not in routes:
            routes[key] = layer_route(plan, layer, down, failed)
        return routes[key]

    def oldest_in_use(self) -> int:
        """The oldest plan version a call still in flight here uses (or the current one)."""
        with self._lock:
            return min([v for v, n in self._inflight.items() if n > 0] + [self.plan.version])


# --- the creator's plan, published for the copies -------------------------------------------------

def _plan_key(name: str) -> bytes:
    return f"raymoe-plan/{name}".encode()


def _version_key(name: str) -> bytes:
    """Just the published version: what followers poll (the plan itself is read when it changes)."""
    return f"raymoe-plan-version/{name}".encode()


def _ack_prefix(name: str) -> bytes:
    return f"raymoe-ack/{name}/".encode()


def published(name: str) -> tuple[Plan, dict[int, str], dict[int, int | None], list[dict]] | None:
    """(plan, actor names, bundles, history) as the creator last published them, or None."""
    raw = _kv._internal_kv_get(_plan_key(name))
    if raw is None:
        return None
    state = json.loads(raw)
    return (from_json(state["plan"]), {int(k): v for k, v in state["names"].items()},
            {int(k): v for k, v in state["bundles"].items()}, state["history"])


def publish(name: str, live: LivePlan, group: "ActorGroup") -> None:
    state = {"plan": to_json(live.plan), "names": group.names, "bundles": group.bundles, "history": live.history}
    kv = _kv
    kv._internal_kv_put(_plan_key(name), json.dumps(state).encode(), overwrite=True)
    kv._internal_kv_put(_version_key(name), str(live.plan.version).encode(), overwrite=True)


def forget(name: str) -> None:
    """Drop what a removed pool published (its plan and its copies' acknowledgements)."""
    kv = _kv
    kv._internal_kv_del(_plan_key(name))
    kv._internal_kv_del(_version_key(name))
    kv._internal_kv_del(_ack_prefix(name), del_by_prefix=True)


def acknowledged(name: str) -> list[int]:
    """The versions the live copies of pool `name` acknowledge (stale ones are removed)."""
    kv, prefix, now, out = _kv, _ack_prefix(name), time.time(), []
    for key in kv._internal_kv_list(prefix):
        raw = kv._internal_kv_get(key)
        if raw is None:
            continue
        ack = json.loads(raw)
        if now - ack["t"] > ACK_STALE_S:
            kv._internal_kv_del(key)
        else:
            out.append(int(ack["version"]))
    return out


class Follower:
    """A copy's thread: installs the creator's newest plan and acknowledges what it uses."""

    def __init__(self, name: str, live: LivePlan, group: "ActorGroup") -> None:
        self.name, self.live, self.group, self.id = name, live, group, uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._acked: tuple[int, float] | None = None  # (version, when) last written
        self.step()  # before the first call: a copy made before a switch catches up at once
        threading.Thread(target=self._run, name="raymoe-plan-follower", daemon=True).start()

    def step(self) -> None:
        live, kv = self.live, _kv
        version = kv._internal_kv_get(_version_key(self.name))
        state = published(self.name) if version is not None and int(version) > live.plan.version else None
        if state is not None and state[0].version > live.plan.version:
            plan, names, bundles, history = state
            self.group.adopt_named(names, bundles)  # the new plan's actors first, then the plan
            live.install(plan, history)
        # the acknowledgement: when it changes, and as a heartbeat well within ACK_STALE_S
        acked, now = live.oldest_in_use(), time.time()
        if self._acked is None or self._acked[0] != acked or now - self._acked[1] >= HEARTBEAT_S:
            kv._internal_kv_put(_ack_prefix(self.name) + self.id.encode(),
                                json.dumps({"version": acked, "t": now}).encode(), overwrite=True)
            self._acked = (acked, now)

    def _run(self) -> None:
        while not self._stop.wait(FOLLOW_S):
            try:
                self.step()
            except Exception:  # noqa: BLE001 — the GCS restarting, say: try again next time
                pass

    def stop(self) -> None:
        self._stop.set()
        try:
            _kv._internal_kv_del(_ack_prefix(self.name) + self.id.encode())
        except Exception:  # noqa: BLE001
            pass
