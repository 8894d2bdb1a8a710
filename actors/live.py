"""Live placement: a running pool switches to a new Plan without dropping or disturbing a call.

The pool's creator (the pool host, for a server) owns the plan; every other process holding a copy
of the pool (the front replicas) follows it. A change (`apply`) goes:

1. load    new actors start with their experts, and actors that gain copies read them
           (`ExpertActor.hold(old ∪ new)`), while the old plan keeps serving;
2. switch  the new plan is published in Ray's KV store under the pool's name; each copy's
           `Follower` thread (actors/live_plan.py, every FOLLOW_S) installs it with one assignment, so a layer call
           routes by the old plan or the new one, whole, and all copies converge on one version;
3. drain   each copy acknowledges the oldest version it still has layer calls in flight under;
           once every live copy acknowledges the new version, no call can still reach a copy
           about to go (a copy silent for ACK_STALE_S is taken for dead and not waited for);
4. retire  actors that lose copies drop them (`hold(new)`), stopped actors are killed and their
           reservation freed for the next new actor.
A pool without a name has no other users: it switches in place and drains its own calls.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

import ray

from . import planner
from .actor_group import holding
from .errors import brief
from .live_plan import ACK_STALE_S, FOLLOW_S, acknowledged, publish
from .metrics import PlacementMetrics
from .plan import Plan, actor_loads, diff, imbalance, with_nodes

if TYPE_CHECKING:
    from .pool import ExpertPool

SETTLE_S = 3 * FOLLOW_S  # after publishing, before trusting the acks: a copy may be starting


class PlacementFailed(RuntimeError):
    """A placement change could not be made; the previous placement keeps serving."""


def _record(pool: "ExpertPool", entry: dict[str, Any]) -> None:
    pool.live.record(entry)
    if pool.name is not None:
        publish(pool.name, pool.live, pool.group)
    show_metrics(pool)


def show_metrics(pool: "ExpertPool", load: Any = None) -> None:
    """Export the placement (version, copies, load shares) as metrics; never fails a change."""
    try:
        PlacementMetrics.get().show(pool.plan, {i: pool.actor_name(i) for i in pool.group.names},
                                    actor_loads(pool.plan, load) if load is not None else None)
    except Exception:  # noqa: BLE001 — no metrics agent (a driver without Ray's metrics): nothing to show
        pass


def apply(pool: "ExpertPool", new: Plan, kind: str = "apply", load: Any = None,
          on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Switch the pool (its creator's object) to `new`; returns the history entry it records."""
    say = on_step or (lambda _: None)
    t0 = time.monotonic()
    old = pool.plan
    d = diff(old, new)
    entry: dict[str, Any] = {"version": new.version, "from_version": old.version, "kind": kind,
                             "moves": d.moves, "retired": len(d.removed), "started": list(d.started),
                             "stopped": list(d.stopped), "at": time.time()}
    if load is not None:
        entry["imbalance_before"], entry["imbalance_after"] = imbalance(old, load), imbalance(new, load)
    if new.version == old.version:  # nothing worth moving: recorded all the same
        entry["seconds"] = round(time.monotonic() - t0, 3)
        _record(pool, entry)
        return entry
    timeout = pool.config.start_timeout_s
    # 1. load: new actors, and more copies on the others (old ∪ new), while the old plan serves
    group = pool.group
    free, started = group.bundles_free(), {}
    for i in d.started:
        a = new.actor(i)
        # A fresh name for every start: an id retired by a scale-down comes back as another actor, and
        # the pool's copies in front replicas tell the two apart by name (ActorGroup.adopt_named).
        name = f"actor{i}#{i}.{uuid.uuid4().hex[:6]}" + ("" if pool.name is None else f"/{pool.name}")
        started[i] = group.start_actor(i, name, holding(a), bundle=free.pop(0) if free else None, node=a.node)
    gaining = {i: {layer: sorted(set(old.actor(i).experts[layer]) | set(new.actor(i).experts[layer]))
                   for layer in new.actor(i).layers}
               for i in {c.actor for c in d.added} - set(d.started)}
    say(f"loading {d.moves} expert copies ({len(d.started)} new actors)")
    try:
        refs = [group.actors[i].hold.remote(union) for i, union in gaining.items()]
        refs += [started[i].progress.remote() for i in d.started]
        ray.get(refs, timeout=timeout)
        group.adopt(started)
        pool.wait_loaded()  # the new actors' weights (bounded by progress)
    except BaseException as e:  # the old plan still serves: undo what was loaded for the new one
        group.adopt(started)
        for i in d.started:
            group.retire(i)
        for i in gaining:
            try:
                group.actors[i].hold.remote(holding(old.actor(i)))
            except Exception:  # noqa: BLE001
                pass
        # The details (free resources, node addresses, Ray's text) go to the host's log; the
        # exception reaches clients, so it says only what failed and what serves.
        if isinstance(e, ray.exceptions.GetTimeoutError):
            print(f"raymoe: placement v{new.version} could not load within {timeout:g} s; free in the cluster: "
                  f"{ray.available_resources()}", flush=True)
            raise PlacementFailed(f"placement v{new.version} could not load within {timeout:g} s (the cluster "
                                  f"lacks room for its actors?); v{old.version} keeps serving") from None
        print(f"raymoe: placement v{new.version} failed to load: {brief(e)}", flush=True)
        raise PlacementFailed(f"placement v{new.version} failed to load ({type(e).__name__}); v{old.version} "
                              f"keeps serving") from None
    # 2. switch
    pool.live.install(new)
    _record(pool, entry)
    say(f"switched to placement v{new.version}")
    # 3. drain: no call may still be on its way to a copy that goes
    deadline = time.monotonic() + pool.config.call_timeout_s + ACK_STALE_S
    if pool.name is not None:
        time.sleep(SETTLE_S)
    while time.monotonic() < deadline:
        versions = acknowledged(pool.name) if pool.name is not None else []
        if min(versions + [pool.live.oldest_in_use()]) >= new.version:
            break
        time.sleep(FOLLOW_S / 2)
    # 4. retire
    losing = {c.actor for c in d.removed} - set(d.stopped)
    ray.get([group.actors[i].hold.remote(holding(new.actor(i))) for i in losing], timeout=timeout)
    for actor_id in d.stopped:
        group.retire(actor_id)
    entry["seconds"] = round(time.monotonic() - t0, 3)
    if pool.name is not None:
        publish(pool.name, pool.live, group)
    try:
        metrics = PlacementMetrics.get()
        metrics.changes.inc(tags={"kind": kind})
        metrics.change_seconds.observe(entry["seconds"])
    except Exception:  # noqa: BLE001
        pass
    show_metrics(pool, load)
    say(f"placement v{new.version} done in {entry['seconds']:.2f} s")
    return entry


