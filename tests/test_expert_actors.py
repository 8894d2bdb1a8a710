"""Expert actors on a single-node Ray instance: numerics against LocalExperts and the in-process
engine, the split dispatch/result API, stats, the CLI, and faults (a killed actor costs no
generation; a dead one is named in a bounded time). Tests that kill actors come last."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from raymoe.actors.expert_actor import ExpertActor, from_wire, pack, unpack  # noqa: E402
from raymoe.actors.errors import ExpertsUnavailable  # noqa: E402
from raymoe.actors.pool import ExpertPool, PoolConfig  # noqa: E402
from raymoe.actors.remote_experts import RemoteExperts, remote_experts_factory  # noqa: E402
from expert_helpers import assert_same_generation, generate, reference, write_checkpoint  # noqa: E402
import shared_ray  # noqa: E402
from raymoe.model.moe import LocalExperts, route  # noqa: E402
from raymoe.model.weights import Checkpoint, load_model  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("experts") / "ckpt")


@pytest.fixture(scope="module")
def want(ckpt):
    return reference(ckpt)


@pytest.fixture(scope="module")
def cluster():
    shared_ray.connect()  # the session's instance (tests/shared_ray.py); it outlives the module


# The pool over Ray's transport runs in the full suite only (slow: a second pool of 6 actors).
@pytest.fixture(scope="module", params=["direct", pytest.param("ray", marks=pytest.mark.slow)])
def pool(cluster, ckpt, request):
    """3 actors (does not divide 8 experts) × 2 replicas: 16 copies as 6 + 5 + 5; every test that uses
    it runs over both transports (sockets, Ray's object store)."""
    with ExpertPool(ckpt, PoolConfig(num_actors=3, replicas=2, num_cpus=0.25, call_timeout_s=60,
                                     transport=request.param)) as p:
        yield p


def local_layer(ckpt, layer: int, dtype=torch.float32) -> LocalExperts:
    c = Checkpoint(ckpt)
    cfg = c.config
    experts = LocalExperts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size).to(dtype)
    w13, w2 = c.experts(layer, range(cfg.num_local_experts), dtype)
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
    return experts


def routed(cfg, tokens: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype)
    gate = torch.randn(cfg.num_local_experts, cfg.hidden_size, generator=g).to(dtype)
    weights, idx = route(x, gate, cfg.num_experts_per_tok)
    return x, weights, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_payload_round_trips_through_pack(dtype):
    x = torch.randn(5, 6).to(dtype)
    rows, experts, w = torch.tensor([0, 4, 4, 2]), torch.tensor([7, 1, 3, 0]), torch.rand(4)
    got = unpack(pack(x, rows, experts, w), dtype)
    for a, b in zip(got, (x, rows.int(), experts.int(), w)):
        assert torch.equal(a, b)


def test_actor_class_without_ray_sums_its_experts_per_token(ckpt):
    """The actor's math in-process: two actors' partial outputs add up to LocalExperts."""
    cfg = Checkpoint(ckpt).config
    x, w, idx = routed(cfg, 13, seed=1)
    halves = [ExpertActor(str(ckpt), ids, [1]) for ids in ([0, 1, 2, 3], [4, 5, 6, 7])]
    rows = torch.arange(13).repeat_interleave(2)
    total = torch.zeros_like(x)
    for actor in halves:
        mine = torch.isin(idx.reshape(-1), torch.tensor(actor.experts))
        total += from_wire(actor.forward(1, pack(x, rows[mine], idx.reshape(-1)[mine], w.reshape(-1)[mine])),
                           torch.float32)
    torch.testing.assert_close(total, local_layer(ckpt, 1)(x, w, idx), atol=1e-6, rtol=1e-5)
    assert halves[0].tokens + halves[1].tokens == 26


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_layer_output_matches_local_experts(pool, ckpt, tokens):
    cfg = pool.model_config
    for layer in range(cfg.num_hidden_layers):
        x, w, idx = routed(cfg, tokens, seed=tokens + layer)
        got = RemoteExperts(layer, pool)(x, w, idx)
        torch.testing.assert_close(got, local_layer(ckpt, layer)(x, w, idx), atol=1e-6, rtol=1e-5)


