"""Tool calls, shared by both doors: the tools a request offers, the grammar that makes a call
valid, the prompt they are rendered into, and the answer read back as calls.

A call is written by the model as a JSON array of {"name", "arguments"} objects (Mistral's format
after its [TOOL_CALLS] token; the grammar writes the array, not the token). With tool_choice
`required` or a named function the grammar admits only such an array, each call's arguments
following that function's `parameters`; with `auto` it admits the array or text that does not
start with "[" (so the first character tells which). Chat templates that use a `tools` variable
(Mixtral-8x22B-Instruct's [AVAILABLE_TOOLS] / [TOOL_CALLS] / [TOOL_RESULTS]) get the tools and
the history as transformers passes them; other templates get the tools described in a system
message, earlier calls as the assistant's JSON and tool results as user messages.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import string
from typing import Any

from raymoe.model.errors import InvalidRequest
from raymoe.model.guided import GuidedSpec

MODES = ("none", "auto", "required")


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    mode: str  # none | auto | required | named
    name: str | None = None  # the named function
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.mode != "none"

    def spec(self) -> GuidedSpec | None:
        """The grammar of an answer (None: free text)."""
        if not self.active:
            return None
        tools = [t for t in self.tools if self.mode != "named" or t.name == self.name]
        text = json.dumps({"functions": [{"name": t.name, "parameters": t.parameters} for t in tools],
                           "parallel": self.parallel and self.mode != "named", "optional": self.mode == "auto"},
                          sort_keys=True)
        return GuidedSpec("tool_calls", text, "tools")


def parse_tools(tools: Any, tool_choice: Any, parallel: Any) -> ToolRequest:
    """OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`; InvalidRequest names the field."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", "tools")
    parsed: list[Tool] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequest(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}", "tools")
        name, params = fn.get("name"), fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(name, str) or not name or len(name) > 64:
            raise InvalidRequest(f"tools[{i}].function.name must be a string of 1 to 64 characters", "tools")
        if not isinstance(params, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        if any(p.name == name for p in parsed):
            raise InvalidRequest(f"tools[{i}]: the function name {name!r} is given twice", "tools")
        parsed.append(Tool(name, str(fn.get("description") or ""), params))
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    choice = tool_choice if tool_choice is not None else ("auto" if parsed else "none")
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequest("tool_choice must be none, auto, required or {type: function, function: {name}}",
                                 "tool_choice")
        if not any(t.name == name for t in parsed):
            raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        mode = "named"
    elif choice in MODES:
        mode = choice
    else:
        raise InvalidRequest(f"tool_choice must be none, auto, required or {{type: function, function: {{name}}}} "
                             f"(got {choice!r})", "tool_choice")
    if mode != "none" and not parsed:
        raise InvalidRequest(f"tool_choice {mode!r} needs tools", "tool_choice")
    return ToolRequest(tuple(parsed), mode, name, True if parallel is None else parallel)


def read_calls(text: str) -> list[dict] | None:
    """The answer as OpenAI tool calls, or None when it is text (not a JSON array of calls)."""
    if not text.lstrip().startswith("["):
        return None
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None  # cut short by max_tokens: left as text, finish_reason says length
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return None
    return [{"id": call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}} for c in calls]


def call_id() -> str:
    """9 letters and digits: Mistral's templates refuse any other tool call id (OpenAI clients take any)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def chat_messages(messages: list[dict], tools: ToolRequest, template_has_tools: bool) -> tuple[list[dict], list | None]:
    """(messages, tools) for the chat template: as they are for a template that renders tools, else
    with tools, calls and results written as plain messages."""
    offered = [t.openai() for t in tools.tools] if tools.tools and tools.mode != "none" else None
    if template_has_tools:
        return [_template_message(m) for m in messages], offered
    out = []
    if offered:
        listing = "\n".join(json.dumps(t["function"], separators=(",", ":")) for t in offered)
        out.append({"role": "system", "content": 'To call functions, answer [{"name": ..., "arguments": {...}}]. '
                    "Functions:\n" + listing})
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"Result of call {m.get('tool_call_id', '')}: {m['content']}"})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps(calls)})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    if out and out[0]["role"] == "system" and len(out) > 1 and out[1]["role"] == "system":  # one system message
        out[:2] = [{"role": "system", "content": out[0]["content"] + "\n\n" + out[1]["content"]}]
    return out, None


def _template_message(m: dict) -> dict:
    """A message as transformers hands it to a template: calls' arguments as objects."""
    if m["role"] == "assistant" and m.get("tool_calls"):
        calls = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"] or "{}")}}
                 for c in m["tool_calls"]]
        return {**m, "tool_calls": calls}
    return m


def check_history(messages: list[dict]) -> None:
    """Tool messages and assistant calls are well-formed (InvalidRequest naming `messages`)."""
    for i, m in enumerate(messages):
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise InvalidRequest(f"messages[{i}]: a tool message needs tool_call_id", "messages")
        calls = m.get("tool_calls")
        if calls is None:
            continue
        if m["role"] != "assistant" or not isinstance(calls, list):
            raise InvalidRequest(f"messages[{i}].tool_calls must be a list on an assistant message", "messages")
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise InvalidRequest(f"messages[{i}].tool_calls: each needs function.name", "messages")
            try:
                json.loads(fn.get("arguments") or "{}")
            except (TypeError, json.JSONDecodeError):
                raise InvalidRequest(f"messages[{i}].tool_calls: function.arguments must be a JSON string",
                                     "messages") from None