# --- the operations (called on the creator's pool: the pool host, or a private pool's owner) ------

def measured_load(pool: "ExpertPool", reset: bool = True, timeout_s: float | None = None) -> list[list[float]]:
    """[L][E] (token, expert) pairs the actors computed since the last call with reset (or since
    they started); an actor that restarted meanwhile counts from its restart."""
    seen = pool.live.load_seen
    ids = [a.id for a in pool.plan.actors if pool.actors[a.id] is not None]  # not one gone for good
    counts = ray.get([pool.actors[i].expert_load.remote() for i in ids], timeout=timeout_s or pool.config.call_timeout_s)
    cfg = pool.model_config
    total = [[0.0] * cfg.num_local_experts for _ in range(cfg.num_hidden_layers)]
    for i, now in zip(ids, counts):
        base = seen.get(i)
        if base is not None and any(n < b for row_n, row_b in zip(now, base) for n, b in zip(row_n, row_b)):
            base = None  # restarted: its counters began again
        for layer, row in enumerate(now):
            for e, n in enumerate(row):
                total[layer][e] += n - (base[layer][e] if base is not None else 0)
        if reset:
            seen[i] = now
    return total


def _with_nodes(pool: "ExpertPool") -> Plan:
    """The current plan with each actor's node as Ray reports it (so copies can be kept apart)."""
    plan = pool.plan
    there = [a for a in plan.actors if pool.actors[a.id] is not None]  # not one gone for good
    stats = ray.get([pool.actors[a.id].stats.remote() for a in there], timeout=pool.config.call_timeout_s)
    return with_nodes(plan, {a.id: st["node_id"] for a, st in zip(there, stats)})


