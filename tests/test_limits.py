"""Tenants and the limits a hostile client meets, through the real server (one expert actor, a
tenants file), each while ordinary streams run: their output must be exactly what it is alone,
and the server must stay healthy.

- keys name tenants: an unknown key is UNAUTHENTICATED / 401, health stays open, the file is
  reloaded when it changes; only an admin may use the Experts service, whose scale is bounded;
- quotas: max_concurrent (sequences over the server) and tokens_per_minute answer
  RESOURCE_EXHAUSTED / 429 with a retry-after, and unused tokens come back;

- a gRPC message over --max-message-bytes is refused by Serve's proxy (RESOURCE_EXHAUSTED);
- a huge list field is refused before it is copied, naming the field;
- an HTTP body past the cap is refused while it is still arriving (413), chunked or not; a
  content-length that is not a number and a 400-digit JSON number are 400s naming what is wrong;
- resumed requests replaying thousands of tokens that decode to nothing do not stall the event
  loop (a concurrent stream's inter-token gaps stay short);
- no path or address reaches a client: the model has its served name.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from raymoe.cluster.client import Client, completion_json
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

NORMAL = [dict(prompt_token_ids=[1, 30 + i, 7, 99], max_tokens=60, ignore_eos=True,
               **({"temperature": 0.8, "seed": 7 + i} if i % 2 else {})) for i in range(4)]
SERVED_NAME = "tiny-under-test"
MAX_MESSAGE = 1 << 20
TENANTS = """
tenants:
  - {name: calm, key: calm-key}
  - {name: flood, key: flood-key, max_concurrent: 4}
  - {name: metered, key: metered-key, tokens_per_minute: 1800}
  - {name: ops, key: ops-key, admin: true}
