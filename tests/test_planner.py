"""The expert planner (actors/planner.py), without Ray: copies follow the load, few moves, nodes apart."""

import itertools
import random

import pytest

from raymoe.actors.placement import plan_placement
from raymoe.actors.plan import ActorSlots, Plan, diff, imbalance, layer_loads, with_nodes
from raymoe.actors.planner import copy_counts, rebalance, replace, scale


def static(num_experts=8, num_layers=2, actors=4, slots=None, nodes=None):
    """Today's startup placement as a plan, optionally with more slots per actor than it fills."""
    plan = plan_placement(num_experts, num_layers, actors)
    if nodes is not None:
        plan = with_nodes(plan, dict(enumerate(nodes)))
    if slots:
        plan = Plan(plan.num_layers, plan.num_experts,
                    tuple(ActorSlots(a.id, a.node, slots, a.layers, a.experts) for a in plan.actors))
    return plan


def peak(plan, load):
    return sum(max(row) for row in layer_loads(plan, load))


def skewed(num_layers=2, num_experts=8, hot=(0,), factor=20.0):
    return [[factor if e in hot else 1.0 for e in range(num_experts)] for _ in range(num_layers)]


def test_a_uniform_load_moves_nothing():
    plan = static()
    new = rebalance(plan, [[10.0] * 8, [10.0] * 8])
    assert new == plan and new.version == plan.version
    assert diff(plan, new).moves == 0


def test_a_zero_load_is_uniform():
    plan = static()
    assert rebalance(plan, [[0.0] * 8] * 2) == plan


def test_a_hot_expert_gets_copies_on_spare_slots_and_the_peak_drops():
    plan = static(slots=3)
    load = skewed(hot=(0,), factor=12.0)
    new = rebalance(plan, load)
    assert new.version == plan.version + 1
    for layer in range(2):
        assert new.copies(layer)[0] >= 2
        assert all(n >= 1 for n in new.copies(layer))
    assert imbalance(new, load) < imbalance(plan, load)
    assert imbalance(new, load) < 1.25
    assert rebalance(new, load) == new  # a balanced plan is a fixed point: no churn


def test_without_spare_slots_hot_experts_are_spread_over_actors():
    plan = static(actors=4)  # 2 experts per actor, no spare slot
    load = [[9, 8, 1, 1, 1, 1, 1, 1]] * 2  # the two hot experts start on the same actor
    new = rebalance(plan, load)
    for layer in range(2):
        owners = new.owners(layer)
        assert set(owners[0]).isdisjoint(owners[1])
        assert new.copies(layer) == (1,) * 8
    assert peak(new, load) < peak(plan, load)


def test_scaling_up_gives_the_new_actors_work_and_moves_only_what_they_take():
    plan = static(actors=2)  # 4 experts each
    new = scale(plan, 4)
    assert [a.id for a in new.actors] == [0, 1, 2, 3]
    assert all(new.actors[i].experts[0] for i in range(4))
    assert new.copies(0) == (1,) * 8
    d = diff(plan, new)
    assert d.started == (2, 3) and d.stopped == ()
    assert d.moves == 4 * 2  # 2 experts per new actor, in both layers; nothing else moves


def test_scaling_down_moves_only_the_stopped_actors_experts():
    plan = static(actors=4)
    new = scale(plan, 2)
    d = diff(plan, new)
    assert d.stopped == (2, 3)
    assert d.moves == 4 * 2  # the 4 experts of actors 2 and 3, in 2 layers
    assert all(a.slots == 4 for a in new.actors)
    for a in new.actors:  # what the survivors held, they still hold
        assert set(plan.actor(a.id).experts[0]) <= set(a.experts[0])


def test_a_dead_actor_is_replaced_by_a_new_one_holding_its_experts():
    plan = static(actors=4)  # 2 experts each, in both layers
    new = replace(plan, [1])
    assert [a.id for a in new.actors] == [0, 2, 3, 4] and new.version == plan.version + 1
    assert new.actor(4).experts == plan.actor(1).experts and new.actor(4).node == ""
    for i in (0, 2, 3):  # nothing else moves
        assert new.actor(i).experts == plan.actor(i).experts
    d = diff(plan, new)
    assert d.started == (4,) and d.stopped == (1,) and d.moves == 2 * 2
    grouped = plan_placement(8, 4, 4, layer_groups=2)  # layer groups: same layers, own group
    dead = grouped.actors[0]
    again = replace(grouped, [dead.id])
    assert again.actors[-1].layers == dead.layers and again.actors[-1].experts == dead.experts
    with pytest.raises(ValueError, match="no actor"):
        replace(plan, [9])


