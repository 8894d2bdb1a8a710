"""Expert placement: which actor hosts which experts of which layers, and which node hosts each actor.

Pure functions over integers and node names (no Ray), so tests check every corner without a
cluster; actors/remote_experts.py enforces the result with a Ray placement group.

- Experts → actors: the E × R expert copies (R = replicas) are laid out as R rounds of 0..E-1 and
  cut into A contiguous runs of near-equal length. A need not divide E; a run never holds the same
  expert twice (runs are at most E long because A ≥ R), so the R copies of an expert sit on R
  different actors.
- Layers: `layer_groups` splits the layers into contiguous groups, each served by its own A actors
  (so an actor hosts its experts for every layer, or for one group of layers).
- Actors → nodes (`assign_nodes`): greedy, deterministic; it keeps the copies of an expert on
  different nodes where the node count allows, then balances actors per node.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


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
class ActorSpec:
    index: int
    experts: tuple[int, ...]  # global expert ids, ascending
    layers: tuple[int, ...]  # layers whose copies of those experts this actor holds

    @property
    def name(self) -> str:
        """What the actor hosts, e.g. 'experts[0-1]@layers[0-31]' (the Ray dashboard shows it)."""
        return f"experts[{ranges(self.experts)}]@layers[{ranges(self.layers)}]"


@dataclasses.dataclass(frozen=True)
class Placement:
    num_experts: int
    num_layers: int
    replicas: int
    actors: tuple[ActorSpec, ...]

    def actors_for_layer(self, layer: int) -> tuple[ActorSpec, ...]:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} does not exist (the model has {self.num_layers})")
        return tuple(a for a in self.actors if layer in a.layers)

    def owners(self, layer: int) -> tuple[tuple[int, ...], ...]:
        """For each expert of `layer`, the indices (into `actors`) of the actors holding a copy."""
        table: list[list[int]] = [[] for _ in range(self.num_experts)]
        for a in self.actors_for_layer(layer):
            for e in a.experts:
                table[e].append(a.index)
        return tuple(tuple(t) for t in table)


def plan_placement(num_experts: int, num_layers: int, num_actors: int | None = None, replicas: int = 1,
                   experts_per_actor: int | None = None, layer_groups: int = 1) -> Placement:
    """Map E experts (with R copies each) of L layers onto actors.

    num_actors is per layer group; give it, or experts_per_actor (then A = ceil(E·R / that)), or
    both (then A · experts_per_actor must cover E·R). Raises ValueError on impossible requests.
    """
    if num_experts < 1 or num_layers < 1:
        raise ValueError("the model needs at least one expert and one layer")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1 (got {replicas})")
    if not 1 <= layer_groups <= num_layers:
        raise ValueError(f"layer_groups must be between 1 and {num_layers} (got {layer_groups})")
    copies = num_experts * replicas
    if experts_per_actor is not None:
        if not 1 <= experts_per_actor <= num_experts:
            raise ValueError(f"experts_per_actor must be between 1 and {num_experts} (got {experts_per_actor})")
        needed = -(-copies // experts_per_actor)
        if num_actors is None:
            num_actors = needed
        elif num_actors < needed:
            raise ValueError(f"{num_actors} actors × {experts_per_actor} experts cannot hold {num_experts} experts "
                             f"× {replicas} replicas; use at least {needed} actors")
    if num_actors is None:
        raise ValueError("give num_actors or experts_per_actor")
    if num_actors < 1:
        raise ValueError(f"num_actors must be at least 1 (got {num_actors})")
    if replicas > num_actors:
        raise ValueError(f"{replicas} replicas need at least {replicas} actors (got {num_actors})")
    if num_actors > copies:
        raise ValueError(f"{num_actors} actors for {copies} expert copies would leave an actor empty; "
                         f"use at most {copies} actors or more replicas")
    slots = [s % num_experts for s in range(copies)]  # R rounds of 0..E-1
    runs = [tuple(sorted(slots[start:start + n])) for start, n in _runs(copies, num_actors)]
    groups = [tuple(range(start, start + n)) for start, n in _runs(num_layers, layer_groups)]
    actors = [ActorSpec(g * len(runs) + i, run, layers) for g, layers in enumerate(groups)
              for i, run in enumerate(runs)]
    return Placement(num_experts, num_layers, replicas, tuple(actors))


def _runs(total: int, parts: int) -> list[tuple[int, int]]:
    """(start, length) of `parts` contiguous near-equal runs covering range(total)."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((start, n))
        start += n
    return out


def assign_nodes(placement: Placement, nodes: Sequence[str]) -> tuple[str, ...]:
    """Pick a node for every actor (by index). Greedy and deterministic: each actor goes to the node
    holding the fewest copies of its experts (for its layers), then the fewest actors, then the
    earliest in `nodes`. With at least R nodes, no two copies of an expert share a node."""
    if not nodes:
        raise ValueError("no nodes to place expert actors on")
    held: dict[str, set[tuple[int, int]]] = {n: set() for n in nodes}  # node → (layer, expert) copies
    load = {n: 0 for n in nodes}
    out = []
    for a in placement.actors:
        keys = {(layer, e) for layer in a.layers for e in a.experts}
        node = min(nodes, key=lambda n: (len(held[n] & keys), load[n], nodes.index(n)))
        held[node] |= keys
        load[node] += 1
        out.append(node)
    return tuple(out)
