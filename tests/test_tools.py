"""Tool calls around the engine: the tools, calls and results of a conversation reach a chat template
that renders tools (Mixtral-8x22B-Instruct's, tests/data) as transformers hands them over, or the
fallback system message otherwise; a tool-calling answer reads back as OpenAI calls whose arguments
validate; bad tools and tool choices are refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from raymoe.cluster.openai_guided import ToolCallStream, plain_messages
from raymoe.cluster.tools import chat_messages, parse_tools, read_calls
from raymoe.model.chat import ChatTemplate
from raymoe.model.errors import InvalidRequest

WEATHER = {"type": "function", "function": {"name": "weather", "description": "now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MISTRAL = (Path(__file__).parent / "data" / "mistral_tools_template.jinja").read_text()


def _conversation() -> list[dict]:
    calls = read_calls('[{"name": "weather", "arguments": {"city": "Oslo"}}]')
    return plain_messages([{"role": "user", "content": "Weather in Oslo?"},
                           {"role": "assistant", "content": None, "tool_calls": calls},
                           {"role": "tool", "tool_call_id": calls[0]["id"], "content": "12 C"},
                           {"role": "user", "content": "And now?"}])


def test_a_template_with_tools_gets_them_and_the_history_as_transformers_passes_them():
    template = ChatTemplate(MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}, {})
    assert template.uses_tools
    messages = _conversation()
    call = messages[1]["tool_calls"][0]
    rendered, tools = chat_messages(messages, parse_tools([WEATHER], "auto", None), template.uses_tools)
    text = template.render(rendered, tools=tools)
    assert text.startswith("<s>[INST] Weather in Oslo?[/INST][TOOL_CALLS] [")
    assert f'{{"name": "weather", "arguments": {{"city": "Oslo"}}, "id": "{call["id"]}"}}]</s>' in text
    assert f'[TOOL_RESULTS] {{"content": 12 C, "call_id": "{call["id"]}"}}[/TOOL_RESULTS]' in text
    assert text.endswith('[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "weather", "description": '
                         '"now", "parameters": ' + json.dumps(WEATHER["function"]["parameters"]) +
                         '}}][/AVAILABLE_TOOLS][INST] And now?[/INST]')
    text_without = template.render(*chat_messages(messages, parse_tools([WEATHER], "none", None), True))
    assert "[AVAILABLE_TOOLS]" not in text_without  # tool_choice none: the tools are not offered


def test_other_templates_get_a_system_message_and_plain_turns():
    messages, tools = chat_messages(_conversation(), parse_tools([WEATHER], "required", None), False)
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user", "user"]
    assert '"name":"weather"' in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == [{"name": "weather", "arguments": {"city": "Oslo"}}]
    assert messages[3]["content"].endswith(": 12 C")


def test_answers_read_back_as_calls_and_stream_as_deltas():
    text = '[{"name": "weather", "arguments": {"city": "Bergen"}}, {"name": "weather", "arguments": {"city": "Å"}}]'
    calls = read_calls(text)
    assert [c["function"]["name"] for c in calls] == ["weather", "weather"]
    for c in calls:
        jsonschema.validate(json.loads(c["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert read_calls("plain text") is None and read_calls('[{"name": "weather", "argu') is None  # cut short
    stream = ToolCallStream()
    sent = [stream.push(piece, last) for piece, last in ((text[:5], False), (text[5:], True))]
    assert sent[0] == (None, None, False)  # a call is held whole until it ends
    delta, final, was_call = sent[1]
    assert was_call and [d["index"] for d in delta["tool_calls"]] == [0, 1] and len(final) == 2
    words = ToolCallStream()
    assert words.push(" Hel", False)[0] == {"content": " Hel"} and words.push("lo", True)[0] == {"content": "lo"}


@pytest.mark.parametrize("tools, choice, parallel, field", [
    ("nope", None, None, "tools"),
    ([{"type": "function", "function": {"name": ""}}], None, None, "tools"),
    ([WEATHER, WEATHER], None, None, "tools"),
    ([WEATHER], "sometimes", None, "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "rain"}}, None, "tool_choice"),
    (None, "required", None, "tool_choice"),
    ([WEATHER], "auto", "yes", "parallel_tool_calls"),
])
def test_bad_tools_name_their_field(tools, choice, parallel, field):
    with pytest.raises(InvalidRequest) as e:
        parse_tools(tools, choice, parallel)
    assert e.value.field == field
