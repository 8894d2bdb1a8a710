"""Elastic experts under load, over real Serve + gRPC on loopback: the expert actors grow, are
rebalanced and shrink (raymoe.v1.Experts, as `raymoe experts` sends it) while 16 streams run on two
front replicas, and every stream ends with exactly the tokens of a run without any change."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import grpc
import pytest

from raymoe.cluster.client import completion_json
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

pytestmark = pytest.mark.slow  # scaling under 16 streams: ~30 s

STREAMS = [dict(prompt_token_ids=[1, 40 + i, 9, 77], max_tokens=250, ignore_eos=True) for i in range(16)]


@pytest.fixture(scope="module")
def server(tiny_dir):
    with running_server(checkpoint=str(tiny_dir), expert_actors=2, expert_slots=5,
                        expert_num_cpus=0.25, replicas=2, replica_num_cpus=0.5, max_running=32,
                        stream_interval_ms=0) as client:
        yield client


def run_all(client) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(len(STREAMS)) as pool:
        return list(pool.map(lambda kw: completion_json(list(client.stream(pb.GenerateRequest(**kw), timeout=300,
                                                                           retries=0))), STREAMS))


def test_scale_and_rebalance_under_streaming_load_lose_nothing(server):
    want = run_all(server)
    changes, errors = [], []

    def operate():
        try:
            time.sleep(1.0)
            for step in (lambda: server.scale_experts(3), server.rebalance_experts, lambda: server.scale_experts(2)):
                t0 = time.monotonic()
                changes.append((step(), time.monotonic() - t0))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    operator = threading.Thread(target=operate)
    operator.start()
    got = run_all(server)
    operator.join(timeout=300)
    assert errors == []
    # every stream complete, with the tokens of the unchanged run (greedy); which actor sums an
    # expert's pairs changes float rounding (≈1e-7), not the tokens
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    assert [g["text"] for g in got] == [w["text"] for w in want]
    for g, w in zip(got, want):
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
    (up, up_s), (_, _), (down, down_s) = changes
    assert up.kind == "scale" and list(up.started) == [2] and up.version == up.from_version + 1
    assert list(down.stopped) == [2] and down.version > up.version
    assert up_s < 30 and down_s < 30  # seconds on 2 busy cores (the target, 5 s, is for the benchmark)
    placement = server.placement(timeout=30)
    assert placement.version == down.version and len(placement.actors) == 2
    assert [h.kind for h in placement.history] == ["scale", "rebalance", "scale"]
    print(f"scale 2→3 {up_s:.2f} s, 3→2 {down_s:.2f} s with 16 streams running")
    # every front replica follows the same placement: the actors ModelInfo lists come from the plan
    deadline = time.monotonic() + 10
    while True:
        seen = {len(server.model_info(timeout=10).expert_actors) for _ in range(6)}
        if seen == {2} or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert seen == {2}


def test_cli_shows_the_placement_and_refuses_bad_requests(server, capsys):
    from raymoe.cli.main import main

    target = f"127.0.0.1:{server.target.rsplit(':', 1)[1]}"
    assert main(["experts", "--target", target, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] >= 0 and data["actors"] and all(a["state"] == "ALIVE" for a in data["actors"])
    assert sorted({e for a in data["actors"] for layer in a["layers"] for e in layer["experts"]}) == list(range(8))
    assert main(["experts", "--target", target]) == 0
    assert "placement v" in capsys.readouterr().out
    assert main(["experts", "scale", "--target", target]) == 2
    assert "--actors" in capsys.readouterr().err
    with pytest.raises(grpc.RpcError) as err:
        server.scale_experts(0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
