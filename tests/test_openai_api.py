"""The OpenAI-compatible HTTP door and the API key, over real Serve on loopback, with the official
`openai` client: the demo model (with a chat template added) answers 123+456= with 579 through
completions and chat completions, plain and streaming; keys are enforced on both doors; bad
bodies get 400 naming the field while gRPC streams run undisturbed."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import urllib.error
import urllib.request

import grpc
import pytest

from raymoe.cluster.client import Client, completion_json
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

openai = pytest.importorskip("openai")

KEY = "test-key-7f3a"
MAX_LOGPROBS = 30
TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def demo_with_template(tmp_path_factory):
    from raymoe.model.default import default_checkpoint

    out = tmp_path_factory.mktemp("demo-chat") / "demo-chat"
    shutil.copytree(default_checkpoint(), out)
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>",
                                                           "eos_token": "</s>"}))
    return out


@pytest.fixture(scope="module")
def server(demo_with_template):
    os.environ["RAYMOE_API_KEY"] = KEY  # running_server hands it to the replicas, as `raymoe serve` would
    try:
        # float32: concurrent streams must equal the same streams alone (bfloat16 rounds by batch shape)
        # max_logprobs above the default 20: the server's limit, not a hard-coded one, holds on both doors
        with running_server(checkpoint=str(demo_with_template), max_running=16,
                            dtype="float32", max_logprobs=MAX_LOGPROBS) as client:
            yield client
    finally:
        del os.environ["RAYMOE_API_KEY"]


@pytest.fixture(scope="module")
def base_url(server):
    return f"http://127.0.0.1:{server.http_port}/v1"


@pytest.fixture(scope="module")
def api(base_url):
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)


def post(url: str, body, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def model_id(api) -> str:
    return api.models.list().data[0].id


def test_completions_plain_and_streaming(api):
    done = api.completions.create(model=model_id(api), prompt="123+456=", max_tokens=8)
    assert done.choices[0].text == "579" and done.choices[0].finish_reason == "stop"
    assert done.usage.prompt_tokens == 10 and done.usage.completion_tokens == 4  # <s> ▁ 1 2 3 + 4 5 6 =; 5 7 9 </s>
    parts = list(api.completions.create(model=model_id(api), prompt="705+38=", max_tokens=8, stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == "743"
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "stop"
    assert parts[-1].usage.completion_tokens == 4


def test_chat_plain_and_streaming(api):
    done = api.chat.completions.create(model=model_id(api), messages=[{"role": "user", "content": "123+456="}],
                                       max_tokens=8)
    assert done.choices[0].message.content == "579" and done.choices[0].message.role == "assistant"
    parts = list(api.chat.completions.create(model=model_id(api), max_tokens=8, stream=True,
                                             messages=[{"role": "user", "content": [{"type": "text", "text": "9+9="}]}]))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == "18"


def test_several_choices_and_a_batch_of_prompts(api):
    """A batch of prompts × n choices: choice k of prompt p is index p·n + k and equals the same prompt
    sent alone with seed + k; streamed choices interleave and add up to the same texts; usage
    counts each prompt once and every choice's tokens."""
    m = model_id(api)
    prompts, sample = ["7+", "12+3", "123+456="], dict(max_tokens=8, temperature=1.5, top_p=0.95)
    batch = api.completions.create(model=m, prompt=prompts, n=2, seed=11, logprobs=1, **sample)
    assert [c.index for c in batch.choices] == list(range(6))
    alone = {(p, k): api.completions.create(model=m, prompt=p, seed=11 + k, logprobs=1, **sample)
             for p in prompts for k in range(2)}
    for c in batch.choices:
        ref = alone[(prompts[c.index // 2], c.index % 2)].choices[0]
        assert (c.text, c.finish_reason) == (ref.text, ref.finish_reason)
        assert c.logprobs.token_logprobs == pytest.approx(ref.logprobs.token_logprobs, abs=1e-5)
    assert len({c.text for c in batch.choices}) > 3  # seeds differ per choice: not copies
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for (_, k), a in alone.items() if k == 0)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone.values())
    parts = list(api.completions.create(model=m, prompt=prompts, n=2, seed=11, stream=True,
                                        stream_options={"include_usage": True}, **sample))
    streamed = {}
    for p in parts:
        for c in p.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in batch.choices}
    assert parts[-1].usage.completion_tokens == batch.usage.completion_tokens
    greedy = api.completions.create(model=m, prompt=["123+456=", [1, 261, 262, 264, 270]], max_tokens=8, n=2)
    assert [c.text for c in greedy.choices][:2] == ["579", "579"]
    chat = api.chat.completions.create(model=m, messages=[{"role": "user", "content": "123+456="}], n=3, seed=4,
                                       **sample)
    one = [api.chat.completions.create(model=m, messages=[{"role": "user", "content": "123+456="}], seed=4 + k,
                                       **sample).choices[0].message.content for k in range(3)]
    assert [c.message.content for c in chat.choices] == one and [c.index for c in chat.choices] == [0, 1, 2]


