"""Live expert placement: which actor holds which experts of each layer, as a versioned value.

A `Plan` is the one model of a placement: the pool starts its actors by the first one
(actors/placement.py lays it out), the planner (actors/planner.py) reads and writes the next ones,
and a live switch (actors/live.py) carries them. Per actor: a stable id, its node, its capacity in
expert slots and, for every layer it serves, the experts it holds there (possibly different
experts per layer). It is pure data (no Ray, no torch needed); `diff` says what a switch must load
and retire, and the load helpers predict per-actor work for before/after reports.

Shapes: L = layers, E = experts, A = actors. A load is [L][E] routed-token counts (nested
sequences or anything with `.tolist()`, e.g. a torch tensor); a replicated expert's load is split
evenly between its copies, which is how serving splits its pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence


def ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0-2,5,7-8' (how actor names show their experts and layers)."""
    parts, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


@dataclasses.dataclass(frozen=True)
class ActorSlots:
    id: int  # stable across plans (not a position in Plan.actors: scaling removes and appends)
    node: str  # "" when unknown: then no node separation can be asked of this actor
    slots: int  # experts it can hold in each layer it serves (same capacity in every such layer)
    layers: tuple[int, ...]  # layers it serves, ascending
    experts: tuple[tuple[int, ...], ...]  # [L]: expert ids held per layer, ascending; () off `layers`

    @property
    def name(self) -> str:
        """e.g. 'actor3@node-a' (names must not encode experts: those change under a stable id)."""
        return f"actor{self.id}@{self.node}" if self.node else f"actor{self.id}"

    @property
    def label(self) -> str:
        """What it holds, e.g. 'experts[0-1]@layers[0-31]': how an actor started with the pool is
        named in Ray's dashboard, errors and stats (per layer, '0:[0-1];1:[2]', where layers differ)."""
        sets = {self.experts[layer] for layer in self.layers}
        if len(sets) == 1:
            return f"experts[{ranges(next(iter(sets)))}]@layers[{ranges(self.layers)}]"
        return ";".join(f"{layer}:[{ranges(self.experts[layer])}]" for layer in self.layers)


class Copy(NamedTuple):
    actor: int  # actor id
    layer: int
    expert: int


@dataclasses.dataclass(frozen=True)
class PlanDiff:
    added: tuple[Copy, ...]  # copies to load before switching to the new plan
    removed: tuple[Copy, ...]  # copies to retire once the new plan serves
    started: tuple[int, ...]  # actor ids only the new plan has
    stopped: tuple[int, ...]  # actor ids only the old plan has

    @property
    def moves(self) -> int:
        """Copies that must be loaded: the cost of a switch (retiring a copy is nearly free)."""
        return len(self.added)


@dataclasses.dataclass(frozen=True)
class Plan:
    num_layers: int
    num_experts: int
    actors: tuple[ActorSlots, ...]
    version: int = 0  # bumped by the planner whenever the placement changes

    def __post_init__(self) -> None:
        # Structural checks only: a plan being built may leave experts uncovered (see `missing`).
        if self.num_layers < 1 or self.num_experts < 1:
            raise ValueError("a plan needs at least one layer and one expert")
        ids = [a.id for a in self.actors]
        if len(set(ids)) != len(ids):
            raise ValueError(f"actor ids must be unique (got {ids})")
        for a in self.actors:
            if a.slots < 1:
                raise ValueError(f"actor {a.id} has {a.slots} slots; it needs at least one")
            if list(a.layers) != sorted(set(a.layers)) or not all(0 <= x < self.num_layers for x in a.layers):
                raise ValueError(f"actor {a.id}: layers must be ascending, unique and < {self.num_layers}")
            if len(a.experts) != self.num_layers:
                raise ValueError(f"actor {a.id}: experts needs one tuple per layer ({self.num_layers})")
            for layer, held in enumerate(a.experts):
                if held and layer not in a.layers:
                    raise ValueError(f"actor {a.id} holds experts of layer {layer}, which it does not serve")
                if list(held) != sorted(set(held)) or not all(0 <= e < self.num_experts for e in held):
                    raise ValueError(f"actor {a.id}, layer {layer}: experts must be ascending, unique "
                                     f"and < {self.num_experts} (got {held})")
                if len(held) > a.slots:
                    raise ValueError(f"actor {a.id}, layer {layer}: {len(held)} experts exceed its {a.slots} slots")

    def actor(self, actor_id: int) -> ActorSlots:
        for a in self.actors:
            if a.id == actor_id:
                return a
        raise KeyError(f"no actor {actor_id} in plan v{self.version}")

    def serving(self, layer: int) -> tuple[ActorSlots, ...]:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} does not exist (the model has {self.num_layers})")
        return tuple(a for a in self.actors if layer in a.layers)

    def owners(self, layer: int) -> tuple[tuple[int, ...], ...]:
        """[E]: for each expert of `layer`, the ids of the actors holding a copy (in `actors` order)."""
        table: list[list[int]] = [[] for _ in range(self.num_experts)]
        for a in self.serving(layer):
            for e in a.experts[layer]:
                table[e].append(a.id)
        return tuple(tuple(t) for t in table)

    def copies(self, layer: int) -> tuple[int, ...]:
        """[E]: how many copies each expert of `layer` has."""
        return tuple(len(o) for o in self.owners(layer))

    def missing(self) -> tuple[tuple[int, int], ...]:
        """(layer, expert) pairs with no copy anywhere; a servable plan has none."""
        return tuple((layer, e) for layer in range(self.num_layers)
                     for e, n in enumerate(self.copies(layer)) if n == 0)