def test_pairs_in_any_token_order_reach_the_right_rows(cluster, ckpt):
    """A failover resends pairs gathered from several actors, so their tokens may come out of order;
    an actor given every token of the call in another order must still compute each on its own row."""
    cfg = Checkpoint(ckpt).config
    x, _, _ = routed(cfg, 3, seed=5)
    experts, weights = [[4], [1], [6]], [[0.75], [1.0], [0.5]]
    with ExpertPool(ckpt, PoolConfig(num_actors=1, num_cpus=0.25, call_timeout_s=60)) as p:
        remote = RemoteExperts(0, p)
        for order in ([2, 0, 1], [1, 2, 0]):  # the pairs of tokens 2, 0, 1 (then 1, 2, 0), all to the one actor
            pair_experts = torch.tensor([experts[t][0] for t in order], dtype=torch.int32)
            got = remote.send_pairs(x, torch.tensor(order), pair_experts, torch.tensor([weights[t][0] for t in order]),
                                    x, 0.0).result()
            want = local_layer(ckpt, 0)(x, torch.tensor(weights), torch.tensor(experts))
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_dispatch_returns_at_once_and_results_come_in_any_order(pool, ckpt):
    cfg = pool.model_config
    calls = [(layer, *routed(cfg, 9, seed=40 + layer)) for layer in range(cfg.num_hidden_layers)]
    pending = [RemoteExperts(layer, pool).dispatch(x, w, idx) for layer, x, w, idx in calls]
    for (layer, x, w, idx), p in reversed(list(zip(calls, pending))):
        torch.testing.assert_close(p.result(), local_layer(ckpt, layer)(x, w, idx), atol=1e-6, rtol=1e-5)


def test_generation_matches_in_process_engine(pool, ckpt, want):
    model = load_model(ckpt, experts_factory=remote_experts_factory(pool))
    assert_same_generation(generate(model), want)


def test_stats_report_hosting_bytes_and_tokens(pool):
    cfg = pool.model_config
    before = pool.stats()
    RemoteExperts(1, pool)(*routed(cfg, 11, seed=7))
    after = pool.stats()
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size * 4  # w1, w3, w2 in fp32
    for spec, s in zip(pool.plan.actors, after):
        assert s["name"] == spec.label and s["experts"] == list(spec.experts[0]) and s["layers"] == [0, 1]
        assert spec.experts[1] == spec.experts[0]  # the startup plan: the same experts in every layer
        assert s["weight_bytes"] == per_expert * len(spec.experts[0]) * cfg.num_hidden_layers
        assert s["device"] == "cpu" and s["threads"] == 1 and s["node_id"]
    # every (token, expert) pair is computed exactly once, by one of its expert's replicas
    assert sum(a["tokens"] - b["tokens"] for a, b in zip(after, before)) == 11 * cfg.num_experts_per_tok


def test_bfloat16_travels_as_bit_patterns(cluster, ckpt):
    cfg = Checkpoint(ckpt).config
    x, w, idx = routed(cfg, 6, seed=3, dtype=torch.bfloat16)
    with ExpertPool(ckpt, PoolConfig(num_actors=1, num_cpus=0.25, dtype="bfloat16")) as p:
        got = RemoteExperts(0, p)(x, w, idx)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, local_layer(ckpt, 0, torch.bfloat16)(x, w, idx), atol=2e-2, rtol=2e-2)


def test_cli_run_with_expert_actors_prints_the_same_json(cluster, ckpt, capsys):
    from raymoe.cli.main import main

    argv = ["run", "--checkpoint", str(ckpt), "--prompt-ids", "1,17,42,99", "--max-tokens", "6",
            "--ignore-eos", "--json"]
    assert main(argv) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(argv + ["--expert-actors", "2", "--actor-cpus", "0.25"]) == 0
    captured = capsys.readouterr()
    remote = json.loads(captured.out)  # stdout: the one JSON object; progress went to stderr
    assert "raymoe: starting 2 expert actor(s)" in captured.err
    assert remote.pop("token_ids") == local.pop("token_ids")
    torch.testing.assert_close(torch.tensor(remote.pop("logprobs")), torch.tensor(local.pop("logprobs")),
                               atol=1e-5, rtol=0)
    assert remote == local
    assert ray.is_initialized()  # an existing connection is reused and left alone


def test_pool_that_cannot_be_placed_fails_fast_naming_experts(cluster, ckpt):
    t0 = time.monotonic()
    with pytest.raises(ExpertsUnavailable, match=r"experts \[0, 1, 2, 3, 4, 5, 6, 7\].*could not reserve"):
        ExpertPool(ckpt, PoolConfig(num_actors=2, resources={"no_such_host": 1}, start_timeout_s=2))
    assert time.monotonic() - t0 < 20