"""


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(TENANTS)
    return path


@pytest.fixture(scope="module")
def server(tiny_dir, tenants_file):
    """The calm tenant's client (`server.key(KEY)`: another tenant's)."""
    with running_server(checkpoint=str(tiny_dir), max_running=32, max_queue=64,
                        served_model_name=SERVED_NAME, max_message_bytes=MAX_MESSAGE, tenants_file=str(tenants_file),
                        expert_actors=1, expert_num_cpus=0.25) as anonymous:
        clients = {}

        def key(k: str) -> Client:
            if k not in clients:
                clients[k] = Client(anonymous.target, api_key=k)
                clients[k].http_port = anonymous.http_port
            return clients[k]

        calm = key("calm-key")
        calm.key, calm.anonymous = key, anonymous
        yield calm
        for c in clients.values():
            c.close()


def stream_json(server, kw, retries: int = 5) -> dict:
    return completion_json(list(server.stream(pb.GenerateRequest(**kw), timeout=120, retries=retries)))


def http_call(server, method: str, path: str, body=None, headers=None, chunks=None, key="calm-key",
              with_headers=False):
    """(status, JSON body) of an HTTP call with that tenant's key (None: no key); and its headers."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    headers = {**({"authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    try:
        if chunks is not None:
            conn.request(method, path, body=chunks, headers=headers, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            got = response.status, json.loads(raw or b"{}")
        except ValueError:  # refused by Serve's proxy itself (plain text)
            got = response.status, {"raw": raw.decode(errors="replace")}
        return (*got, dict(response.getheaders())) if with_headers else got
    finally:
        conn.close()


def hostile_calls(server) -> dict[str, object]:
    """Each hostile request → what the client saw (a status and its text)."""
    seen: dict[str, object] = {}

    def grpc_code(name, request):
        try:
            server.stub.Generate(request, timeout=60, metadata=server.metadata)
            seen[name] = "OK"
        except grpc.RpcError as e:
            seen[name] = (e.code(), e.details())

    grpc_code("big message", pb.GenerateRequest(prompt="x" * (MAX_MESSAGE + 100_000), max_tokens=2))
    grpc_code("many prompt ids", pb.GenerateRequest(prompt_token_ids=[1] * 200_000, max_tokens=2))
    grpc_code("many stops", pb.GenerateRequest(prompt="hi", stop=["ab"] * 100_000, max_tokens=2))
    grpc_code("many resumed", pb.GenerateRequest(prompt="hi", resume_token_ids=[1] * 100_000, max_tokens=2))
    t0 = time.monotonic()

    def endless():  # 64 MiB, chunked: no content-length to refuse it by
        for _ in range(64):
            yield b" " * (1 << 20)

    try:
        seen["chunked 64 MiB"] = http_call(server, "POST", "/v1/completions", chunks=endless(),
                                      headers={"content-type": "application/json"})
    except (ConnectionError, http.client.HTTPException) as e:  # refused mid-upload: the status is lost
        seen["chunked 64 MiB"] = (type(e).__name__, {})
    seen["chunked seconds"] = time.monotonic() - t0
    seen["bad length"] = http_call(server, "POST", "/v1/completions", body=b"{}",
                              headers={"content-length": "12abc"})
    seen["huge number"] = http_call(server, "POST", "/v1/completions",
                               body=('{"prompt": "hi", "temperature": ' + "9" * 400 + "}").encode())
    return seen


def test_hostile_requests_are_refused_before_work_beside_live_streams(server):
    alone = [stream_json(server, kw) for kw in NORMAL]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        normal = [pool.submit(stream_json, server, kw) for kw in NORMAL]
        seen = pool.submit(hostile_calls, server).result()
        for future, want in zip(normal, alone):
            got = future.result()
            assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    assert seen["big message"][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for name, field in (("many prompt ids", "prompt"), ("many stops", "stop"), ("many resumed", "resume_token_ids")):
        code, details = seen[name]
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, (name, details)
    status, body = seen["chunked 64 MiB"]
    assert status in (413, "ConnectionResetError", "BrokenPipeError"), seen["chunked 64 MiB"]
    if status == 413:
        assert "larger than" in body["error"]["message"]
    assert seen["chunked seconds"] < 15
    assert seen["bad length"][0] == 400  # (the proxy's HTTP parser refuses it before the replica)
    status, body = seen["huge number"]
    assert status == 400 and body["error"]["param"] == "temperature", body
    assert server.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_resumed_replays_do_not_stall_the_replicas_event_loop(server, tokenizer):
    """Ten resumed requests each replaying 1,000 <s> tokens and 500 never-completing byte pieces
    (a replay once quadratic in them, on the event loop): calls answered by that loop alone
    (ModelInfo) stay quick meanwhile. (The replays' prefill is engine work, on its own thread.)"""
    resume = [1] * 1000 + [tokenizer.sp.PieceToId("<0x80>")] * 500  # a lone continuation byte
    resumed = dict(prompt_token_ids=[1, 5, 6], resume_token_ids=resume, max_tokens=1502, ignore_eos=True)
    waits: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(11) as pool:
        replays = [pool.submit(stream_json, server, resumed) for _ in range(10)]
        while not all(f.done() for f in replays):
            t0 = time.monotonic()
            server.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=server.metadata)
            waits.append(time.monotonic() - t0)
        for f in replays:
            assert f.result()["finish_reason"] == "length" and len(f.result()["token_ids"]) == 2
    assert len(waits) >= 3 and max(waits) < 1.0, waits


def test_clients_see_the_served_name_and_no_paths(server, tiny_dir):
    info = server.stub.ModelInfo(pb.ModelInfoRequest(), metadata=server.metadata)
    assert info.model == SERVED_NAME and str(tiny_dir) not in str(info)
    status, body = http_call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [SERVED_NAME]
    status, body = http_call(server, "POST", "/v1/completions", body=json.dumps({"model": "x", "prompt": "hi"}).encode())
    assert status == 404 and str(tiny_dir) not in json.dumps(body)


def rpc_error(call, *args, **kw) -> grpc.RpcError | None:
    try:
        call(*args, **kw)
    except grpc.RpcError as e:
        return e
    return None


def test_keys_name_tenants_health_is_open_and_the_file_is_reloaded(server, tenants_file):
    stranger = server.key("no-such-key")
    err = rpc_error(stranger.generate, pb.GenerateRequest(prompt="hi", max_tokens=2))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert http_call(server, "POST", "/v1/completions", body=b'{"prompt": "hi"}', key="no-such-key")[0] == 401
    assert http_call(server, "POST", "/v1/completions", body=b'{"prompt": "hi"}', key=None)[0] == 401
    assert http_call(server, "GET", "/health", key=None)[0] == 200
    assert server.anonymous.health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    tenants_file.write_text(TENANTS + "  - {name: late, key: late-key}\n")
    deadline = time.monotonic() + 20
    while rpc_error(server.key("late-key").generate, pb.GenerateRequest(prompt="hi", max_tokens=2)) is not None:
        assert time.monotonic() < deadline, "the new tenant was not loaded"
        time.sleep(0.5)


def test_only_an_admin_changes_the_placement_and_scale_is_bounded_beside_streams(server):
    admin, user = server.key("ops-key"), server
    for call in (user.placement, user.rebalance_experts, lambda: user.scale_experts(2)):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in err.details()
    alone = [stream_json(server, kw) for kw in NORMAL]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        normal = [pool.submit(stream_json, server, kw) for kw in NORMAL]
        legit = pool.submit(admin.scale_experts, 2, timeout=300)
        t0 = time.monotonic()
        hostile = [pool.submit(rpc_error, admin.scale_experts, 100_000, timeout=30) for _ in range(4)]
        for f in hostile:
            err = f.result()
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "actors" in err.details()
        assert time.monotonic() - t0 < 5
        change = legit.result()
        assert change.kind == "scale" and len(admin.placement().actors) == 2
        for future, want in zip(normal, alone):
            got = future.result()
            assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]