def with_nodes(plan: Plan, nodes: Mapping[int, str]) -> Plan:
    """The same plan with the node of each actor id in `nodes` (the others keep theirs)."""
    return dataclasses.replace(plan, actors=tuple(dataclasses.replace(a, node=nodes.get(a.id, a.node))
                                                  for a in plan.actors))


def widen(plan: Plan, slots: int) -> Plan:
    """The same placement with `slots` expert slots per actor (room for the planner's extra copies)."""
    most = max(len(ex) for a in plan.actors for ex in a.experts)
    if not most <= slots <= plan.num_experts:
        raise ValueError(f"expert slots must be between {most} (what an actor holds now) and "
                         f"{plan.num_experts} (got {slots})")
    return dataclasses.replace(plan, actors=tuple(dataclasses.replace(a, slots=slots) for a in plan.actors))


def diff(old: Plan, new: Plan) -> PlanDiff:
    """Which copies a switch from `old` to `new` must load and retire, sorted (actor, layer, expert)."""
    if (old.num_layers, old.num_experts) != (new.num_layers, new.num_experts):
        raise ValueError("plans of different models cannot be compared")

    def held(plan: Plan) -> set[Copy]:
        return {Copy(a.id, layer, e) for a in plan.actors for layer in a.layers for e in a.experts[layer]}

    before, after = held(old), held(new)
    old_ids, new_ids = {a.id for a in old.actors}, {a.id for a in new.actors}
    return PlanDiff(tuple(sorted(after - before)), tuple(sorted(before - after)),
                    tuple(sorted(new_ids - old_ids)), tuple(sorted(old_ids - new_ids)))


def as_load(load: Any, num_layers: int, num_experts: int) -> list[list[float]]:
    """Check and convert a [L][E] load (lists or a tensor) to floats; refuses negatives and NaN."""
    rows = load.tolist() if hasattr(load, "tolist") else load
    rows = [[float(x) for x in row] for row in rows]
    if len(rows) != num_layers or any(len(row) != num_experts for row in rows):
        raise ValueError(f"load must be [layers={num_layers}][experts={num_experts}]")
    if any(not x >= 0 for row in rows for x in row):  # `not >=` also catches NaN
        raise ValueError("load must be non-negative numbers (routed-token counts)")
    return rows


def layer_loads(plan: Plan, load: Any) -> list[list[float]]:
    """[L][A] predicted load of each actor (in `plan.actors` order) in each layer: every copy of an
    expert gets an equal share of its load; 0 where the actor does not serve the layer."""
    rows = as_load(load, plan.num_layers, plan.num_experts)
    out = []
    for layer, w in enumerate(rows):
        n = plan.copies(layer)
        out.append([sum(w[e] / n[e] for e in a.experts[layer]) for a in plan.actors])
    return out


def actor_loads(plan: Plan, load: Any) -> list[float]:
    """[A] predicted load of each actor summed over layers (its total work per step)."""
    return [sum(col) for col in zip(*layer_loads(plan, load))]


def imbalance(plan: Plan, load: Any) -> float:
    """max/mean actor load, per layer and summed over layers: Σ_l max_a / Σ_l mean_a over the actors
    serving l. Layers run one after another and each waits for its slowest actor, so this is the
    predicted MoE time relative to perfect balance (1.0 = perfect; also 1.0 for an all-zero load)."""
    per_layer = layer_loads(plan, load)
    worst = mean = 0.0
    for layer, row in enumerate(per_layer):
        mine = [x for a, x in zip(plan.actors, row) if layer in a.layers]
        if mine:
            worst += max(mine)
            mean += sum(mine) / len(mine)
    return worst / mean if mean > 0 else 1.0


def to_json(plan: Plan) -> dict[str, Any]:
    """A plan as plain JSON-able data (how a live switch publishes it); inverse of from_json."""
    return dataclasses.asdict(plan)


def from_json(data: dict[str, Any]) -> Plan:
    actors = tuple(ActorSlots(a["id"], a["node"], a["slots"], tuple(a["layers"]),
                              tuple(tuple(ex) for ex in a["experts"])) for a in data["actors"])
    return Plan(data["num_layers"], data["num_experts"], actors, data["version"])
