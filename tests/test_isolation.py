"""One request never hurts another, through the real server (Ray Serve + gRPC on loopback).

While ordinary streams run, hostile or extreme requests arrive; each gets an answer or a
client-error status, and every ordinary stream ends with exactly the output it has alone.
The KV cache is small (1024 tokens) so that memory admission is exercised too.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

from raymoe.cluster.client import completion_json
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

NORMAL = [dict(prompt_token_ids=[1, 20 + i, 7, 99], max_tokens=40, ignore_eos=True,
               **({"temperature": 0.8, "top_p": 0.9, "seed": 100 + i} if i % 2 else {})) for i in range(8)]

EXTREME_OK = [  # answered normally
    dict(prompt="hi", temperature=1e-40, max_tokens=5),
    dict(prompt="hi", temperature=1e-7, top_p=1e-30, max_tokens=5),
    dict(prompt="hi", temperature=100.0, top_k=2**32 - 1, max_tokens=5),
    dict(prompt="hi", temperature=1.0, top_p=1e-30, top_k=1, max_tokens=5),
    dict(prompt="hi", temperature=0.5, seed=2**64 - 1, max_tokens=5),
    dict(prompt="hi", temperature=0.5, seed=0, logprobs=20, max_tokens=5),
    dict(prompt="hi", temperature=3.4e38 / 3.4e38 * 2.0, max_tokens=5),
]
EXTREME_BAD = [  # INVALID_ARGUMENT, naming the field
    (dict(prompt="hi", temperature=1e30), "temperature"),
    (dict(prompt="hi", temperature=float("inf")), "temperature"),
    (dict(prompt="hi", top_p=float("nan")), "top_p"),
    (dict(prompt="hi", logprobs=2**32 - 1), "logprobs"),
    (dict(prompt="hi", stop_token_ids=list(range(300_000))), "stop_token_ids"),
    (dict(prompt="hi", stop_token_ids=[1, 2**31 - 1]), "stop token id"),
    (dict(prompt="hi", stop=[f"s{i}" for i in range(20_000)]), "stop strings"),
    (dict(prompt="hi", stop=["x" * 100_000]), "stop string"),
    (dict(prompt="hi", max_tokens=2**31 - 1), "max_tokens"),
    (dict(prompt_token_ids=[1] * 5000), "prompt"),
]


@pytest.fixture(scope="module")
def server(tiny_dir):
    with running_server(checkpoint=str(tiny_dir), max_running=32, max_queue=64,
                        kv_cache_tokens=1024) as client:
        yield client


def assert_same_output(got: dict, want: dict) -> None:
    """The same tokens and text; logprobs to float32 precision (batch shapes change the summation order)."""
    assert {k: v for k, v in got.items() if k != "logprobs"} == {k: v for k, v in want.items() if k != "logprobs"}
    assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-4)


def stream_json(server, kw) -> dict:
    return completion_json(list(server.stream(pb.GenerateRequest(**kw), timeout=120)))


def test_hostile_requests_leave_running_streams_untouched(server):
    alone = [stream_json(server, kw) for kw in NORMAL]
    assert len({tuple(a["token_ids"]) for a in alone}) > 4  # varied, so the comparison means something
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        normal = [pool.submit(stream_json, server, kw) for kw in NORMAL]
        ok = [pool.submit(stream_json, server, kw) for kw in EXTREME_OK]
        bad = [(pool.submit(stream_json, server, kw), field) for kw, field in EXTREME_BAD]
        for future in ok:
            got = future.result()
            assert got["finish_reason"] in ("stop", "length") and got["token_ids"]
        for future, field in bad:
            with pytest.raises(grpc.RpcError) as err:
                future.result()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
            assert field in err.value.details() and "Traceback" not in err.value.details()
        for future, want in zip(normal, alone):
            assert_same_output(future.result(), want)
    assert server.health.Check(__import__("grpc_health.v1.health_pb2", fromlist=["x"]).HealthCheckRequest()).status == 1


def test_small_request_is_not_held_behind_large_ones(server):
    """Two requests asking for ~500 tokens each would reserve the whole 1024-token cache up front;
    with blocks taken as sequences grow, a small request sent after them finishes long before."""
    big = dict(prompt_token_ids=[1, 5, 6], max_tokens=500, ignore_eos=True)
    done: dict[str, float] = {}

    def run(name, kw):
        stream_json(server, kw)
        done[name] = time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, f"big{i}", big) for i in range(2)]
        time.sleep(0.3)  # both are running
        t0 = time.monotonic()
        pool.submit(run, "small", dict(prompt_token_ids=[1, 5], max_tokens=8, ignore_eos=True)).result()
        for f in futures:
            f.result()
    assert done["small"] < min(done["big0"], done["big1"])
    assert done["small"] - t0 < 0.5 * (min(done["big0"], done["big1"]) - t0)


def test_only_the_requests_own_faults_are_invalid_argument():
    """A remote error wrapping a ValueError (even our own InvalidRequest) is the server's fault:
    INTERNAL (HTTP 500), and its text (remote traceback, host, address) stays in the replica's log.
    Both doors classify with the one function, so each case is checked for both."""
    from ray.exceptions import RayTaskError

    from raymoe.actors.errors import ExpertsUnavailable
    from raymoe.cluster.failures import classify
    from raymoe.cluster.openai_request import http_error_for
    from raymoe.model.errors import InvalidRequest

    bad_field = classify(InvalidRequest("max_tokens is 9", "max_tokens"))
    assert (bad_field.grpc_code, bad_field.message) == (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens is 9")
    http = http_error_for(InvalidRequest("max_tokens is 9", "max_tokens"))
    assert (http.status, http.message, http.param) == (400, "max_tokens is 9", "max_tokens")
    assert classify(ExpertsUnavailable(1, [3], "actor(s) x: no answer")).grpc_code == grpc.StatusCode.UNAVAILABLE
    assert http_error_for(ExpertsUnavailable(1, [3], "actor(s) x: no answer")).status == 503
    for cause in (ValueError("bad"), InvalidRequest("bad", "x"), ExpertsUnavailable(0, [1], "gone")):
        remote = RayTaskError("forward", "Traceback (most recent call last):\n  host 10.1.2.3 ...",
                              cause).as_instanceof_cause()
        assert isinstance(remote, type(cause))
        failure = classify(remote)
        code, message = failure.grpc_code, failure.message
        assert code == grpc.StatusCode.INTERNAL and failure.http_status == 500
        assert "Traceback" not in message and "10.1.2.3" not in message and "bad" not in message
        assert http_error_for(remote).message == message
    failure = classify(ValueError("a plain ValueError is a bug, not the client's fault"))
    code, message = failure.grpc_code, failure.message
    assert code == grpc.StatusCode.INTERNAL and "client" not in message