def scale_pool(pool: "ExpertPool", num_actors: int, on_step: Callable[[str], None] | None = None,
               kind: str = "scale") -> dict[str, Any]:
    """Grow or shrink the pool to `num_actors` expert actors, moving as few experts as possible."""
    load = measured_load(pool, reset=False)
    new = planner.scale(_with_nodes(pool), num_actors, load, min_copies=pool.config.replicas)
    return apply(pool, new, kind, load, on_step)


def rebalance_pool(pool: "ExpertPool", on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Apply the planner's placement for the load measured since the last rebalance."""
    load = measured_load(pool)
    new = planner.rebalance(_with_nodes(pool), load, min_copies=pool.config.replicas)
    return apply(pool, new, "rebalance", load, on_step)


def dead_actors(pool: "ExpertPool", timeout_s: float = 2.0) -> list[int]:
    """The plan's actors that Ray says are dead for good (killed, or out of restarts); one that is
    restarting or slow is not among them."""
    ids = [a.id for a in pool.plan.actors if pool.actors[a.id] is not None]
    refs = [pool.actors[i].ping.remote() for i in ids]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    dead = []
    for i, ref in zip(ids, refs):
        if ref in done:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.ActorDiedError:
                dead.append(i)
            except Exception:  # noqa: BLE001 — unavailable for now (restarting): not dead
                pass
    return dead


def replace_dead(pool: "ExpertPool", dead: list[int], on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start new actors for the ones gone for good and give them those actors' copies (or what the
    load says); meanwhile their pairs go to other copies (failover), or their experts' calls wait."""
    for i in dead:  # nothing to drain from a dead actor; its bundle is free for its successor
        pool.group.retire(i)
    load = measured_load(pool, reset=False)
    new = planner.replace(_with_nodes(pool), dead, load, min_copies=pool.config.replicas)
    return apply(pool, new, "replace", load, on_step)


def report(pool: "ExpertPool", timeout_s: float = 5.0) -> dict[str, Any]:
    """The placement now: version, actors (node, device, state, experts per layer, work done and
    predicted share of the measured load), copies per (layer, expert), and the history."""
    plan = pool.plan
    refs = [pool.actors[a.id].stats.remote() for a in plan.actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    try:
        load = measured_load(pool, reset=False, timeout_s=timeout_s)
        shares = actor_loads(plan, load)
        total = sum(shares) or 1.0
        imb = imbalance(plan, load)
    except Exception:  # noqa: BLE001 — an actor does not answer: no load figures this time
        shares, total, imb = [0.0] * len(plan.actors), 1.0, 0.0
    actors = []
    for a, ref, share in zip(plan.actors, refs, shares):
        info = {"id": a.id, "name": pool.actor_name(a.id), "node_id": a.node, "device": pool.device,
                "state": "UNREACHABLE", "slots": a.slots,
                "experts": {str(layer): list(a.experts[layer]) for layer in a.layers}, "load": share / total}
        if ref in ready:
            try:
                st = ray.get(ref, timeout=0)
                info.update(state="ALIVE" if st["state"] == "READY" else st["state"], node_id=st["node_id"],
                            device=st["device"], pairs=st["tokens"], weight_bytes=st["weight_bytes"],
                            quantization=st.get("quantization", ""))
            except Exception:  # noqa: BLE001 — dead: it stays UNREACHABLE
                pass
        actors.append(info)
    return {"version": plan.version, "actors": actors, "imbalance": imb,
            "copies": [list(plan.copies(layer)) for layer in range(plan.num_layers)],
            "history": list(pool.live.history)}