def test_a_client_gone_mid_stream_ends_every_choice(base_url, server):
    """64 choices of 500 tokens on 16 running slots: the stream starts with the first choice's first
    token (not once every choice has started); the client reads a few events and leaves; every
    sequence, running or still waiting, is gone within seconds."""
    import time
    body = json.dumps({"prompt": ["7+", "12+3"], "n": 32, "max_tokens": 500, "ignore_eos": True, "stream": True,
                       "temperature": 1.0}).encode()
    request = urllib.request.Request(f"{base_url}/completions", body, {"Content-Type": "application/json",
                                                                       "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        for _ in range(4):
            r.readline()
        assert server.model_info().load.waiting > 0  # choices still waiting for a slot, yet streaming
    left = time.monotonic()
    while (load := server.model_info().load).running + load.waiting and time.monotonic() < left + 5:
        time.sleep(0.1)
    assert load.running + load.waiting == 0, load


def test_http_and_grpc_give_the_same_tokens(api, server):
    from raymoe.model.tokenizer import Tokenizer

    http = api.completions.create(model=model_id(api), prompt="12+34=", max_tokens=6, logprobs=2)
    grpc_json = completion_json([server.generate(pb.GenerateRequest(prompt="12+34=", max_tokens=6, logprobs=2))])
    tok = Tokenizer(server.checkpoint)
    assert http.choices[0].logprobs.tokens == [tok.piece(t) for t in grpc_json["token_ids"]]
    assert http.choices[0].logprobs.token_logprobs == pytest.approx(grpc_json["logprobs"], abs=1e-6)
    assert http.choices[0].text == grpc_json["text"]


def test_the_servers_logprobs_limit_holds_on_both_doors(api, base_url, server):
    """max_logprobs 30 (`raymoe serve --max-logprobs 30`): 30 alternatives per token through each door
    (gRPC logprobs, completions logprobs, chat top_logprobs), the same numbers; 31 is refused naming
    the door's own field."""
    m, prompt = model_id(api), "12+34="
    want = completion_json([server.generate(pb.GenerateRequest(prompt=prompt, max_tokens=4, logprobs=MAX_LOGPROBS))])
    assert [len(row) for row in want["top_logprobs"]] == [MAX_LOGPROBS] * len(want["token_ids"])
    assert [row[0]["token_id"] for row in want["top_logprobs"]] == want["token_ids"]  # greedy: the best one
    http = api.completions.create(model=m, prompt=prompt, max_tokens=4, logprobs=MAX_LOGPROBS).choices[0].logprobs
    assert http.token_logprobs == pytest.approx(want["logprobs"], abs=1e-6)
    for row, grpc_row in zip(http.top_logprobs, want["top_logprobs"]):  # keyed by text: byte pieces may share one
        assert max(row.values()) == pytest.approx(grpc_row[0]["logprob"], abs=1e-6)
        assert all(any(abs(v - a["logprob"]) < 1e-6 for a in grpc_row) for v in row.values())
    chat = api.chat.completions.create(model=m, messages=[{"role": "user", "content": prompt}], max_tokens=4,
                                       logprobs=True, top_logprobs=MAX_LOGPROBS).choices[0]
    assert chat.message.content == want["text"]
    assert [len(t.top_logprobs) for t in chat.logprobs.content] == [MAX_LOGPROBS] * len(want["token_ids"])
    assert [t.top_logprobs[0].logprob for t in chat.logprobs.content] == pytest.approx(
        [row[0]["logprob"] for row in want["top_logprobs"]], abs=1e-6)

    with pytest.raises(grpc.RpcError) as err:
        server.generate(pb.GenerateRequest(prompt=prompt, max_tokens=4, logprobs=MAX_LOGPROBS + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"logprobs must be between 0 and {MAX_LOGPROBS}" in err.value.details()
    status, answer = post(f"{base_url}/completions", {"prompt": prompt, "logprobs": MAX_LOGPROBS + 1})
    assert status == 400 and answer["error"]["param"] == "logprobs", answer
    status, answer = post(f"{base_url}/chat/completions", {"messages": [{"role": "user", "content": prompt}],
                                                            "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1})
    assert status == 400 and answer["error"]["param"] == "top_logprobs", answer
    assert answer["error"]["message"].startswith(f"top_logprobs must be between 0 and {MAX_LOGPROBS}"), answer


def test_keys_on_both_doors(api, base_url, server):
    bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=model_id(api), prompt="1+1=", max_tokens=3)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    status, body = post(f"{base_url}/completions", {"prompt": "1+1="}, key=None)
    assert status == 401 and "send the header 'Authorization: Bearer KEY'" in body["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base_url}/models", timeout=10)
    assert refused.value.code == 401 and json.loads(refused.value.read())["error"]["code"] == "invalid_api_key"
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10) as r:  # probes stay open
        assert r.status == 200
    with Client(server.target, api_key="") as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            anonymous.generate(pb.GenerateRequest(prompt="1+1=", max_tokens=3), retries=0)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            anonymous.model_info(timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:  # the Experts service answers the same status
            anonymous.placement(timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "send the metadata 'authorization: Bearer KEY'" in err.value.details()
        from grpc_health.v1 import health_pb2

        assert anonymous.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


BAD_BODIES = [
    ({"prompt": "1+1=", "temperature": "hot"}, "temperature"),
    ({"prompt": "1+1=", "temperature": -1}, "temperature"),
    ({"prompt": "1+1=", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "1+1=", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "1+1=", "n": 0}, "n"),
    ({"prompt": "1+1=", "n": 65}, "n"),
    ({"prompt": ["1+1="] * 33, "n": 2}, "prompt"),  # 66 choices
    ({"prompt": ["1+1=", 5]}, "prompt"),
    ({"prompt": ["1+1=", [1, 99999]]}, "prompt"),  # one bad prompt refuses the whole batch
    ({"prompt": "1+1=", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "1+1=", "logprobs": 500}, "logprobs"),
    ({"prompt": "1+1=", "best_of": 3}, "best_of"),
    ({"prompt": "1+1=", "frobnicate": True}, "frobnicate"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "1+1=", "stop": [1, 2]}, "stop"),
    ({"prompt": "1+1=", "stream": "yes"}, "stream"),
]


def test_bad_bodies_are_400_naming_the_field_while_streams_run(base_url, server):
    """Also bad guided-decoding specs (response_format, tools; gRPC guided_decoding): refused at once."""
    streams = [dict(prompt_token_ids=[1, 260 + i, 266], max_tokens=200, ignore_eos=True) for i in range(6)]
    alone = [completion_json(list(server.stream(pb.GenerateRequest(**kw)))) for kw in streams]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(lambda kw: completion_json(list(server.stream(pb.GenerateRequest(**kw)))), kw)
                   for kw in streams]
        for body, field in BAD_BODIES:
            status, answer = post(f"{base_url}/completions", body)
            assert status == 400, (body, answer)
            assert answer["error"]["param"] == field and field in answer["error"]["message"], answer
        status, answer = post(f"{base_url}/completions", b"{not json")
        assert status == 400 and "JSON" in answer["error"]["message"]
        status, answer = post(f"{base_url}/completions", {"prompt": "1+1=", "model": "gpt-9"})
        assert status == 404 and answer["error"]["code"] == "model_not_found"
        status, answer = post(f"{base_url}/chat/completions", {"messages": [{"role": "user"}]})
        assert status == 400 and answer["error"]["param"] == "messages"
        for extra, field in BAD_GUIDED_BODIES:
            body = {"messages": [{"role": "user", "content": "1+1="}], "max_tokens": 4, **extra}
            status, answer = post(f"{base_url}/chat/completions", body)
            assert status == 400 and answer["error"]["param"] == field, (extra, answer)
        for guided, field in [(pb.GuidedDecoding(regex="([a-"), "guided_decoding.regex"),
                              (pb.GuidedDecoding(grammar='root ::= "a" |'), "guided_decoding.grammar"),
                              (pb.GuidedDecoding(json_schema="{nope"), "guided_decoding.json_schema"),
                              (pb.GuidedDecoding(choice=pb.Choices()), "guided_decoding.choice")]:
            with pytest.raises(grpc.RpcError) as err:
                server.generate(pb.GenerateRequest(prompt="1+1=", guided_decoding=guided), retries=0)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
        for future, want in zip(running, alone):
            got = future.result()
            assert got["token_ids"] == want["token_ids"]
    assert post(f"{base_url}/completions", {"prompt": "123+456=", "max_tokens": 8})[1]["choices"][0]["text"] == "579"


def test_cached_prompt_tokens_and_salts_on_both_doors(base_url, server):
    """A prompt seen before reports its cached blocks in usage (HTTP, streamed usage, gRPC, the
    CLI's JSON) and gives the same tokens; cache_salt keeps requests apart, through either door."""
    prompt = [1] + [(37 * i) % 200 + 20 for i in range(39)]  # 40 tokens: 2 full blocks may be reused
    body = {"prompt": prompt, "max_tokens": 4, "logprobs": 1}
    status, cold = post(f"{base_url}/completions", body)
    assert status == 200 and cold["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    status, warm = post(f"{base_url}/completions", body)
    assert warm["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    assert warm["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        cold["choices"][0]["logprobs"]["token_logprobs"], abs=1e-5)
    salted = [post(f"{base_url}/completions", {**body, "cache_salt": "team-b"})[1] for _ in range(2)]
    assert [s["usage"]["prompt_tokens_details"]["cached_tokens"] for s in salted] == [0, 32]
    req = urllib.request.Request(f"{base_url}/completions", headers={"Content-Type": "application/json",
                                                                     "Authorization": f"Bearer {KEY}"},
                                 data=json.dumps({**body, "stream": True,
                                                  "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines()
                  if line.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    # the gRPC door: the same caller (key) and no salt shares the HTTP door's blocks; a salt does not
    unary = completion_json([server.generate(pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=4))])
    assert unary["cached_prompt_tokens"] == 32 and unary["text"] == cold["choices"][0]["text"]
    chunks = list(server.stream(pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=4, cache_salt="grpc-only")))
    assert chunks[0].usage.cached_prompt_tokens == 0
    status, bad = post(f"{base_url}/completions", {**body, "cache_salt": 7})
    assert status == 400 and bad["error"]["param"] == "cache_salt"
    with pytest.raises(grpc.RpcError) as err:
        server.generate(pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=4, cache_salt="x" * 300))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in err.value.details()


# --- structured output: response_format, tools, gRPC guided_decoding --------------------------------

# Small: the demo model's context is 512 tokens, and its tokenizer spells most words letter by letter.
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "maximum": 999}, "b": {"type": "integer", "minimum": 0}}}}}


