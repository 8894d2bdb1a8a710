"""The shared expert pool's host (actors/pool_host.py) on a real single-node Ray: it can die and come
back without costing a generation or reloading weights, and a redeploy with other settings retires
the old pool (actors and placement group) instead of leaking it."""

from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # the pool host killed under load, pools retired: ~40 s

from raymoe.actors.pool import PoolConfig, named_pools  # noqa: E402
from raymoe.actors.pool_host import NAMESPACE, host_name, pool_host, release_shared_pool, shared_pool  # noqa: E402
from raymoe.actors.remote_experts import remote_experts_factory  # noqa: E402
from expert_helpers import assert_same_generation, generate, reference, write_checkpoint  # noqa: E402
import shared_ray  # noqa: E402
from raymoe.model.weights import load_model  # noqa: E402

APP = "pooltest"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("pool-host") / "ckpt").resolve())


@pytest.fixture(scope="module")
def cluster():
    shared_ray.connect()  # the session's instance (tests/shared_ray.py); it outlives the module
    yield
    release_shared_pool(APP)


def config(**kw) -> PoolConfig:
    return PoolConfig(**{"num_actors": 2, "num_cpus": 0.25, "call_timeout_s": 60, **kw})


def actor_ids(pool) -> list[str]:
    return [a._actor_id.hex() for a in pool.actors]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)


def test_same_settings_share_one_pool_and_timeouts_do_not_split_it(cluster, ckpt):
    a = shared_pool(ckpt, config(), APP)
    b = shared_pool(ckpt, config(call_timeout_s=5, start_timeout_s=30), APP)
    assert actor_ids(a) == actor_ids(b)
    assert len(named_pools(f"{APP}-experts-")) == 1


def test_killing_the_host_under_load_costs_nothing(cluster, ckpt):
    """The host dies while a generation runs on its pool: the generation finishes with the reference
    output, Ray restarts the host, and the restarted host hands out the same actors (no reload)."""
    pool = shared_pool(ckpt, config(), APP)
    want = reference(ckpt)
    model = load_model(ckpt, experts_factory=remote_experts_factory(pool))
    host = ray.get_actor(host_name(APP), namespace=NAMESPACE)
    results, stop = [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(generate(model))

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(0.5)
    ray.kill(host, no_restart=False)  # a crash: Ray restarts it
    before = len(results)
    deadline = time.monotonic() + 120  # generations go on meanwhile (slower on a loaded machine)
    while len(results) < max(3, before + 2) and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    worker.join(120)
    assert len(results) >= 3
    for got in results:
        assert_same_generation(got, want)
    again = shared_pool(ckpt, config(), APP)  # answered by the restarted host process
    assert actor_ids(again) == actor_ids(pool)
    assert not any(s["reconstructed"] for s in ray.get([a.stats.remote() for a in again.actors]))


def test_a_restarted_host_keeps_a_changed_placement(cluster, ckpt):
    """After a live change (2 → 3 actors), a host crash: the restarted host attaches to the changed
    placement (published in Ray's KV store), not to the startup one, and it still computes right."""
    shared_pool(ckpt, config(), APP)
    change = ray.get(pool_host(APP).scale.remote(3), timeout=120)
    assert change["started"] == [2] and change["version"] == 1
    ray.kill(pool_host(APP), no_restart=False)
    again = shared_pool(ckpt, config(), APP)  # the restarted host process
    assert again.plan.version == 1 and len(again.plan.actors) == 3
    report = ray.get(pool_host(APP).placement.remote(), timeout=60)
    assert report["version"] == 1 and [h["kind"] for h in report["history"]][-1] == "scale"
    assert all(a["state"] == "ALIVE" for a in report["actors"])
    model = load_model(ckpt, experts_factory=remote_experts_factory(again))
    assert_same_generation(generate(model), reference(ckpt))


def test_redeploy_with_other_settings_retires_the_old_pool(cluster, ckpt):
    """A replica asking for another pool gets it; the old one (left by an earlier host process, so only
    found by name) is removed after the retirement delay: no actor or placement group leaks."""
    old = shared_pool(ckpt, config(), APP)
    old_name = named_pools(f"{APP}-experts-")
    assert len(old_name) == 1
    ray.kill(pool_host(APP), no_restart=True)  # an earlier host process, gone for good
    wait_until(lambda: pool_host(APP) is None, 30, "the old host is gone")
    new = shared_pool(ckpt, config(num_actors=1), APP, retire_after_s=1.0)
    assert len(new.actors) == 1 and set(actor_ids(new)).isdisjoint(actor_ids(old))
    wait_until(lambda: named_pools(f"{APP}-experts-") == {new.name}, 30, "the old pool is removed")
    state = {pg["name"]: pg["state"] for pg in ray.util.placement_group_table().values()}
    assert state[f"{next(iter(old_name))}/pg"] == "REMOVED"
    model = load_model(ckpt, experts_factory=remote_experts_factory(new))
    assert_same_generation(generate(model), reference(ckpt))  # the new pool serves


def test_an_actor_scaled_away_and_back_is_a_new_actor_to_every_copy(cluster, ckpt):
    """2 → 3 → 2 → 3 actors under use: the third id comes back as another actor (the first was
    killed), and a copy of the pool (what each front replica holds) computes through the new one,
    not through the killed one's handle (before: every call failed from then on)."""
    app = APP + "-rescale"
    try:
        pool = shared_pool(ckpt, config(), app)
        model = load_model(ckpt, experts_factory=remote_experts_factory(pool))
        want = reference(ckpt)
        assert_same_generation(generate(model), want)  # in use: the copy follows its creator from now on
        for n in (3, 2, 3):
            version = ray.get(pool_host(app).scale.remote(n), timeout=120)["version"]
            wait_until(lambda: pool.plan.version == version, 30, f"the copy follows the change to {n} actors")
            assert_same_generation(generate(model), want)
    finally:
        release_shared_pool(app)
