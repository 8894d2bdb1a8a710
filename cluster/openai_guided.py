"""The OpenAI door's structured output: `response_format` and `tools` / `tool_choice` /
`parallel_tool_calls` in, `message.tool_calls` (whole or streamed as deltas) out.

`response_format` {type: json_schema} is enforced whether or not `strict` is true (raymoe always
decodes under the schema's grammar; `strict` is accepted for the SDKs that send it). `json_object`
is any JSON object. Tool calls: see cluster/tools.py.
"""

from __future__ import annotations

import json
from typing import Any

from raymoe.model.errors import InvalidRequest
from raymoe.model.guided import GuidedSpec

from .tools import ToolRequest, check_history, parse_tools, read_calls


def parse_response_format(body: dict) -> GuidedSpec | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidRequest("response_format must be an object with a type", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec("json_object", "", "response_format")
    if kind != "json_schema":
        raise InvalidRequest(f"response_format.type must be text, json_object or json_schema (got {kind!r})",
                             "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise InvalidRequest("response_format.json_schema needs a name (and a schema)", "response_format")
    schema = spec.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object", "response_format")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise InvalidRequest("response_format.json_schema.strict must be a boolean", "response_format")
    return GuidedSpec("json_schema", json.dumps(schema), "response_format")


def parse_chat_tools(body: dict) -> ToolRequest:
    return parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))


def plain_messages(messages: Any) -> list[dict]:
    """messages as role/content dicts (text parts joined), keeping tool_calls and tool_call_id."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", "messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""  # an assistant turn that only called tools
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", "messages")
        # A field sent as null is left out: templates test `is defined` (Mistral's tool_calls).
        plain.append({**{k: v for k, v in m.items() if k != "content" and v is not None}, "content": content})
    check_history(plain)
    return plain


class ToolCallStream:
    """Streams one choice of a request with tools: text goes out as content deltas once its first
    character shows it is text; an answer that starts with "[" is a call, held whole and sent as
    tool_calls deltas (one per call: id, type, name and the arguments) at its end."""

    def __init__(self) -> None:
        self.text = ""
        self.is_call: bool | None = None  # unknown until the first non-space character

    def push(self, delta: str, finished: bool) -> tuple[dict | None, list[dict] | None, bool]:
        """(delta to send now or None, tool calls at the end or None, whether the answer was calls)."""
        self.text += delta
        if self.is_call is None and self.text.strip():
            self.is_call = self.text.lstrip().startswith("[")
            if not self.is_call:
                return {"content": self.text}, None, False
        if self.is_call is None:
            return ({"content": self.text} if finished and self.text else None), None, False
        if not self.is_call:
            return ({"content": delta} if delta else None), None, False
        if not finished:
            return None, None, False
        calls = read_calls(self.text)
        if calls is None:  # cut short: what there is, as text
            return {"content": self.text}, None, False
        return {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}, calls, True


def chat_message(text: str, tools: ToolRequest, finish: str | None) -> tuple[dict, str | None]:
    """A whole answer's message and finish reason: tool calls when the answer is calls."""
    calls = read_calls(text) if tools.active else None
    if calls is None:
        return {"role": "assistant", "content": text}, finish
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls" if finish == "stop" else finish
