"""The gRPC server end to end: real Ray, real Serve, real gRPC on loopback, against the in-process engine."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raymoe.cluster.client import Client, completion_json
from raymoe.model.completion import complete
from raymoe.model.engine import Engine
from raymoe.model.sampling import SamplingParams
from raymoe.model.tokenizer import Tokenizer
from raymoe.model.weights import load_model
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

MAX_RUNNING, MAX_QUEUE = 16, 8


@pytest.fixture(scope="module")
def server(tiny_dir):
    with running_server(checkpoint=str(tiny_dir), max_running=MAX_RUNNING,
                        max_queue=MAX_QUEUE, kv_cache_tokens=8192) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Runs one request alone through the in-process engine: the expected answer."""
    model, tok = load_model(tiny_dir), Tokenizer(tiny_dir)

    def run(prompt_ids, params, stop=()):
        engine = Engine(model, kv_cache_tokens=4096)
        return complete(engine, tok, [prompt_ids], [params], [list(stop)])[0]
    return run


def request(**kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(**kw)


def load(client: Client) -> pb.Load:
    return client.stub.ModelInfo(pb.ModelInfoRequest()).load


def wait_idle(client: Client, timeout: float = 10) -> pb.Load:
    deadline = time.monotonic() + timeout
    while True:
        info = load(client)
        if (info.running == 0 and info.kv_cache_used_tokens == 0) or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def test_unary_and_stream_equal_in_process(server, reference, tokenizer):
    prompt = "The cluster sends"
    ref = reference(tokenizer.encode(prompt), SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2))
    unary = server.generate(request(prompt=prompt, max_tokens=12, ignore_eos=True, logprobs=2))
    chunks = list(server.stream(request(prompt=prompt, max_tokens=12, ignore_eos=True, logprobs=2)))
    for got in (completion_json([unary]), completion_json(chunks)):
        assert got["prompt_ids"] == ref.prompt_ids
        assert got["token_ids"] == ref.token_ids
        assert got["text"] == ref.text
        assert got["finish_reason"] == "length"
        assert got["logprobs"] == pytest.approx(ref.logprobs, abs=1e-5)
        assert [[a["token_id"] for a in row] for row in got["top_logprobs"]] == \
            [[t for t, _ in row] for row in ref.top_logprobs]
    assert sum(len(c.token_ids) for c in chunks) == 12 and chunks[-1].usage.completion_tokens == 12
    assert unary.usage.prompt_tokens == len(ref.prompt_ids)


def test_concurrent_streams_equal_each_alone(server, reference):
    cases = []
    for i in range(16):
        params = dict(max_tokens=6 + i % 5, ignore_eos=True)
        if i % 3:
            params.update(temperature=0.5 + 0.1 * (i % 4), top_p=0.9, top_k=50, seed=100 + i)
        cases.append(([1] + [(7 * i + 13 * j) % 500 + 3 for j in range(3 + i % 7)], params))

    def run(case):
        ids, params = case
        return completion_json(list(server.stream(request(prompt_token_ids=ids, **params))))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, cases))
    for (ids, params), got in zip(cases, results):
        sp = SamplingParams(**{k: v for k, v in params.items()})
        ref = reference(ids, sp)
        assert got["token_ids"] == ref.token_ids, (ids, params)
        assert got["logprobs"] == pytest.approx(ref.logprobs, abs=1e-4)


def test_stop_strings_and_stop_tokens(server, reference, tokenizer):
    ref = reference(tokenizer.encode("Hello"), SamplingParams(max_tokens=10, ignore_eos=True))
    assert len(ref.text) > 4
    stop = ref.text[2:4]
    got = server.generate(request(prompt="Hello", max_tokens=10, ignore_eos=True, stop=[stop]))
    assert got.finish_reason == "stop" and got.text == ref.text[:ref.text.find(stop)]
    got = server.generate(request(prompt="Hello", max_tokens=10, ignore_eos=True, stop_token_ids=[ref.token_ids[3]]))
    assert got.finish_reason == "stop" and list(got.token_ids) == ref.token_ids[:ref.token_ids.index(ref.token_ids[3]) + 1]