def test_copies_of_an_expert_go_to_different_nodes():
    nodes = ["n0", "n0", "n1", "n1"]
    plan = static(actors=4, slots=4, nodes=nodes)
    load = skewed(hot=(0, 1), factor=30.0)
    new = rebalance(plan, load)
    for layer in range(2):
        for e in (0, 1):
            owners = new.owners(layer)[e]
            assert len(owners) >= 2
            assert len({new.actor(a).node for a in owners}) == min(len(owners), 2)  # as apart as the nodes allow


@pytest.mark.parametrize("seed", range(30))
def test_random_loads_never_raise_the_peak_and_stay_valid(seed):
    rng = random.Random(seed)
    experts, actors = rng.choice([(4, 2), (8, 4), (8, 3), (6, 6), (16, 4)])
    plan = static(num_experts=experts, actors=actors, slots=-(-experts // actors) + rng.choice([0, 1, 2]))
    load = [[rng.paretovariate(1.2) if rng.random() < 0.8 else 0.0 for _ in range(experts)] for _ in range(2)]
    new = rebalance(plan, load)
    assert not new.missing()
    assert all(len(a.experts[layer]) <= a.slots for a in new.actors for layer in a.layers)
    assert peak(new, load) <= peak(plan, load) + 1e-9


def brute_force_peak(num_experts, actors, slots, load):
    """The best max actor load over every way to give each expert 1..actors copies within the slots."""
    best = float("inf")
    subsets = [c for k in range(1, slots + 1) for c in itertools.combinations(range(num_experts), k)]
    for choice in itertools.product(subsets, repeat=actors):
        copies = [sum(e in c for c in choice) for e in range(num_experts)]
        if min(copies) == 0:
            continue
        best = min(best, max(sum(load[e] / copies[e] for e in c) for c in choice))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_close_to_the_best_possible_on_small_cases(seed):
    rng = random.Random(100 + seed)
    experts, actors, slots = rng.choice([(4, 2, 3), (4, 3, 2), (5, 2, 3), (3, 3, 2)])
    plan = static(num_experts=experts, num_layers=1, actors=min(actors, experts), slots=slots)
    load = [[rng.choice([0, 1, 2, 5, 20]) + rng.random() for _ in range(experts)]]
    best = brute_force_peak(experts, len(plan.actors), slots, load[0])
    got = peak(rebalance(plan, load, min_gain=0.0), load)
    assert got <= 1.34 * best + 1e-9  # bin packing is hard; greedy plus local search stays near


def test_copy_counts_replicate_only_what_one_actor_cannot_carry():
    assert copy_counts([1, 1, 1, 1], [2, 2, 2]) == [1, 1, 1, 1]  # spare slots, nothing hot
    assert copy_counts([10, 1, 1, 1], [2, 2, 2]) == [3, 1, 1, 1]  # capped at one copy per actor
    assert copy_counts([4, 4, 0, 0], [4, 4], min_copies=2) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="cannot hold"):
        copy_counts([1] * 5, [2, 2])


def test_degenerate_inputs():
    single = static(num_experts=1, num_layers=1, actors=1)
    assert rebalance(single, [[0.0]]) == single
    assert rebalance(single, [[5.0]], min_copies=3) == single  # copies capped at the actors
    with pytest.raises(ValueError, match="non-negative"):
        rebalance(static(), [[float("nan")] * 8] * 2)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance(static(), [[-1.0] * 8] * 2)
    with pytest.raises(ValueError, match=r"\[layers=2\]\[experts=8\]"):
        rebalance(static(), [[1.0] * 7] * 2)
    with pytest.raises(ValueError, match="at least one actor"):
        scale(static(), 0)
    grouped = plan_placement(8, 2, 2, layer_groups=2)
    with pytest.raises(ValueError, match="layer groups"):
        scale(grouped, 3)
    assert rebalance(grouped, skewed(factor=5.0)).missing() == ()
    many = scale(static(), 12)  # more actors than experts: the hottest get copies, every actor holds one
    assert all(a.experts[0] for a in many.actors) and sum(many.copies(0)) >= 12
    one = scale(static(), 1)  # every expert on the one actor left
    assert one.actors[0].experts[0] == tuple(range(8)) and one.actors[0].slots == 8
