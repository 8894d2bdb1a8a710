"""Experts spread over Ray nodes (ray.cluster_utils.Cluster: a head and two workers on this machine).

The driver (attention, routing, sampling) runs on the head, which offers no `expert_host`
resource, so every expert actor lands on a worker. Generations must equal the in-process engine
for several actor counts, one not dividing the 8 experts, and with replicas pinned to different
nodes. A worker lost mid-generation while another has room costs nothing (its actor restarts
there and the call is retried); `raymoe run --address` joins the cluster. Losing a node that holds
the only copies of some experts, with nowhere else for them to go, must end in ExpertsUnavailable
naming exactly those experts, in bounded time. Tests run in file order (the last two remove nodes).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a 3-node cluster, nodes lost: ~1.5 min

from bench.local_cluster import add_node, start_cluster  # noqa: E402

from raymoe.actors.errors import ExpertsUnavailable  # noqa: E402
from raymoe.actors.pool import ExpertPool, PoolConfig  # noqa: E402
from raymoe.actors.remote_experts import RemoteExperts, remote_experts_factory  # noqa: E402
from expert_helpers import PROMPTS, assert_same_generation, generate, reference, write_checkpoint  # noqa: E402
from raymoe.model.weights import load_model  # noqa: E402
import shared_ray  # noqa: E402

FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("multinode") / "ckpt", seed=5)


@pytest.fixture(scope="module")
def want(ckpt):
    return reference(ckpt)


@pytest.fixture(scope="module")
def cluster():
    shared_ray.leave()  # a cluster of its own: this process connects to it instead
    c = start_cluster({"num_cpus": 1, "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION})
    workers = [add_node(c, num_cpus=1, resources={"expert_host": 4}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    try:
        yield c, head, workers
    finally:
        ray.shutdown()
        c.shutdown()


def on_workers(pool: ExpertPool, head: str, workers) -> list[str]:
    nodes = [s["node_id"] for s in pool.stats()]
    assert head not in nodes
    assert set(nodes) <= {w.node_id for w in workers}
    return nodes


def kill(pid: int) -> None:
    """SIGKILL a worker process this test's cluster started (by pid, nothing else)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until_dead(node_id: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        assert time.monotonic() < deadline, "the removed node is still alive"
        time.sleep(0.2)


@pytest.mark.parametrize("num_actors,replicas,pin", [(2, 1, False), (3, 1, False), (4, 2, True)],
                         ids=["2-actors", "3-actors", "4-actors-2-replicas-pinned"])
def test_generation_over_worker_nodes_equals_in_process(cluster, ckpt, want, num_actors, replicas, pin):
    _, head, workers = cluster
    config = PoolConfig(num_actors=num_actors, replicas=replicas, num_cpus=0.25, resources={"expert_host": 1},
                        pin_nodes=pin, call_timeout_s=60)
    with ExpertPool(ckpt, config) as pool:
        nodes = on_workers(pool, head, workers)
        model = load_model(ckpt, experts_factory=remote_experts_factory(pool))
        assert_same_generation(generate(model), want)
        if pin:  # the two copies of every expert live on different nodes
            for owners in pool.plan.owners(0):
                assert len({nodes[a] for a in owners}) == 2
            assert list(pool.group.nodes) == nodes


@pytest.mark.parametrize("transport", ["direct", "ray"])
def test_node_lost_mid_generation_with_spare_capacity_costs_nothing(cluster, ckpt, want, transport):
    """A worker dies while a layer call is in flight; its actor restarts on a worker with room
    (unpinned bundles move), reloads its experts, the call is retried, and the output is unchanged.
    Over sockets the dead node closes nothing: the silence makes the caller ask Ray, which answers
    from the restarted actor with a new token."""
    c, head, workers = cluster
    workers.append(add_node(c, num_cpus=1, resources={"expert_host": 4}))  # the spare capacity
    c.wait_for_nodes()
    config = PoolConfig(num_actors=2, num_cpus=0.25, resources={"expert_host": 1}, call_timeout_s=60,
                        transport=transport)
    lost = []

    class NodeKillingExperts(RemoteExperts):
        def dispatch(self, x, weights, idx):
            pending = super().dispatch(x, weights, idx)
            if not lost and self.layer == 1 and x.shape[0] == len(PROMPTS):  # a decode step
                victim = pending.actors[0]
                lost.append(next(w for w in workers if w.node_id == nodes[victim]))
                c.remove_node(lost[0], allow_graceful=False)
                kill(pids[victim])  # the whole machine is gone: its workers die with the raylet
            return pending

    with ExpertPool(ckpt, config) as pool:
        nodes = on_workers(pool, head, workers)
        pids = [s["pid"] for s in pool.stats()]
        model = load_model(ckpt, experts_factory=lambda layer: NodeKillingExperts(layer, pool))
        assert_same_generation(generate(model), want)
        assert lost
        workers.remove(lost[0])  # later tests see the two live workers
        moved = on_workers(pool, head, workers)
        assert lost[0].node_id not in moved and any(s["reconstructed"] for s in pool.stats())


def test_cli_joins_the_cluster_with_address(cluster, ckpt, capsys):
    """`raymoe run --expert-actors 2 --address ADDR` from a process not yet connected: it joins,
    prints the in-process JSON, disconnects, and leaves the cluster running."""
    import json

    from raymoe.cli.main import main

    c, _, _ = cluster
    argv = ["run", "--checkpoint", str(ckpt), "--prompt-ids", "1,17,42,99", "--max-tokens", "5", "--json"]
    assert main(argv) == 0
    local = json.loads(capsys.readouterr().out)
    ray.shutdown()
    try:
        assert main(argv + ["--expert-actors", "2", "--actor-cpus", "0.25", "--address", c.address]) == 0
        # Ray itself prints cluster errors (here: the node lost earlier) to the driver's stdout;
        # the JSON object is the last line.
        remote = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert not ray.is_initialized()  # it disconnected what it connected
    finally:
        ray.init(address=c.address, log_to_driver=False)
    assert remote["token_ids"] == local["token_ids"]
    assert max(abs(a - b) for a, b in zip(remote["logprobs"], local["logprobs"])) <= 1e-5
    assert sum(n["Alive"] for n in ray.nodes()) == 3  # the cluster is still there


def test_lost_node_names_its_experts_in_bounded_time(cluster, ckpt, want):
    """Runs last: it removes a worker. Pinned bundles cannot move, so nothing else fits."""
    c, head, workers = cluster
    config = PoolConfig(num_actors=2, num_cpus=0.25, resources={"expert_host": 1}, pin_nodes=True,
                        call_timeout_s=10)
    with ExpertPool(ckpt, config) as pool:
        nodes = on_workers(pool, head, workers)
        model = load_model(ckpt, experts_factory=remote_experts_factory(pool))
        assert_same_generation(generate(model), want)
        lost = next(w for w in workers if w.node_id == nodes[1])
        c.remove_node(lost, allow_graceful=False)
        t0 = time.monotonic()
        wait_until_dead(lost.node_id)  # its worker processes may answer for a moment after the kill
        with pytest.raises(ExpertsUnavailable) as err:
            generate(model)
        assert time.monotonic() - t0 < 60
        assert err.value.experts == list(pool.plan.actors[1].experts[err.value.layer])  # only the lost node's experts
        assert pool.plan.actors[1].label in str(err.value)