@pytest.mark.parametrize("kw, fragment", [
    (dict(), "prompt is empty"),
    (dict(prompt="hi", prompt_token_ids=[1, 2]), "exactly one"),
    (dict(prompt_token_ids=[1, 99999]), "outside the vocabulary"),
    (dict(prompt_token_ids=[1, -5]), "outside the vocabulary"),
    (dict(prompt_token_ids=[1, 2], max_tokens=100000), "context"),
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(prompt="hi", temperature=float("nan")), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", stop=["a"] * 17), "stop strings"),
    (dict(prompt="hi", stop=["x" * 500]), "stop string"),
    (dict(prompt="hi", logprobs=50), "logprobs"),
])
def test_invalid_arguments(server, kw, fragment):
    for call in (server.generate, lambda r: list(server.stream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(request(**kw))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in err.value.details()
        assert "Traceback" not in err.value.details()
    assert server.generate(request(prompt="hi", max_tokens=2)).finish_reason in ("stop", "length")


def test_cancelled_stream_frees_its_sequence(server):
    stream = server.stub.GenerateStream(request(prompt_token_ids=[1, 5, 9], max_tokens=1500, ignore_eos=True))
    next(stream), next(stream)
    assert load(server).running >= 1 and load(server).kv_cache_used_tokens > 0
    stream.cancel()
    info = wait_idle(server)
    assert info.running == 0 and info.kv_cache_used_tokens == 0


def test_deadline_exceeded_frees_its_sequence(server):
    with pytest.raises(grpc.RpcError) as err:
        list(server.stream(request(prompt_token_ids=[1, 5, 9], max_tokens=1500, ignore_eos=True), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = wait_idle(server)
    assert info.running == 0 and info.kv_cache_used_tokens == 0


def test_queue_overflow_is_resource_exhausted(server):
    def run(_):
        try:
            server.generate(request(prompt_token_ids=[1, 2, 3], max_tokens=200, ignore_eos=True), retries=0)
            return "ok"
        except grpc.RpcError as e:
            return e.code()

    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        codes = list(pool.map(run, range(48)))
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0
    assert codes.count("ok") >= MAX_RUNNING
    assert set(codes) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert wait_idle(server).running == 0
    assert server.generate(request(prompt="hi", max_tokens=3)).usage.completion_tokens >= 1


def test_tokenize_model_info_and_health(server, tokenizer):
    tok = server.stub.Tokenize(pb.TokenizeRequest(text="Hello world", add_bos=True))
    assert list(tok.token_ids) == tokenizer.encode("Hello world") and len(tok.pieces) == len(tok.token_ids)
    info = server.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.config.num_local_experts == 8 and info.config.num_hidden_layers == 2
    assert info.max_running == MAX_RUNNING and info.kv_cache_tokens >= 8192
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_generate_direct_against_a_server_without_direct_ingress_is_one_line(server, capsys):
    """`raymoe generate --direct` asks the server for its replicas' own ports; this one (no
    --direct-ingress) lists none, which is one line, before any request is sent."""
    from raymoe.cli.main import main

    assert list(server.model_info().direct_grpc_targets) == []
    capsys.readouterr()
    assert main(["generate", "--direct", "--target", server.target, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "proxy only" in err[0] and "--direct-ingress" in err[0], err


def test_a_client_over_several_addresses_goes_round_robin_past_one_that_is_down(server):
    """`Client("A,B")` (what Client.direct builds from a server's replica ports) balances with gRPC's
    round_robin policy: with one address refusing connections, every call still lands on the live
    one, at once (no retry), with the tokens a single-address client gets; Client.direct against a
    server without direct ingress is NoDirectIngress. (The target forms: test_client_targets.py.)"""
    from bench.machine import free_port
    from raymoe.cluster.client import NoDirectIngress

    with pytest.raises(NoDirectIngress, match="proxy only"):
        Client.direct(server.target)

    request = pb.GenerateRequest(prompt_token_ids=[1, 5, 6, 7], max_tokens=6, ignore_eos=True)
    expected = list(server.generate(request).token_ids)
    port = server.target.rsplit(":", 1)[1]
    with Client(f"127.0.0.1:{free_port()},127.0.0.1:{port}") as balanced:
        assert [list(balanced.generate(request, timeout=60, retries=0).token_ids) for _ in range(4)] == [expected] * 4
        assert [t for c in balanced.stream(request, timeout=60, retries=0) for t in c.token_ids] == expected
        assert balanced.resumptions == 0


def test_http_chat_without_a_template_is_a_clear_400(server):
    """The tiny checkpoint has no tokenizer_config.json: chat completions say so (the OpenAI door's
    other behaviour is in test_openai_api.py)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/chat/completions",
                                 data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    answer = json.loads(err.value.read())
    assert err.value.code == 400 and answer["error"]["code"] == "no_chat_template"
    assert "chat template" in answer["error"]["message"]
