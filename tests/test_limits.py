"""The limits a hostile client meets, through the real server, each while ordinary streams run:
their output must be exactly what it is alone, and the server must stay healthy.

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

from raymoe.cluster.client import completion_json
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

NORMAL = [dict(prompt_token_ids=[1, 30 + i, 7, 99], max_tokens=60, ignore_eos=True,
               **({"temperature": 0.8, "seed": 7 + i} if i % 2 else {})) for i in range(4)]
SERVED_NAME = "tiny-under-test"
MAX_MESSAGE = 1 << 20


@pytest.fixture(scope="module")
def server(tiny_dir):
    with running_server("raymoe-test-limits", checkpoint=str(tiny_dir), max_running=32, max_queue=64,
                        served_model_name=SERVED_NAME, max_message_bytes=MAX_MESSAGE) as client:
        yield client


def stream_json(server, kw) -> dict:
    return completion_json(list(server.stream(pb.GenerateRequest(**kw), timeout=120)))


def http_call(server, method: str, path: str, body=None, headers=None, chunks=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        if chunks is not None:
            conn.request(method, path, body=chunks, headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw or b"{}")
        except ValueError:  # refused by Serve's proxy itself (plain text)
            return response.status, {"raw": raw.decode(errors="replace")}
    finally:
        conn.close()


def hostile_calls(server) -> dict[str, object]:
    """Each hostile request → what the client saw (a status and its text)."""
    seen: dict[str, object] = {}

    def grpc_code(name, request):
        try:
            server.stub.Generate(request, timeout=60)
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
            server.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
            waits.append(time.monotonic() - t0)
        for f in replays:
            assert f.result()["finish_reason"] == "length" and len(f.result()["token_ids"]) == 2
    assert len(waits) >= 3 and max(waits) < 1.0, waits


def test_clients_see_the_served_name_and_no_paths(server, tiny_dir):
    info = server.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.model == SERVED_NAME and str(tiny_dir) not in str(info)
    status, body = http_call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [SERVED_NAME]
    status, body = http_call(server, "POST", "/v1/completions", body=json.dumps({"model": "x", "prompt": "hi"}).encode())
    assert status == 404 and str(tiny_dir) not in json.dumps(body)