def test_actor_killed_mid_generation_is_restarted_and_the_call_retried(pool, ckpt, want):
    killed = []

    class KillingExperts(RemoteExperts):
        def dispatch(self, x, weights, idx):
            pending = super().dispatch(x, weights, idx)
            if len(killed) == 0 and self.layer == 1 and x.shape[0] == 3:  # a decode step, call in flight
                killed.append(pending.actors[0])
                ray.kill(self.pool.actors[pending.actors[0]], no_restart=False)
            return pending

    model = load_model(ckpt, experts_factory=lambda layer: KillingExperts(layer, pool))
    assert_same_generation(generate(model), want)
    assert killed
    stats = pool.stats()
    assert stats[killed[0]]["reconstructed"]  # Ray restarted it and it reloaded its experts
    assert not any(s["reconstructed"] for i, s in enumerate(stats) if i != killed[0])


def test_calls_in_flight_together_survive_a_restart(pool, ckpt):
    """Two layer calls on the same connections (as micro-batches make them), then the actor restarts:
    both are sent again to its successor and come back right, in either order."""
    cfg = pool.model_config
    calls = [(layer, *routed(cfg, 9, seed=60 + layer)) for layer in (0, 1)]
    pending = [RemoteExperts(layer, pool).dispatch(x, w, idx) for layer, x, w, idx in calls]
    ray.kill(pool.actors[0], no_restart=False)
    for (layer, x, w, idx), p in reversed(list(zip(calls, pending))):
        torch.testing.assert_close(p.result(), local_layer(ckpt, layer)(x, w, idx), atol=1e-6, rtol=1e-5)


def test_a_dead_copy_fails_over_and_an_expert_without_copies_is_named(pool, ckpt):
    """3 actors × 2 copies (experts 0-5 | 0-2,6,7 | 3-7): with actor 1 dead for good its pairs go to
    the other copies at once; with actor 2 dead too, experts 6 and 7 have no copy left and are named
    (only they, even while the live actor 0 is suspected: CI once saw all eight named so)."""
    cfg = pool.model_config
    deadline = time.monotonic() + 60
    while pool.failover.down and time.monotonic() < deadline:  # an actor restarted by an earlier test is back
        time.sleep(0.2)
    assert not pool.failover.down
    t0 = time.monotonic()  # the same calls without a fault: the pace of this machine now
    for seed in range(6):
        RemoteExperts(0, pool)(*routed(cfg, 16, seed=seed))
    healthy_s = time.monotonic() - t0
    ray.kill(pool.actors[1], no_restart=True)
    t0 = time.monotonic()
    for seed in range(6):
        args = routed(cfg, 16, seed=seed)
        torch.testing.assert_close(RemoteExperts(0, pool)(*args), local_layer(ckpt, 0)(*args), atol=1e-5, rtol=1e-5)
    # at once: at most 10 s more than without the fault (the call timeout is 60 s)
    assert time.monotonic() - t0 < healthy_s + 10 and pool.metrics.failovers >= 1
    ray.kill(pool.actors[2], no_restart=True)
    t0 = time.monotonic()
    wait_dead(pool.actors[2])  # ray.kill returns at once; on a loaded machine the process answers a while
    pool.suspect(0)  # as a busy machine can make it: a live copy merely suspected still holds experts 0-5
    with pytest.raises(ExpertsUnavailable) as err:
        for seed in range(20):  # until a call routes to the dead actor
            RemoteExperts(0, pool)(*routed(cfg, 16, seed=seed))
    assert time.monotonic() - t0 < 30
    # (the whole message on failure: which actors the call gave up on, and why)
    assert err.value.layer == 0 and err.value.experts == [6, 7], (str(err.value), pool.failover.down)
    assert pool.plan.actors[2].label in str(err.value)

