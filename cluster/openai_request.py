"""The OpenAI door's request side: a JSON body → `build_request` arguments, and the error shape.

A body is parsed here by hand — never by a framework's model, whose failures would be 422s — into
the same `build_request` arguments the gRPC door uses, so a field means the same thing and meets
the same limits either way. Every error is OpenAI-shaped JSON, {"error": {"message", "type",
"param", "code"}}, with its status: 400 invalid body, 401 missing or wrong key, 404 unknown model,
429 server busy, 503 experts unavailable, 500 otherwise (with no internals in the message).

Where raymoe differs from OpenAI, on purpose: `temperature` defaults to 0 (greedy), as in raymoe's
gRPC API; `best_of`, `echo`, `suffix`, penalties, `logit_bias`, tools and response formats other
than their neutral values are refused with a 400 naming the field rather than ignored. Extra
fields raymoe understands: `top_k`, `ignore_eos`, `stop_token_ids`, and vLLM's `cache_salt`.
Usage reports `prompt_tokens_details.cached_tokens`: prompt tokens found in the prefix cache.
Structured output (`response_format`, `tools`, `tool_choice`, `parallel_tool_calls`):
cluster/openai_guided.py.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from .failures import classify
from .openai_guided import parse_chat_tools, parse_response_format, plain_messages

COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user",
          "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "ignore_eos", "stop_token_ids",
          "cache_salt"}  # vLLM's: only requests with the same salt (and API key) share cached prompt blocks
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
                        "tools", "tool_choice", "parallel_tool_calls"}
MAX_CHOICES = 64  # prompts × n in one request (each is a sequence of the engine)
NEUTRAL = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
           "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}


class HttpError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers  # e.g. Retry-After

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# build_request's field names (the gRPC API's) that an OpenAI endpoint spells otherwise, or lacks (None).
COMPLETION_NAMES: dict[str | None, str | None] = {"prompt_token_ids": "prompt", "resume_token_ids": None}
CHAT_NAMES = {**COMPLETION_NAMES, "logprobs": "top_logprobs"}  # chat's count of alternatives


def http_error_for(error: BaseException, names: dict[str | None, str | None] = COMPLETION_NAMES) -> HttpError:
    """An HttpError raised while parsing as it is; anything else as cluster/failures.py classifies it,
    its field (and the message that starts with it) in the endpoint's own `names`."""
    if isinstance(error, HttpError):
        return error
    failure = classify(error)
    param, message = names.get(failure.field, failure.field), failure.message
    if failure.field and param and param != failure.field and message.startswith(failure.field + " "):
        message = param + message[len(failure.field):]
    headers = None if failure.retry_after_s is None else {"Retry-After": str(failure.retry_after_s)}
    return HttpError(failure.http_status, message, failure.http_type, param=param, code=failure.http_code,
                     headers=headers)


# --- parsing -----------------------------------------------------------------------------------

def _typed(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise HttpError(400, f"{name} must be {what} (got {type(value).__name__})", param=name)
    return value


def _common(body: dict, allowed: set[str]) -> dict[str, Any]:
    """The sampling fields shared by both endpoints, type-checked (ranges: build_request)."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HttpError(400, f"unsupported field {unknown[0]!r}", param=unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise HttpError(400, f"{name} {body[name]!r} is not supported (only {neutral[1]!r})", param=name)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise HttpError(400, "stop must be a string or a list of strings", param="stop")
    stop_ids = body.get("stop_token_ids") or []
    if not (isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
        raise HttpError(400, "stop_token_ids must be a list of integers", param="stop_token_ids")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise HttpError(400, "stream_options must be an object", param="stream_options")
    number = (int, float)
    if body.get("max_tokens") == 0:
        raise HttpError(400, "max_tokens must be at least 1 (got 0)", param="max_tokens")
    if "model" in body and not isinstance(body["model"], (str, type(None))):
        raise HttpError(400, "model must be a string", param="model")
    n = _typed(body, "n", (int,), "an integer")
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise HttpError(400, f"n must be between 1 and {MAX_CHOICES} (got {n})", param="n")
    return dict(n=n or 1, max_tokens=_typed(body, "max_tokens", (int,), "an integer"),
                temperature=_typed(body, "temperature", number, "a number"),
                top_p=_typed(body, "top_p", number, "a number"),
                top_k=_typed(body, "top_k", (int,), "an integer"),
                seed=_typed(body, "seed", (int,), "an integer"),
                stop=stop or [], stop_token_ids=stop_ids,
                cache_salt=_typed(body, "cache_salt", (str,), "a string"),
                ignore_eos=bool(_typed(body, "ignore_eos", (bool,), "a boolean")))


def parse_completion(body: dict) -> tuple[dict, list[dict], tuple[bool, bool]]:
    """A completions body → (build_request kwargs but the prompt, one {"prompt"} or {"prompt_ids"}
    per prompt, (stream?, include usage in the stream?))."""
    kw = _common(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    batch = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) \
        else [prompt]
    prompts = [_one_prompt(p) for p in batch]
    if len(prompts) * kw["n"] > MAX_CHOICES:
        raise HttpError(400, f"{len(prompts)} prompts × n {kw['n']} = {len(prompts) * kw['n']} choices; the limit "
                        f"is {MAX_CHOICES}", param="prompt")
    kw["logprobs"] = _typed(body, "logprobs", (int,), "an integer")
    return kw, prompts, _stream_flags(body)


def _one_prompt(prompt: Any) -> dict:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"prompt_ids": prompt}
    raise HttpError(400, "prompt must be a string, a list of token ids, or a list of either", param="prompt")


def wants_logprobs(body: dict) -> bool:
    """Completions: `logprobs: 0` still asks for the chosen tokens' logprobs (no alternatives)."""
    return body.get("logprobs") is not None


def parse_chat(body: dict) -> tuple[dict, list[dict], bool, bool, bool]:
    """A chat body → (build_request kwargs without the prompt, messages, stream?, usage in stream?,
    logprobs wanted?)."""
    kw = _common(body, CHAT_FIELDS)
    if body.get("max_completion_tokens") is not None:
        kw["max_tokens"] = _typed(body, "max_completion_tokens", (int,), "an integer")
    plain = plain_messages(body.get("messages"))
    kw["guided"] = parse_response_format(body)
    kw["tools"] = parse_chat_tools(body)
    want_logprobs = _typed(body, "logprobs", (bool,), "a boolean")
    top = _typed(body, "top_logprobs", (int,), "an integer")
    if top and not want_logprobs:
        raise HttpError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    kw["logprobs"] = (top or 0) if want_logprobs else 0
    stream, usage = _stream_flags(body)
    return kw, plain, stream, usage, bool(want_logprobs)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _typed(body, "stream", (bool,), "a boolean") or False
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if usage and not stream:
        raise HttpError(400, "stream_options is only for stream: true", param="stream_options")
    return stream, usage