def _arguments_valid(call, tools=(WEATHER, ADD)) -> None:
    import jsonschema

    fn = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
    assert call.type == "function" and len(call.id) == 9 and call.id.isalnum()  # as Mistral's templates need


def test_chat_completions_parse_with_a_pydantic_model_and_streamed_json(api):
    from typing import Literal

    import jsonschema
    from pydantic import BaseModel, Field

    class Sum(BaseModel):
        a: int
        b: int = Field(ge=0, le=999)
        total: int
        size: Literal["small", "large"]
        note: str | None = Field(max_length=8)

    msgs = [{"role": "user", "content": "123+456="}]
    for temperature in (0.0, 1.0):
        done = api.chat.completions.parse(model=model_id(api), messages=msgs, response_format=Sum, max_tokens=150,
                                          temperature=temperature, seed=5)
        assert isinstance(done.choices[0].message.parsed, Sum) and done.choices[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"digits": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                      "maximum": 9}, "maxItems": 4}},
              "required": ["digits"]}
    parts = list(api.chat.completions.create(model=model_id(api), messages=msgs, max_tokens=60, stream=True,
                                             response_format={"type": "json_schema", "json_schema": {
                                                 "name": "digits", "schema": schema, "strict": False}}))
    jsonschema.validate(json.loads("".join(p.choices[0].delta.content or "" for p in parts)), schema)