@pytest.mark.parametrize("transport", ["direct", "ray"])
def test_a_copy_only_suspected_takes_the_pairs_when_the_other_dies(cluster, ckpt, transport):
    """2 actors, each with every expert. A is silent (stopped) and suspected, as a slow actor is under
    load; then B dies for good. A layer call must not fail: A is the copy left, so the call goes back
    to it and waits for it (it resumes 1.5 s later)."""
    import os
    import signal
    import threading

    with ExpertPool(ckpt, PoolConfig(num_actors=2, replicas=2, num_cpus=0.25, call_timeout_s=60,
                                     transport=transport)) as p:
        cfg = p.model_config
        args = routed(cfg, 12, seed=7)
        torch.testing.assert_close(RemoteExperts(0, p)(*args), local_layer(ckpt, 0)(*args), atol=1e-5, rtol=1e-5)
        pid = p.stats()[0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(1.5, os.kill, (pid, signal.SIGCONT))
        try:
            p.suspect(0)  # what a failover does after a silence (it cannot be cleared while A is stopped)
            ray.kill(p.actors[1], no_restart=True)
            wait_dead(p.actors[1])  # B is gone before the call
            resume.start()
            out = RemoteExperts(0, p)(*args)
        finally:
            resume.cancel()
            os.kill(pid, signal.SIGCONT)
        torch.testing.assert_close(out, local_layer(ckpt, 0)(*args), atol=1e-5, rtol=1e-5)


def wait_dead(actor, timeout_s: float = 30) -> None:
    """Until Ray reports `actor` dead (ray.kill returns before the process is gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=deadline - time.monotonic())
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            break
        time.sleep(0.05)
    raise AssertionError(f"{actor} still answers {timeout_s:g} s after ray.kill")


def test_forged_payloads_are_refused_before_any_kernel_and_the_actor_serves_on(ckpt):
    """Over the direct transport, as any peer holding the token could send them: a wrong size, a
    row or expert id out of range, a non-finite weight → the call's error; the next call is fine."""
    from raymoe.actors.direct import DirectChannel

    cfg = Checkpoint(ckpt).config
    actor = ExpertActor(str(ckpt), list(range(cfg.num_local_experts)), [1])
    x, w, idx = routed(cfg, 3, seed=2)
    rows, experts, weights = torch.arange(3).repeat_interleave(2), idx.reshape(-1), w.reshape(-1)
    good = pack(x, rows, experts, weights)
    forged = {"rows": pack(x, rows + 100, experts, weights),
              "expert id": pack(x, rows, experts - 100, weights),
              "weight": pack(x, rows, experts, weights * float("nan")),
              "does not hold": good[:-4]}
    channel = DirectChannel(actor.direct.endpoint(), timeout_s=5)
    try:
        for call_id, (what, payload) in enumerate(forged.items()):
            channel.send(call_id, 1, payload)
            with pytest.raises(RuntimeError, match="ValueError") as err:
                channel.recv(call_id, timeout_s=5)
            assert ("row" if what == "rows" else what) in str(err.value)
        channel.send(99, 1, good)
        got = from_wire(channel.recv(99, timeout_s=5)[0], torch.float32).view(3, -1)
        torch.testing.assert_close(got, local_layer(ckpt, 1)(x, w, idx), atol=1e-6, rtol=1e-5)
    finally:
        channel.close()


def test_with_several_torch_threads_every_call_computes_on_one_thread(ckpt):
    """Calls over two connections (two front replicas) and a Ray-style call compute on the actor's one
    compute thread (one OpenMP team: model/torch_threads.py), and give the same sums as before."""
    from raymoe.actors.direct import DirectChannel

    cfg = Checkpoint(ckpt).config
    threads = torch.get_num_threads()
    try:
        actor = ExpertActor(str(ckpt), list(range(cfg.num_local_experts)), [1], num_threads=2)
        computed_on = []
        compute = actor.compute
        actor.compute = lambda *a: computed_on.append(threading.current_thread().name) or compute(*a)
        x, w, idx = routed(cfg, 5, seed=3)
        payload = pack(x, torch.arange(5).repeat_interleave(2), idx.reshape(-1), w.reshape(-1))
        want = local_layer(ckpt, 1)(x, w, idx)
        channels = [DirectChannel(actor.direct.endpoint(), timeout_s=5) for _ in range(2)]
        try:
            for i, channel in enumerate(channels):
                channel.send(i, 1, payload)
            outs = [channel.recv(i, timeout_s=10)[0] for i, channel in enumerate(channels)]
        finally:
            for channel in channels:
                channel.close()
        outs.append(actor.forward(1, payload))
        for out in outs:
            torch.testing.assert_close(from_wire(out, torch.float32).view(5, -1), want, atol=1e-6, rtol=1e-5)
        assert len(computed_on) == 3 and len(set(computed_on)) == 1
        assert computed_on[0].startswith("raymoe-expert-compute")
    finally:
        torch.set_num_threads(threads)


def test_a_call_for_experts_the_actor_does_not_hold_names_them(ckpt):
    """Pairs routed to experts this actor does not hold (a stale route) are refused with their ids,
    before any kernel; the actor's load counts stay as they were."""
    cfg = Checkpoint(ckpt).config
    actor = ExpertActor(str(ckpt), [0, 1], [1])
    x, w, _ = routed(cfg, 3, seed=2)
    experts = torch.tensor([0, 2, 1, 3, 0, 1], dtype=torch.int32)
    payload = pack(x, torch.arange(3).repeat_interleave(2), experts, w.reshape(-1))
    with pytest.raises(ValueError, match=r"experts \[2, 3\] are not hosted here"):
        actor.forward(1, payload)
    assert actor.expert_load()[1] == [0] * cfg.num_local_experts