def test_max_concurrent_counts_sequences_and_the_excess_is_resource_exhausted_and_nothing_else(server):
    flood = server.key("flood-key")
    long = dict(prompt_token_ids=[1, 4, 5], max_tokens=300, ignore_eos=True)
    calm_alone = stream_json(server, NORMAL[1])

    def one():
        try:
            return stream_json(flood, long, retries=0)
        except grpc.RpcError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(14) as pool:
        calm = pool.submit(stream_json, server, NORMAL[1])
        floods = [pool.submit(one) for _ in range(12)]
        time.sleep(0.5)  # four of them run: a unary call carries its retry-after as trailing metadata
        unary = rpc_error(flood.stub.Generate, pb.GenerateRequest(prompt="hi", max_tokens=2), timeout=30,
                          metadata=flood.metadata)
        results = [f.result() for f in floods]
        assert calm.result()["token_ids"] == calm_alone["token_ids"]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(results) - len(refused) == 4, [getattr(r, "details", lambda: r)() for r in results]
    for r in refused:
        assert r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent" in r.details()
        assert "retry after 1 s" in r.details()  # (a stream's error carries no trailing metadata through Serve)
    assert unary.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and dict(unary.trailing_metadata())["retry-after"] == "1"
    # n counts: 8 choices > 4 at once, whatever else runs (HTTP: 429 with Retry-After)
    status, body, headers = http_call(server, "POST", "/v1/completions", key="flood-key", with_headers=True,
                                      body=json.dumps({"prompt": "hi", "n": 8, "max_tokens": 4}).encode())
    assert status == 429 and body["error"]["code"] == "quota_exceeded" and headers.get("retry-after") == "1"
    assert completion_json([flood.generate(pb.GenerateRequest(prompt="hi", max_tokens=4))])["token_ids"]


def test_tokens_per_minute_charges_max_tokens_and_refunds_what_was_not_generated(server):
    metered = server.key("metered-key")
    err = rpc_error(metered.generate, pb.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=1900))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens_per_minute" not in err.details() \
        and "max_tokens" in err.details()  # more than a minute's worth: it could never pass
    # Long enough that the cancel below reaches the engine before the sequence could end by itself,
    # even on a loaded machine (250 tokens once raced it there)
    big = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=1500, ignore_eos=True)
    call = metered.stub.GenerateStream(big, timeout=60, metadata=metered.metadata)
    t0 = time.monotonic()
    next(call)  # charged 1,503 of 1,800; cancelled after its first tokens
    call.cancel()
    # The refund is sent when the sequence ends (the cancel travels through Serve's proxy). Within
    # 12 s the bucket refills 360 tokens: 297 + 360 < 1,503, so only the refund lets this pass.
    while (err := rpc_error(metered.stub.Generate, big, timeout=60, metadata=metered.metadata)) is not None:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 12, err.details()
        time.sleep(0.5)
    err = rpc_error(metered.stub.Generate, big, timeout=60, metadata=metered.metadata)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens per minute" in err.details()
    assert int(dict(err.trailing_metadata())["retry-after"]) > 10