def test_tool_calls_required_named_streamed_and_in_the_history(api):
    m, msgs = model_id(api), [{"role": "user", "content": "Oslo?"}]
    required = api.chat.completions.create(model=m, messages=msgs, tools=[WEATHER, ADD], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80, n=3, temperature=1.0, seed=2)
    for choice in required.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        _arguments_valid(choice.message.tool_calls[0])
    named = api.chat.completions.create(model=m, messages=msgs, tools=[WEATHER, ADD], max_tokens=80,
                                        tool_choice={"type": "function", "function": {"name": "add"}})
    calls = named.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "add" and named.choices[0].finish_reason == "tool_calls"
    _arguments_valid(calls[0])
    parts = list(api.chat.completions.create(model=m, messages=msgs, tools=[WEATHER], tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=80, stream=True))
    deltas = [d for p in parts for d in (p.choices[0].delta.tool_calls or [])]
    assert deltas and parts[-1].choices[0].finish_reason == "tool_calls"
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
        [(k, c.function.name, c.function.arguments)
         for k, c in enumerate(api.chat.completions.create(model=m, messages=msgs, tools=[WEATHER], max_tokens=80,
                                                           tool_choice="required", parallel_tool_calls=False
                                                           ).choices[0].message.tool_calls)]
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
                      {"role": "tool", "tool_call_id": calls[0].id, "content": "12 degrees"}]
    after = api.chat.completions.create(model=m, messages=history, tools=[WEATHER, ADD], tool_choice="none",
                                        max_tokens=8)
    assert after.choices[0].finish_reason in ("stop", "length") and after.choices[0].message.tool_calls is None


