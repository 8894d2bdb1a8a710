"""Serving with the experts on Ray actors shared by the front replicas, over real gRPC on loopback."""

from __future__ import annotations

import time

import grpc
import pytest

from raymoe.cluster.client import completion_json
from raymoe.model.completion import complete
from raymoe.model.engine import Engine
from raymoe.model.sampling import SamplingParams
from raymoe.model.tokenizer import Tokenizer
from raymoe.model.weights import load_model
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server


# The second server (Ray transport, micro-batches) runs in the full suite only (slow: its own deployment).
@pytest.fixture(scope="module", params=[pytest.param(("direct", 0), id="direct"),
                                        pytest.param(("ray", 2), id="ray-2-micro-batches", marks=pytest.mark.slow)])
def remote_server(tiny_dir, request):
    """Two front replicas sharing three expert actors, reached over either transport (over Ray's,
    with each step split in two micro-batches, which CPU-only servers do not do by default)."""
    import ray

    with running_server(checkpoint=str(tiny_dir), expert_actors=3, expert_num_cpus=0.5,
                        expert_timeout_s=10, replicas=2, replica_num_cpus=0.5,
                        expert_transport=request.param[0], micro_batches=request.param[1]) as client:
        yield client, ray


def test_remote_experts_equal_in_process(remote_server, tiny_dir):
    client, _ = remote_server
    tok = Tokenizer(tiny_dir)
    engine = Engine(load_model(tiny_dir), kv_cache_tokens=1024)
    for prompt in ("The cluster sends", "123+456=", "Hello"):
        ref = complete(engine, tok, [tok.encode(prompt)], [SamplingParams(max_tokens=10, ignore_eos=True)])[0]
        got = completion_json(list(client.stream(pb.GenerateRequest(prompt=prompt, max_tokens=10, ignore_eos=True))))
        assert got["token_ids"] == ref.token_ids and got["text"] == ref.text
        assert got["logprobs"] == pytest.approx(ref.logprobs, abs=1e-5)


def test_concurrent_requests_equal_in_process(remote_server, tiny_dir):
    """Batched steps (split into two micro-batches on one of the servers): answers do not change."""
    import concurrent.futures

    client, _ = remote_server
    engine = Engine(load_model(tiny_dir), kv_cache_tokens=2048)
    prompts = [[1] + [(11 * i + 7 * j) % 500 + 3 for j in range(2 + i)] for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda ids: client.generate(pb.GenerateRequest(
            prompt_token_ids=ids, max_tokens=8, ignore_eos=True)), prompts))
    for ids, response in zip(prompts, got):
        ref = engine.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert list(response.token_ids) == ref.output_ids
        assert list(response.logprobs) == pytest.approx(ref.logprobs, abs=1e-5)


def test_model_info_reports_placement(remote_server):
    client, ray = remote_server
    from raymoe.actors.pool_host import pool_host

    # deploy() started the pool before Serve (prestart_pool); the replicas attached to that one
    assert len(ray.get(pool_host("raymoe").ping.remote())) == 1
    info = client.stub.ModelInfo(pb.ModelInfoRequest())
    assert len(info.expert_actors) == 3
    assert sorted(e for a in info.expert_actors for e in a.experts) == list(range(8))
    assert info.state == "READY" and not info.load_error
    for a in info.expert_actors:
        assert a.state == "ALIVE" and a.weight_bytes > 0 and list(a.layers) == [0, 1]
        assert a.name.startswith("experts[") and a.node_id
        assert a.load_bytes_read == a.load_total_bytes == a.weight_bytes and a.load_seconds > 0
    calls = info.expert_calls  # earlier tests generated on the answering replica or on the other one
    assert calls.transport in ("direct", "ray")
    if calls.layer_calls:
        assert 0 < calls.slowest_compute_seconds < calls.wall_seconds
    from raymoe.cli.status import render

    assert "layer calls" in render(info) or not calls.layer_calls


def test_an_actor_dead_for_good_is_replaced(remote_server, tiny_dir):
    """Last in the module. An expert actor killed for good (no restart): its experts have no other
    copy, so meanwhile a request waits (bounded) and fails UNAVAILABLE naming experts, never worse,
    and the server stays up; the pool host then starts a new actor with those experts, and the
    server answers as before."""
    client, ray = remote_server
    info = client.stub.ModelInfo(pb.ModelInfoRequest())
    victim = info.expert_actors[0]
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(victim.name + "#"))
    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
    ray.kill(handle, no_restart=True)
    from ray._private.state import actors

    deadline = time.monotonic() + 30  # ray.kill returns at once; a direct connection works until the process is gone
    while actors().get(handle._actor_id.hex(), {}).get("State") != "DEAD":
        assert time.monotonic() < deadline, "the killed actor never died"
        time.sleep(0.1)
    request = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=4, ignore_eos=True)
    try:  # before the replacement is in: UNAVAILABLE naming the experts; after it: the tokens
        client.generate(request, timeout=60, retries=0)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert "experts" in e.details() and "Traceback" not in e.details()
    assert list(client.stub.Tokenize(pb.TokenizeRequest(text="hi")).token_ids)
    t0 = time.monotonic()  # a dead actor's stats are awaited concurrently and bounded, never blocking
    client.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 90
    while True:
        states = {a.name: a.state for a in client.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).expert_actors}
        if victim.name not in states and len(states) == 3 and set(states.values()) == {"ALIVE"}:
            break
        assert time.monotonic() < deadline, f"the dead actor was not replaced: {states}"
        time.sleep(0.5)
    ref = Engine(load_model(tiny_dir), kv_cache_tokens=64).generate([[1, 2, 3]], SamplingParams(max_tokens=4,
                                                                                                ignore_eos=True))[0]
    for _ in range(2):  # both replicas follow the new placement
        assert list(client.generate(request, timeout=60, retries=0).token_ids) == ref.output_ids
    from grpc_health.v1 import health_pb2

    assert client.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
