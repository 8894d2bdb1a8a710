"""actors.placement (the startup plan, pure) and the replica split of RemoteExperts.assign, without Ray."""

from __future__ import annotations

import collections
import types

import pytest
import torch

from raymoe.actors.live_plan import layer_route
from raymoe.actors.placement import assign_nodes, plan_placement
from raymoe.actors.plan import ranges
from raymoe.actors.remote_experts import RemoteExperts, split_by_load


def held(a):
    """The experts a startup actor holds, the same in every layer it serves."""
    assert len({a.experts[layer] for layer in a.layers}) == 1
    assert all(not ex for layer, ex in enumerate(a.experts) if layer not in a.layers)
    return a.experts[a.layers[0]]


def copies(p, layer=0):
    return collections.Counter(e for a in p.serving(layer) for e in held(a))


@pytest.mark.parametrize("experts,actors,replicas", [(8, 1, 1), (8, 2, 1), (8, 3, 1), (8, 5, 1), (8, 8, 1),
                                                     (8, 3, 2), (8, 4, 2), (6, 4, 3), (7, 7, 7), (8, 16, 2)])
def test_every_expert_has_replicas_copies_on_distinct_actors(experts, actors, replicas):
    p = plan_placement(experts, 4, actors, replicas=replicas)
    assert len(p.actors) == actors
    assert copies(p) == {e: replicas for e in range(experts)}
    for a in p.actors:
        assert len(set(held(a))) == len(held(a)) > 0  # never the same expert twice on one actor
        assert a.layers == (0, 1, 2, 3)
    sizes = [len(held(a)) for a in p.actors]
    assert max(sizes) - min(sizes) <= 1  # balanced even when actors do not divide experts
    for e, owners in enumerate(p.owners(2)):
        assert len(set(owners)) == replicas and all(e in held(p.actors[o]) for o in owners)


def test_non_dividing_split_and_names():
    p = plan_placement(8, 32, 3)
    assert [held(a) for a in p.actors] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert [a.label for a in p.actors] == ["experts[0-2]@layers[0-31]", "experts[3-5]@layers[0-31]",
                                          "experts[6-7]@layers[0-31]"]
    assert plan_placement(8, 4, 3, replicas=2).actors[1].label == "experts[0-2,6-7]@layers[0-3]"
    assert ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8" and ranges([3]) == "3"


def test_experts_per_actor_derives_or_checks_the_actor_count():
    p = plan_placement(8, 2, experts_per_actor=3)
    assert [len(held(a)) for a in p.actors] == [3, 3, 2]
    assert len(plan_placement(8, 2, experts_per_actor=4, replicas=2).actors) == 4
    assert len(plan_placement(8, 2, 5, experts_per_actor=2).actors) == 5
    with pytest.raises(ValueError, match="cannot hold"):
        plan_placement(8, 2, 2, experts_per_actor=3)


def test_layer_groups_give_each_group_its_own_actors():
    p = plan_placement(8, 5, 2, layer_groups=2)
    assert [(held(a), a.layers) for a in p.actors] == [
        ((0, 1, 2, 3), (0, 1, 2)), ((4, 5, 6, 7), (0, 1, 2)), ((0, 1, 2, 3), (3, 4)), ((4, 5, 6, 7), (3, 4))]
    assert [a.id for a in p.serving(3)] == [2, 3]
    assert p.owners(4)[5] == (3,)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_actors=0), "at least 1"), (dict(num_actors=2, replicas=3), "need at least 3 actors"),
    (dict(num_actors=9), "leave an actor empty"), (dict(num_actors=2, replicas=0), "replicas"),
    (dict(num_actors=2, layer_groups=5), "layer_groups"), (dict(), "give num_actors"),
    (dict(experts_per_actor=9), "experts_per_actor")])
def test_impossible_requests_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_placement(8, 4, **kwargs)


def test_assign_nodes_keeps_replicas_apart_and_balances():
    p = plan_placement(8, 4, 4, replicas=2)  # actors 0,2 hold experts 0-3; 1,3 hold 4-7
    nodes = assign_nodes(p, ["a", "b"])
    assert nodes == ("a", "b", "b", "a")  # each node: one copy of every expert
    for owners in p.owners(0):
        assert len({nodes[o] for o in owners}) == 2
    assert assign_nodes(plan_placement(8, 4, 6), ["a", "b", "c"]) == ("a", "b", "c", "a", "b", "c")
    assert assign_nodes(plan_placement(8, 4, 3), ["only"]) == ("only",) * 3
    with pytest.raises(ValueError):
        assign_nodes(p, [])


def fake_layer(placement, layer=0):
    pool = types.SimpleNamespace(route=lambda layer: layer_route(placement, layer),
                                 model_config=types.SimpleNamespace(num_local_experts=placement.num_experts))
    return RemoteExperts(layer, pool)


def test_replicated_expert_pairs_are_split_between_copies_by_load():
    p = plan_placement(4, 1, 2, replicas=2)  # both actors hold all four experts
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 2]])
    actor = fake_layer(p).assign(idx).reshape(idx.shape)
    for e, a in zip(idx.reshape(-1).tolist(), actor.reshape(-1).tolist()):
        assert e in held(p.actors[a])
    assert sorted(torch.bincount(actor.reshape(-1), minlength=2).tolist()) == [5, 5]  # 10 pairs, evenly
    per_expert = {e: actor.reshape(-1)[idx.reshape(-1) == e].tolist() for e in range(4)}
    assert sorted(per_expert[0]) == [0, 0, 1, 1]  # the hottest expert: half on each copy
    again = fake_layer(p).assign(idx).reshape(idx.shape)
    assert torch.equal(actor, again)  # deterministic


def test_copies_take_the_pairs_their_actors_have_room_for():
    # expert 0 only on actor 0, expert 1 on both: expert 1's pairs go to actor 1 first
    counts, owner, num = [6, 8], [[0, 0], [0, 1]], [1, 2]
    assert split_by_load(counts, owner, num) == [[6, 6], [1, 8]]  # actor 0: 6 + 1, actor 1: 7
    assert split_by_load([0, 0], owner, num) == [[0, 0], [0, 0]]
    owner3 = [[0, 1], [1, 2], [2, 0]]
    bounds = split_by_load([3, 5, 4], owner3, [2, 2, 2])  # a ring: greedy gets within one pair of even
    per_actor = collections.Counter()
    for e, (b0, b1) in enumerate(bounds):
        per_actor[owner3[e][0]] += b0
        per_actor[owner3[e][1]] += b1 - b0
    assert sum(per_actor.values()) == 12 and max(per_actor.values()) <= 5


def test_unreplicated_experts_go_to_their_only_owner():
    p = plan_placement(8, 2, 3)
    idx = torch.randint(0, 8, (50, 2))
    actor = fake_layer(p, 1).assign(idx)
    for e, a in zip(idx.reshape(-1).tolist(), actor.tolist()):
        assert e in held(p.actors[a])
