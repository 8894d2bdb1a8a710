"""A front replica's death costs no stream: resumable generation over real Serve + gRPC on loopback.

Two front replicas share the work. A stream broken off by hand continues exactly with
resume_token_ids; SIGKILL of a replica while 16 streams run, and a redeploy whose old replicas get a
1-second grace period, end every stream with exactly the tokens of a fault-free run, because the
project's client resumes broken streams on the surviving (or new) replicas.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import time

import grpc
import pytest

from raymoe.cluster.client import Client, completion_json
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

pytestmark = pytest.mark.slow  # 16 long streams, three times, with a replica killed and a redeploy: ~1.5 min

STREAMS = [dict(prompt_token_ids=[1, 30 + i, 7, 99], max_tokens=900, ignore_eos=True,
                **({"temperature": 0.8, "top_p": 0.9, "seed": 500 + i} if i % 2 else {})) for i in range(16)]


@pytest.fixture(scope="module")
def server(tiny_dir):
    with running_server(checkpoint=str(tiny_dir), replicas=2, replica_num_cpus=0.5,
                        max_running=32, graceful_shutdown_s=1.0, stream_interval_ms=0) as client:
        yield client


@pytest.fixture(scope="module")
def reference(server):
    """The same 16 streams, fault-free (test_serving checks that concurrent streams equal each alone;
    greedy and seeded sampling depend only on (seed, position))."""
    want = run_all(server)
    assert server.resumptions == 0
    return want


def replica_pids() -> list[int]:
    from ray._private.state import actors

    return [a["Pid"] for a in actors().values()
            if a["ActorClassName"].startswith("ServeReplica") and a["State"] == "ALIVE"]


def run_all(server: Client) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(len(STREAMS)) as pool:
        return list(pool.map(lambda kw: completion_json(list(server.stream(pb.GenerateRequest(**kw), timeout=180))),
                             STREAMS))


def wait_for_replicas(n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while len(replica_pids()) != n:
        assert time.monotonic() < deadline, f"{len(replica_pids())} replicas, waiting for {n}"
        time.sleep(0.5)


def test_a_stream_continues_exactly_from_the_tokens_delivered(server, reference):
    """By hand, as any gRPC client can: take part of a stream, then ask for the rest."""
    for kw, want in zip(STREAMS[:2], reference[:2]):
        first = []
        for chunk in server.stub.GenerateStream(pb.GenerateRequest(**kw)):
            first.append(chunk)
            if sum(len(c.token_ids) for c in first) >= 40:
                break  # the caller walks away: the stream is cancelled
        got = completion_json(first)
        seed = first[0].seed
        assert first[0].HasField("seed") and (kw.get("seed") is None or seed == kw["seed"])
        rest = list(server.stub.GenerateStream(pb.GenerateRequest(
            **kw, resume_token_ids=got["token_ids"], resume_text_bytes=len(got["text"].encode()))))
        assert got["token_ids"] + [t for c in rest for t in c.token_ids] == want["token_ids"]
        assert rest[-1].usage.completion_tokens == len(want["token_ids"])  # resumed tokens counted once


def test_resume_fields_are_checked(server):
    bad = [(dict(resume_token_ids=[1] * 20, max_tokens=10), "resume_token_ids"),
           (dict(resume_token_ids=[99999]), "resume_token_ids"),
           (dict(resume_text_bytes=5), "resume_text_bytes"),
           (dict(resume_token_ids=[5, 6], resume_text_bytes=10_000), "resume_text_bytes"),
           (dict(resume_token_ids=[5, 6], temperature=0.7), "seed")]
    for kw, field in bad:
        with pytest.raises(grpc.RpcError) as err:
            list(server.stream(pb.GenerateRequest(prompt_token_ids=[1, 2, 3], **kw)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    assert server.resumptions == 0  # the request's own faults are never retried


def test_killed_replica_costs_no_stream(server, reference):
    wait_for_replicas(2)
    victim = replica_pids()[0]
    before = server.resumptions
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        results = pool.submit(run_all, server)
        time.sleep(1.0)  # every stream is running
        os.kill(victim, signal.SIGKILL)
        got = results.result()
    assert server.resumptions > before  # some streams did lose their replica
    for g, want in zip(got, reference):
        assert g["token_ids"] == want["token_ids"] and g["text"] == want["text"]
        assert g["finish_reason"] == "length"


def test_redeploy_costs_no_stream(server, reference, tiny_dir):
    """Serve replaces every replica; the old ones drain for 1 s, then the streams they still run are
    cut and resumed on the new ones."""
    from ray import serve

    from raymoe.cluster.app import build_app
    from raymoe.cluster.settings import APP_NAME, ServeSettings

    wait_for_replicas(2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        results = pool.submit(run_all, server)
        time.sleep(1.0)
        settings = ServeSettings(checkpoint=str(tiny_dir), replicas=2, replica_num_cpus=0.5, max_running=32,
                                 graceful_shutdown_s=1.0, stream_interval_ms=10)  # a changed setting: new replicas
        serve.run(build_app(settings.to_dict()), name=APP_NAME, route_prefix="/", blocking=False)
        got = results.result()
    for g, want in zip(got, reference):
        assert g["token_ids"] == want["token_ids"] and g["text"] == want["text"]
