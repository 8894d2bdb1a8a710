"""Live placement on a real Ray instance (actors/live.py): an expert pool grows, shrinks and
rebalances while layer calls keep coming from another thread, and every output stays what the
in-process experts compute; a restarted actor serves what it held last."""

from __future__ import annotations

import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # placement changes and kills under traffic: ~1 min

from raymoe.actors import live  # noqa: E402
from raymoe.actors.plan import diff  # noqa: E402
from raymoe.actors.pool import ExpertPool, PoolConfig  # noqa: E402
from raymoe.actors.remote_experts import RemoteExperts  # noqa: E402
from expert_helpers import write_checkpoint  # noqa: E402
import shared_ray  # noqa: E402
from test_expert_actors import local_layer, routed  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("live") / "ckpt")


@pytest.fixture(scope="module")
def cluster():
    shared_ray.connect()  # the session's instance (tests/shared_ray.py); it outlives the module


class Traffic:
    """Layer calls on a thread, each checked against the local experts, until stopped."""

    def __init__(self, pool, ckpt):
        self.pool, self.errors, self.calls = pool, [], 0
        cfg = pool.model_config
        self.cases = [(layer, routed(cfg, n, seed=n)) for layer in range(cfg.num_hidden_layers) for n in (3, 9, 17)]
        self.want = [local_layer(ckpt, layer)(*args) for layer, args in self.cases]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            for (layer, args), want in zip(self.cases, self.want):
                try:
                    torch.testing.assert_close(RemoteExperts(layer, self.pool)(*args), want, atol=1e-5, rtol=1e-5)
                    self.calls += 1
                except Exception as e:  # noqa: BLE001
                    self.errors.append(repr(e))

    def stop(self):
        self._stop.set()
        self.thread.join(timeout=120)


def actor_holds(pool):
    return {a.id: ray.get(pool.actors[a.id].stats.remote())["assignment"] for a in pool.plan.actors}


def test_scale_up_down_and_rebalance_under_traffic(cluster, ckpt):
    with ExpertPool(ckpt, PoolConfig(num_actors=2, num_cpus=0.25, call_timeout_s=60)) as pool:
        traffic = Traffic(pool, ckpt)
        try:
            time.sleep(0.5)
            up = live.scale_pool(pool, 4)
            assert up["version"] == 1 and up["started"] == [2, 3] and 8 <= up["moves"] <= 12  # the new ones' share
            assert len(pool.plan.actors) == 4 and all(a.experts[0] for a in pool.plan.actors)
            calls = traffic.calls
            time.sleep(0.5)
            assert traffic.calls > calls  # serving on the new placement
            down = live.scale_pool(pool, 3)
            assert down["stopped"] == [3] and pool.actors[3] is None
            again = live.rebalance_pool(pool)  # for the load of the traffic so far
            assert again["imbalance_after"] <= again["imbalance_before"] + 1e-9
        finally:
            traffic.stop()
        assert traffic.errors == [] and traffic.calls > 20
        # what each actor holds is what the plan says (copies dropped after the switch)
        for a in pool.plan.actors:
            held = actor_holds(pool)[a.id]
            assert {int(k): tuple(v) for k, v in held.items()} == {layer: a.experts[layer] for layer in a.layers}
        report = live.report(pool)
        assert report["version"] == pool.plan.version and len(report["actors"]) == 3
        assert [h["kind"] for h in report["history"]][:2] == ["scale", "scale"]
        assert all(a["state"] == "ALIVE" for a in report["actors"])


def test_a_hot_expert_is_replicated_and_the_load_follows(cluster, ckpt):
    # 2 actors with a spare slot each (5 slots, 4 experts): a hot expert can get a second copy
    with ExpertPool(ckpt, PoolConfig(num_actors=2, num_cpus=0.25, expert_slots=5)) as pool:
        cfg = pool.model_config
        x, w, _ = routed(cfg, 64, seed=1)
        idx = torch.stack([torch.zeros(64, dtype=torch.long), 1 + torch.arange(64) % 7], 1)  # expert 0 on every token
        for _ in range(3):
            for layer in range(cfg.num_hidden_layers):
                RemoteExperts(layer, pool)(x, w, idx)
        load = live.measured_load(pool, reset=False)
        assert load[0][0] == 3 * 64 and sum(load[0]) == 3 * 128
        entry = live.rebalance_pool(pool)
        assert pool.plan.copies(0)[0] == 2 and entry["imbalance_after"] < entry["imbalance_before"]
        out = RemoteExperts(0, pool)(x, w, idx)
        torch.testing.assert_close(out, local_layer(ckpt, 0)(x, w, idx), atol=1e-5, rtol=1e-5)
        before = [ray.get(pool.actors[i].stats.remote())["tokens"] for i in (0, 1)]
        RemoteExperts(0, pool)(x, w, idx)
        after = [ray.get(pool.actors[i].stats.remote())["tokens"] for i in (0, 1)]
        done = [b - a for a, b in zip(before, after)]
        assert sum(done) == 128 and max(done) == 64  # the hot expert's pairs split: an even step


def test_a_restarted_actor_serves_what_it_held_last(cluster, ckpt):
    with ExpertPool(ckpt, PoolConfig(num_actors=2, num_cpus=0.25, call_timeout_s=60)) as pool:
        old = pool.plan
        live.scale_pool(pool, 3)
        d = diff(old, pool.plan)
        changed = next(a for a in pool.plan.actors if a.id in (0, 1)
                       and a.experts[0] != old.actor(a.id).experts[0])
        ray.kill(pool.actors[changed.id], no_restart=False)
        cfg = pool.model_config
        args = routed(cfg, 20, seed=3)
        torch.testing.assert_close(RemoteExperts(1, pool)(*args), local_layer(ckpt, 1)(*args), atol=1e-5, rtol=1e-5)
        held = actor_holds(pool)[changed.id]
        assert tuple(held["0"]) == changed.experts[0] and d.moves > 0


def test_a_killed_copy_fails_over_at_once_and_comes_back(cluster, ckpt):
    """2 actors × 2 copies: SIGKILL one while calls run; its pairs go to the other copy (no wait for
    the restart), every output stays right, and the restarted actor serves again once it reloaded."""
    import os
    import signal

    with ExpertPool(ckpt, PoolConfig(num_actors=2, replicas=2, num_cpus=0.25, call_timeout_s=60)) as pool:
        traffic = Traffic(pool, ckpt)
        try:
            time.sleep(0.5)
            pid = ray.get(pool.actors[0].stats.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while not pool.metrics.failovers and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pool.metrics.failovers >= 1
            deadline = time.monotonic() + 60
            while pool.failover.down and time.monotonic() < deadline:  # restarted and reloaded: a copy again
                time.sleep(0.2)
            assert not pool.failover.down
            calls = traffic.calls
            time.sleep(0.5)
            assert traffic.calls > calls
        finally:
            traffic.stop()
        assert traffic.errors == []
        assert ray.get(pool.actors[0].stats.remote())["pid"] != pid