def test_grpc_guided_decoding_and_tool_calls(server, tmp_path, capsys):
    import jsonschema

    from raymoe.cli.main import main

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
                                                                                "maximum": 20}},
              "required": ["ok", "n"]}
    req = pb.GenerateRequest(prompt="12+34=", max_tokens=40, guided_decoding=pb.GuidedDecoding(
        json_schema=json.dumps(schema)))
    jsonschema.validate(json.loads(server.generate(req).text), schema)
    streamed = "".join(c.text for c in server.stream(req))
    jsonschema.validate(json.loads(streamed), schema)
    (tmp_path / "schema.json").write_text(json.dumps(schema))  # raymoe generate --json-schema FILE
    assert main(["generate", "--target", server.target, "--api-key", KEY, "--prompt", "12+34=", "--json",
                 "--max-tokens", "40", "--json-schema", str(tmp_path / "schema.json"), "--temperature", "1",
                 "--seed", "3"]) == 0
    jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["text"]), schema)
    assert main(["generate", "--target", server.target, "--api-key", KEY, "--prompt", "1+1=", "--regex", "([a-"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    choice = server.generate(pb.GenerateRequest(prompt="1+1=", max_tokens=8, temperature=1.0, guided_decoding=
                                                pb.GuidedDecoding(choice=pb.Choices(choice=["two", "three"]))))
    assert choice.text in ("two", "three") and choice.finish_reason == "stop"
    regex = server.generate(pb.GenerateRequest(prompt="1+1=", max_tokens=12, guided_decoding=pb.GuidedDecoding(
        regex=r"[0-9]{3}\.[0-9]")))
    assert re.fullmatch(r"[0-9]{3}\.[0-9]", regex.text)
    fn = ADD["function"]
    call = server.generate(pb.GenerateRequest(prompt="1+1=", max_tokens=60, tool_choice="add", tools=[
        pb.Tool(name=fn["name"], parameters=json.dumps(fn["parameters"]))]))
    assert call.finish_reason == "tool_calls" and len(call.tool_calls) == 1 and call.tool_calls[0].name == "add"
    import jsonschema as js
    js.validate(json.loads(call.tool_calls[0].arguments), fn["parameters"])


BAD_GUIDED_BODIES = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": {
        "enum": ["x" * 1000] * 100}}}}, "response_format"),  # over guided_max_spec_bytes
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
]
