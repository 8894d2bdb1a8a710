"""The startup placement: the first Plan of a pool (which actor hosts which experts of which
layers), and which node hosts each actor.

Pure functions over integers and node names (no Ray), so tests check every corner without a
cluster; actors/actor_group.py enforces the result with a Ray placement group. Later plans are
the planner's (actors/planner.py); all are one model, actors/plan.py's `Plan`.

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

from typing import Sequence

from .plan import ActorSlots, Plan


def plan_placement(num_experts: int, num_layers: int, num_actors: int | None = None, replicas: int = 1,
                   experts_per_actor: int | None = None, layer_groups: int = 1) -> Plan:
    """Map E experts (with R copies each) of L layers onto actors: plan version 0, each actor
    holding its run of experts in every layer of its group, with as many slots as it holds, on no
    particular node ("").

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
    actors = [ActorSlots(g * len(runs) + i, "", len(run), layers,
                         tuple(run if layer in layers else () for layer in range(num_layers)))
              for g, layers in enumerate(groups) for i, run in enumerate(runs)]
    return Plan(num_layers, num_experts, tuple(actors))


def _runs(total: int, parts: int) -> list[tuple[int, int]]:
    """(start, length) of `parts` contiguous near-equal runs covering range(total)."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((start, n))
        start += n
    return out


def assign_nodes(plan: Plan, nodes: Sequence[str]) -> tuple[str, ...]:
    """Pick a node for every actor (in `plan.actors` order). Greedy and deterministic: each actor goes to the node
    holding the fewest copies of its experts (for its layers), then the fewest actors, then the
    earliest in `nodes`. With at least R nodes, no two copies of an expert share a node."""
    if not nodes:
        raise ValueError("no nodes to place expert actors on")
    held: dict[str, set[tuple[int, int]]] = {n: set() for n in nodes}  # node → (layer, expert) copies
    load = {n: 0 for n in nodes}
    out = []
    for a in plan.actors:
        keys = {(layer, e) for layer in a.layers for e in a.experts[layer]}
        node = min(nodes, key=lambda n: (len(held[n] & keys), load[n], nodes.index(n)))
        held[node] |= keys
        load[node] += 1
        out.append(node)
    return tuple(out)
