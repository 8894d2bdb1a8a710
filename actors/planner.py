"""The expert planner (EPLB-style): how many copies each expert gets and which actor holds each.

Pure and Ray-free: it reads a Plan (actors/plan.py) and a [L][E] load (routed (token, expert)
pairs, e.g. what the actors counted since the last rebalance) and writes the next Plan. Per layer:

1. copies — every expert gets `min_copies`; while spare slots remain, the expert with the highest
   load per copy gets one more copy, as long as one copy of it would carry more than an average
   actor's share of the layer (below that, placing alone can balance the actors, and an extra copy
   is only a load to move);
2. keep — every copy the current plan already has stays where it is, up to the new count (moving
   nothing is free);
3. place — the copies still missing go, heaviest first, to the least loaded actor with a free
   slot, preferring a node that holds no copy of that expert yet;
4. improve — while the most loaded actor can give one copy away, or swap one with another actor,
   and so lower the maximum by more than `min_gain` of the mean per copy moved, do the best step.

The result minimises the most loaded actor approximately (the exact problem is bin packing) while
moving little; tests/test_planner.py checks it against brute force on small cases. A replicated
expert's load is shared equally by its copies in every prediction here; serving splits a step's
pairs of such an expert between its copies by the actors' load in that step, which can only do
better. An all-zero load is treated as uniform (a fresh server, or scaling before any traffic).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

from .plan import ActorSlots, Plan, as_load

MIN_GAIN = 0.05  # a step must lower the maximum by 5% of the mean actor load per copy it moves
# Step 4 of every layer together stops improving after this long: the plan is complete after step
# 3, so a bound keeps a change (which holds the pool host's change lock) from running for minutes.
IMPROVE_BUDGET_S = 5.0


def rebalance(plan: Plan, load: Any, *, min_copies: int = 1, min_gain: float = MIN_GAIN) -> Plan:
    """The plan for `load` on the same actors (their slots may hold other experts, or more copies)."""
    return _replan(plan, list(plan.actors), load, min_copies, min_gain)


def scale(plan: Plan, num_actors: int, load: Any = None, *, nodes: Sequence[str] | None = None,
          slots: int | None = None, min_copies: int = 1, min_gain: float = MIN_GAIN) -> Plan:
    """The plan on `num_actors` actors: new ones get fresh ids (and `nodes[i]` for the i-th new one,
    if given), the newest are stopped first when shrinking; every actor gets at least `slots`
    (default: today's largest), and more when fewer actors must hold every expert."""
    layers = tuple(range(plan.num_layers))
    if any(a.layers != layers for a in plan.actors):
        raise ValueError("scaling needs every actor to serve every layer (layer groups cannot be scaled)")
    if num_actors < 1:
        raise ValueError(f"the experts need at least one actor (got {num_actors})")
    copies = min(min_copies, num_actors)
    need = math.ceil(plan.num_experts * copies / num_actors)
    width = max(slots or 0, need, max((a.slots for a in plan.actors), default=1))
    if width > plan.num_experts:
        width = plan.num_experts
    kept = sorted(plan.actors, key=lambda a: a.id)[:num_actors]
    actors = [dataclasses.replace(a, slots=max(a.slots, width)) for a in kept]
    next_id = max((a.id for a in plan.actors), default=-1) + 1
    for i in range(num_actors - len(actors)):
        node = nodes[i] if nodes is not None and i < len(nodes) else ""
        actors.append(ActorSlots(next_id + i, node, width, layers, tuple(() for _ in layers)))
    if load is None:
        load = [[0.0] * plan.num_experts for _ in layers]
    return _replan(plan, actors, load, copies, min_gain)


def replace(plan: Plan, dead: Sequence[int], load: Any = None, *, min_copies: int = 1,
            min_gain: float = MIN_GAIN) -> Plan:
    """The plan with the actors in `dead` (gone for good) replaced by as many new ones (fresh ids,
    the same layers and slots, any node): the copies they held go to the new actors, or wherever
    the load says, and everything else stays."""
    gone = set(dead)
    unknown = gone - {a.id for a in plan.actors}
    if unknown:
        raise ValueError(f"no actor(s) {sorted(unknown)} in the plan")
    next_id = max((a.id for a in plan.actors), default=-1) + 1
    actors = [a for a in plan.actors if a.id not in gone]
    for i, a in enumerate(sorted((a for a in plan.actors if a.id in gone), key=lambda a: a.id)):
        actors.append(dataclasses.replace(a, id=next_id + i, node="", experts=tuple(() for _ in a.experts)))
    if load is None:
        load = [[0.0] * plan.num_experts for _ in range(plan.num_layers)]
    return _replan(plan, actors, load, min_copies, min_gain)


def _replan(plan: Plan, actors: list[ActorSlots], load: Any, min_copies: int, min_gain: float) -> Plan:
    if min_copies < 1:
        raise ValueError(f"min_copies must be at least 1 (got {min_copies})")
    rows = as_load(load, plan.num_layers, plan.num_experts)
    deadline = time.monotonic() + IMPROVE_BUDGET_S
    held: dict[int, list[tuple[int, ...]]] = {a.id: list(a.experts) for a in actors}
    for layer in range(plan.num_layers):
        mine = [a for a in actors if layer in a.layers]
        if not mine:
            continue
        placed = _place_layer(mine, rows[layer], plan.num_experts, min_copies, min_gain, layer, deadline)
        for a in mine:
            held[a.id][layer] = tuple(sorted(placed[a.id]))
    new = tuple(dataclasses.replace(a, experts=tuple(held[a.id])) for a in actors)
    candidate = Plan(plan.num_layers, plan.num_experts, new, plan.version)
    if candidate.missing():
        raise ValueError(f"the plan leaves experts without a copy: {candidate.missing()[:8]}")
    idle = [a.id for a in new if any(not a.experts[layer] for layer in a.layers)]
    if idle:
        raise ValueError(f"{len(actors)} actors would leave actor(s) {idle[:8]} without an expert to hold "
                         f"({plan.num_experts} experts, {min_copies} copies each); use fewer actors")
    same = {a.id: a for a in plan.actors} == {a.id: a for a in new}
    return candidate if same else dataclasses.replace(candidate, version=plan.version + 1)


def copy_counts(weights: Sequence[float], slots: Sequence[int], min_copies: int = 1) -> list[int]:
    """Step 1 for one layer: copies per expert, for actors with `slots[i]` slots each."""
    n, actors = len(weights), len(slots)
    base = min(min_copies, actors)
    counts = [base] * n
    spare = sum(slots) - base * n
    if spare < 0:
        raise ValueError(f"{actors} actors with {sum(slots)} slots cannot hold {n} experts × {base} copies")
    share = sum(weights) / actors  # an average actor's load: one copy carrying more forces imbalance
    while spare > 0:
        hot = max((e for e in range(n) if counts[e] < actors), key=lambda e: (weights[e] / counts[e], -e),
                  default=None)
        if hot is None or weights[hot] / counts[hot] <= share:
            break
        counts[hot] += 1
        spare -= 1
    return counts


def _place_layer(actors: list[ActorSlots], raw: Sequence[float], num_experts: int, min_copies: int,
                 min_gain: float, layer: int, deadline: float) -> dict[int, set[int]]:
    total = sum(raw)
    prior = total / num_experts * 0.01 if total > 0 else 1.0  # no expert is ever free; zero load is uniform
    w = [x + prior for x in raw]
    slots = [a.slots for a in actors]
    counts = copy_counts(w, slots, min_copies)
    best = _assign(actors, w, counts, min_gain, layer, deadline)
    mean = sum(w) / len(actors)
    spare = sum(slots) - sum(counts)
    for _ in range(min(spare, 2 * num_experts)):  # one more copy of the hottest expert, while that pays
        hot = max((e for e in range(num_experts) if counts[e] < len(actors)),
                  key=lambda e: (w[e] / counts[e], -e), default=None)
        if hot is None or time.monotonic() > deadline:
            break
        counts = counts.copy()
        counts[hot] += 1
        holds = _assign(actors, w, counts, min_gain, layer, deadline)
        if _peak(holds, w) < _peak(best, w) - min_gain * mean:
            best = holds
    # Today's placement, if it still covers every expert and keeps every actor busy, stays unless the
    # new one is better by more than min_gain (a plan is never worse than no change, and moves cost).
    now = {a.id: set(a.experts[layer]) for a in actors}
    copies = [sum(e in held for held in now.values()) for e in range(num_experts)]
    if all(now.values()) and min(copies) >= min(min_copies, len(actors)) and \
            _peak(now, w) <= _peak(best, w) + min_gain * mean:
        return now
    return best


def _peak(holds: dict[int, set[int]], w: Sequence[float]) -> float:
    copies = [0] * len(w)
    for held in holds.values():
        for e in held:
            copies[e] += 1
    return max(sum(w[e] / copies[e] for e in held) for held in holds.values())


def _assign(actors: list[ActorSlots], w: Sequence[float], counts: list[int], min_gain: float,
            layer: int, deadline: float = math.inf) -> dict[int, set[int]]:
    """Steps 2–4 for one layer: which actor holds each of counts[e] copies of every expert e
    (step 4 only until `deadline`, a time.monotonic())."""
    num_experts = len(w)
    per_copy = [w[e] / counts[e] for e in range(num_experts)]
    node = {a.id: a.node for a in actors}
    cap = {a.id: a.slots for a in actors}
    ids = [a.id for a in actors]
    holds: dict[int, set[int]] = {a.id: set() for a in actors}
    # 2. keep what is already there, up to the new count of each expert
    left = list(counts)
    for a in actors:
        for e in a.experts[layer]:
            if left[e] > 0 and len(holds[a.id]) < cap[a.id]:
                holds[a.id].add(e)
                left[e] -= 1

    def load_of(a: int) -> float:
        return sum(per_copy[e] for e in holds[a])

    def node_ok(e: int, a: int, leaving: int | None = None) -> bool:
        """Whether actor a's node may take a copy of e: no other copy there, or no free node left."""
        if not node[a]:
            return True
        used = {node[b] for b in ids if e in holds[b] and b != leaving}
        return node[a] not in used or all(node[b] in used for b in ids if node[b])

    # 3. place the missing copies, heaviest first
    todo = sorted((e for e in range(num_experts) for _ in range(left[e])), key=lambda e: (-per_copy[e], e))
    for e in todo:
        free = [a for a in ids if len(holds[a]) < cap[a] and e not in holds[a]]
        if not free:
            _make_room(e, holds, cap, ids)
            free = [a for a in ids if len(holds[a]) < cap[a] and e not in holds[a]]
        best = min(free, key=lambda a: (not node_ok(e, a), load_of(a), len(holds[a]), a))
        holds[best].add(e)
    # 4. improve: give away or swap one copy of the most loaded actor while that pays
    mean = sum(load_of(a) for a in ids) / len(ids)
    for _ in range(4 * num_experts * len(ids)):
        if time.monotonic() > deadline:
            break
        loads = {a: load_of(a) for a in ids}
        top = max(ids, key=lambda a: (loads[a], -a))
        best_step, best_peak = None, loads[top] - min_gain * mean
        for b in ids:
            if b == top:
                continue
            for x in holds[top]:
                if x in holds[b] or not node_ok(x, b, leaving=top):
                    continue
                if len(holds[b]) < cap[b]:  # move x to b
                    peak = max(loads[top] - per_copy[x], loads[b] + per_copy[x])
                    if peak < best_peak:
                        best_step, best_peak = (x, b, None), peak
                for y in holds[b]:  # swap x and y
                    if y in holds[top] or per_copy[y] >= per_copy[x] or not node_ok(y, top, leaving=b):
                        continue
                    d = per_copy[x] - per_copy[y]
                    peak = max(loads[top] - d, loads[b] + d)
                    if peak < best_peak - min_gain * mean:  # a swap moves two copies
                        best_step, best_peak = (x, b, y), peak
        if best_step is None:
            break
        x, b, y = best_step
        holds[top].discard(x)
        holds[b].add(x)
        if y is not None:
            holds[b].discard(y)
            holds[top].add(y)
    return holds


def _make_room(e: int, holds: dict[int, set[int]], cap: dict[int, int], ids: list[int]) -> None:
    """Every actor with a free slot already holds e: move some other copy f from an actor b that
    lacks e into a free slot (on an actor a lacking f), so that e can go to b."""
    for a in ids:
        if len(holds[a]) >= cap[a]:
            continue
        for b in ids:
            if e in holds[b]:
                continue
            for f in sorted(holds[b]):
                if f not in holds[a]:
                    holds[b].discard(f)
                    holds[a].add(f)
                    return
    raise ValueError(f"no actor can take a copy of expert {e} (too few actors or slots)")
