"""The expert autoscaling policy (actors/autoscale.py) against a simple model of load, without Ray."""

import pytest

from raymoe.actors.autoscale import ExpertAutoscaler, actor_demand


def test_wanted_follows_the_total_busy_time():
    a = ExpertAutoscaler(1, 4, target_busy=0.5)
    assert a.wanted([0.9]) == 2 and a.wanted([0.5, 0.5]) == 2 and a.wanted([0.9, 0.9, 0.9]) == 4
    assert a.wanted([0.0, 0.0]) == 1 and a.wanted([1.0] * 8) == 4 and a.wanted([]) == 1


def test_changes_wait_for_their_delay_and_move_one_actor_at_a_time():
    a = ExpertAutoscaler(1, 4, target_busy=0.5, upscale_after_s=5, downscale_after_s=20)
    assert a.decide(0, 1, [1.0]) == 1  # wants 2, not yet
    assert a.decide(3, 1, [1.0]) == 1
    assert a.decide(5, 1, [1.0]) == 2  # 5 s of wanting more
    assert a.decide(6, 2, [1.0, 1.0]) == 2  # wants 4: the clock starts again
    assert a.decide(11, 2, [1.0, 1.0]) == 3
    assert a.decide(12, 3, [0.1, 0.1, 0.1]) == 3  # idle: downscale waits 20 s
    assert a.decide(25, 3, [0.1, 0.1, 0.1]) == 3
    assert a.decide(26, 3, [0.9, 0.1, 0.1]) == 3  # busy again: the wish is gone...
    assert a.decide(30, 3, [0.1, 0.1, 0.1]) == 3  # ...and starts over
    assert a.decide(50, 3, [0.1, 0.1, 0.1]) == 2


def test_a_simulated_load_scales_up_then_down():
    """A load of `work` actor-seconds per second: each actor absorbs up to 1; the policy should end
    near work / target and return to the minimum once the load stops."""
    a = ExpertAutoscaler(1, 6, target_busy=0.5, upscale_after_s=2, downscale_after_s=6)
    actors, t, history = 1, 0.0, []
    for work in [2.0] * 30 + [0.0] * 40:
        busy = [min(1.0, work / actors)] * actors
        actors = a.decide(t, actors, busy)
        history.append(actors)
        t += 1.0
    assert max(history) == 4  # 2 actor-seconds per second at 50% busy
    assert history[-1] == 1
    assert all(abs(x - y) <= 1 for x, y in zip(history, history[1:]))


def test_actor_demand_and_bad_bounds():
    before = {0: (10.0, 1.0, 0.0), 1: (10.0, 5.0, 3.0)}
    after = {0: (12.0, 2.0, 0.0), 1: (12.0, 0.5, 0.1), 2: (12.0, 0.1, 0.0)}  # actor 1 restarted; 2 is new
    assert actor_demand(before, after) == pytest.approx([0.5, 0.3])
    with pytest.raises(ValueError):
        ExpertAutoscaler(3, 2)
    with pytest.raises(ValueError):
        ExpertAutoscaler(1, 2, target_busy=0)


def test_queueing_asks_for_more_than_busy_time_alone():
    """Three front replicas keep one actor saturated: their calls compute side by side (summed busy
    time 1.5 s per second of wall time) and each waits 0.5 s per second behind its own previous
    micro-batch. The demand (3.0) asks for the actors that would serve it at the target; a reading
    capped at one busy actor would have asked for 2."""
    before, after = {0: (0.0, 0.0, 0.0)}, {0: (2.0, 3.0, 3.0)}
    demand = actor_demand(before, after)
    assert demand == [3.0]
    a = ExpertAutoscaler(1, 8, target_busy=0.5)
    assert a.wanted(demand) == 6 and a.wanted([min(1.0, d) for d in demand]) == 2
