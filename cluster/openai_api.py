"""The OpenAI-compatible HTTP door: /v1/completions, /v1/chat/completions, /v1/models, /health.

Served on Serve's HTTP proxy by the same front replica as the gRPC methods (the Generator class
inherits these routes; `serve.ingress` binds them), so both doors drive one engine loop. A body is
parsed here by hand — never by a framework's model, whose failures would be 422s — into the same
`build_request` arguments the gRPC door uses, so a field means the same thing and meets the same
limits either way. Every error is OpenAI-shaped JSON, {"error": {"message", "type", "param",
"code"}}, with its status: 400 invalid body, 401 missing or wrong key, 404 unknown model, 429 server
busy, 503 experts unavailable, 500 otherwise (with no internals in the message).

Several choices: `n` (both endpoints) and a batch of prompts (completions: a list of strings or of
token-id lists) are one engine sequence each, generated side by side; choice k of prompt p has
index p·n + k, and with a `seed` choice k samples with seed + k (so choices differ, and the same
request gives the same choices). Usage counts each prompt once and every choice's tokens.

Where raymoe differs from OpenAI, on purpose: `temperature` defaults to 0 (greedy), as in raymoe's
gRPC API; `best_of`, `echo`, `suffix`, penalties, `logit_bias`, tools and response formats other
than their neutral values are refused with a 400 naming the field rather than ignored. Extra
fields raymoe understands: `top_k`, `ignore_eos`, `stop_token_ids`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raymoe.model.errors import BackendUnavailable, InvalidRequest

app = FastAPI(title="raymoe", description="OpenAI-compatible API of a raymoe server", docs_url=None, redoc_url=None,
              openapi_url=None)

COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user",
          "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "ignore_eos", "stop_token_ids"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
                        "tools", "tool_choice", "parallel_tool_calls"}
MAX_CHOICES = 64  # prompts × n in one request (each is a sequence of the engine)
NEUTRAL = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
           "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
           "tools": (None, []), "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
           "response_format": (None, {"type": "text"})}


class HttpError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


@app.exception_handler(HttpError)
async def _http_error(_request: Request, error: HttpError) -> JSONResponse:
    return error.response()


@app.exception_handler(StarletteHTTPException)
async def _framework_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods answer in OpenAI's shape too."""
    return HttpError(error.status_code, str(error.detail), "invalid_request_error",
                     code="not_found" if error.status_code == 404 else None).response()


def http_error_for(error: BaseException) -> HttpError:
    """The same classification as the gRPC door's (cluster.ingress._status_for)."""
    from ray.exceptions import RayError

    from .auth import PermissionDenied, Unauthenticated
    from .engine_loop import QueueFull
    from .quota import QuotaExceeded

    if isinstance(error, HttpError):
        return error
    if isinstance(error, InvalidRequest) and not isinstance(error, RayError):
        param = {"prompt_token_ids": "prompt", "resume_token_ids": None}.get(error.field, error.field)
        return HttpError(400, str(error), param=param)
    if isinstance(error, QueueFull):
        return HttpError(429, str(error), "rate_limit_error", code="server_busy")
    if isinstance(error, QuotaExceeded):
        return HttpError(429, str(error), "rate_limit_error", code="quota_exceeded",
                         headers={"Retry-After": str(int(error.retry_after_s))})
    if isinstance(error, Unauthenticated):
        return HttpError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                         "authentication_error", code="invalid_api_key")
    if isinstance(error, PermissionDenied):
        return HttpError(403, str(error), "permission_error", code="permission_denied")
    if isinstance(error, BackendUnavailable) and not isinstance(error, RayError):
        return HttpError(503, str(error), "service_unavailable", code="experts_unavailable")
    import logging

    logging.getLogger("ray.serve").error("HTTP request failed", exc_info=error)
    return HttpError(500, f"internal error ({type(error).__name__}); see the replica's log", "internal_error")


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
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty list", param="messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise HttpError(400, f"messages[{i}] must be an object with a string role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise HttpError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise HttpError(400, f"messages[{i}].content must be a string", param="messages")
        plain.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    want_logprobs = _typed(body, "logprobs", (bool,), "a boolean")
    top = _typed(body, "top_logprobs", (int,), "an integer")
    if top and not want_logprobs:
        raise HttpError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if top is not None and not 0 <= top <= 20:
        raise HttpError(400, f"top_logprobs must be between 0 and 20 (got {top})", param="top_logprobs")
    kw["logprobs"] = (top or 0) if want_logprobs else 0
    stream, usage = _stream_flags(body)
    return kw, plain, stream, usage, bool(want_logprobs)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _typed(body, "stream", (bool,), "a boolean") or False
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if usage and not stream:
        raise HttpError(400, "stream_options is only for stream: true", param="stream_options")
    return stream, usage


# --- the routes --------------------------------------------------------------------------------

def _front() -> "OpenAIRoutes":
    """The replica's Generator. The routes are plain functions that look it up, rather than methods
    bound by Serve's class-based views: those are bound by changing the functions' signatures in
    the process that applies `serve.ingress`, which a replica unpickling the app does not repeat."""
    from ray import serve

    return serve.get_replica_context().servable_object


@app.get("/health")
async def health() -> JSONResponse:
    return await _front().http_health()


@app.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    return await _front().http_models(request)


@app.post("/v1/completions")
async def completions(request: Request):
    return await _front().http_completions(request)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _front().http_chat_completions(request)


class OpenAIRoutes:
    """Mixed into the front deployment (cluster.ingress.Generator), which provides `loop`, `cfg`,
    `limits`, `tokenizer`, `chat`, `model_id`, `tenants`, `pool_health` and `serving`."""

    async def http_health(self) -> JSONResponse:
        ok = self.serving
        status = "ok" if ok else "loading" if self.loop.loading else "unavailable"
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    async def http_models(self, request: Request) -> JSONResponse:
        try:
            self._http_auth(request)
        except HttpError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "raymoe"}]})

    async def http_completions(self, request: Request):
        try:
            tenant = self._http_auth(request)
            body = await self._json_body(request)
            kw, prompts, (stream, usage) = parse_completion(body)
            self._check_model(body)
            n = kw.pop("n")
            reqs = await asyncio.to_thread(lambda: [self._build({**kw, **p}) for p in prompts])  # off the event loop
            share = await self._share(tenant, reqs, n)
        except Exception as e:  # noqa: BLE001
            return http_error_for(e).response()
        view = _CompletionView(self, reqs, n, "text_completion", "cmpl", logprobs=wants_logprobs(body), share=share)
        return _closing(await view.respond(stream, usage), share)

    async def http_chat_completions(self, request: Request):
        try:
            tenant = self._http_auth(request)
            body = await self._json_body(request)
            kw, messages, stream, usage, want_logprobs = parse_chat(body)
            self._check_model(body)
            if self.chat is None or self.tokenizer is None:
                raise HttpError(400, "this model has no chat template (no chat_template in its "
                                "tokenizer_config.json); use /v1/completions", param="messages",
                                code="no_chat_template")
            from raymoe.model.chat import ChatError

            try:
                kw["prompt_ids"] = await asyncio.to_thread(self.chat.prompt_ids, self.tokenizer, messages)
            except ChatError as e:
                raise HttpError(400, str(e), param="messages") from None
            n = kw.pop("n")
            req = await asyncio.to_thread(self._build, kw)
            share = await self._share(tenant, [req], n)
        except Exception as e:  # noqa: BLE001
            return http_error_for(e).response()
        view = _CompletionView(self, [req], n, "chat.completion", "chatcmpl", chat=True, logprobs=want_logprobs,
                               share=share)
        return _closing(await view.respond(stream, usage), share)

    # --- helpers ---

    def _http_auth(self, request: Request):
        """The caller's tenant; 401 (as HttpError) for a missing or unknown key."""
        from .auth import http_tenant

        try:
            return http_tenant(self.tenants, request)
        except Exception as e:  # noqa: BLE001 — Unauthenticated
            raise http_error_for(e) from None

    async def _json_body(self, request: Request) -> dict:
        from .http_body import BodyError, read_json_body

        try:
            return await read_json_body(request)
        except BodyError as e:
            raise HttpError(e.status, e.message, param=e.field) from None

    async def _share(self, tenant, reqs: list, n: int):
        """The request's Owner (the tenant's share, its quota lease): every choice is a sequence."""
        tokens = n * sum(len(r.prompt_ids) + r.params.max_tokens for r in reqs)
        return await self.quota.owner(tenant, n * len(reqs), tokens, max(r.params.max_tokens for r in reqs))

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise HttpError(404, f"model {model!r} is not served here (this server serves {self.model_id!r})",
                            param="model", code="model_not_found")

    def _build(self, kw: dict):
        from .requests import build_request

        return build_request(self.cfg, self.limits, self.tokenizer, **kw)



class _CompletionView:
    """One request's answer in OpenAI's shapes, whole or as server-sent events: a choice per
    (prompt, k < n), each its own sequence of the engine."""

    def __init__(self, owner: OpenAIRoutes, reqs: list, n: int, obj: str, prefix: str, chat: bool = False,
                 logprobs: bool = False, share=None) -> None:
        self.owner, self.reqs, self.n, self.obj, self.chat, self.logprobs = owner, reqs, n, obj, chat, logprobs
        self.share = share  # the tenant's Owner of every choice's sequence (cluster/engine_loop.py)
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.choices = [(r, k) for r in reqs for k in range(n)]  # index p·n + k
        self.text_offset = [0] * len(self.choices)  # characters of each completion so far (text_offset)

    def _chunks(self, index: int):
        r, k = self.choices[index]
        params = r.params
        if k and params.seed is not None:  # choice k samples with its own seed (without one: random each)
            params = dataclasses.replace(params, seed=(params.seed + k) % 2**64)
        return self.owner.loop.generate(r.prompt_ids, params, r.stop, owner=self.share)

    def _usage(self, completion_tokens: int) -> dict:
        n = sum(len(r.prompt_ids) for r in self.reqs)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and UTF-8 bytes as it stands in the output (a byte piece is its byte)."""
        tok = self.owner.tokenizer
        if tok is None:
            return str(token_id), []
        piece = tok.piece(token_id)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            raw = bytes([int(piece[3:5], 16)])
        else:
            raw = piece.replace("\u2581", " ").encode()
        return raw.decode(errors="replace"), list(raw)

    def _logprobs(self, index: int, chunks: list) -> dict | None:
        if not self.logprobs:
            return None
        ids = [t for c in chunks for t in c.token_ids]
        lps = [lp for c in chunks for lp in c.logprobs]
        tops = [row for c in chunks for row in c.top]
        if self.chat:
            def entry(t, lp):
                text, raw = self._token(t)
                return {"token": text, "logprob": lp, "bytes": raw}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in row]}
                                for t, lp, row in zip(ids, lps, tops)]}
        offsets, texts = [], []
        for t in ids:
            text, _ = self._token(t)
            offsets.append(self.text_offset[index])
            texts.append(text)
            self.text_offset[index] += len(text)
        return {"tokens": texts, "token_logprobs": lps,
                "top_logprobs": [{self._token(a)[0]: b for a, b in row} for row in tops], "text_offset": offsets}

    def _choice(self, index: int, text: str, chunks: list, finish: str | None, delta: bool,
                first: bool = False) -> dict:
        lp = self._logprobs(index, chunks)
        if not self.chat:
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        if delta:
            d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": d, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                "finish_reason": finish}

    def _envelope(self, choices: list[dict], usage: dict | None, chunk: bool, usage_field: bool = True) -> dict:
        obj = self.obj + (".chunk" if chunk and self.chat else "")
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.owner.model_id, "choices": choices}
        if usage_field:
            out["usage"] = usage
        return out

    async def respond(self, stream: bool, usage_in_stream: bool):
        gens = [self._chunks(i) for i in range(len(self.choices))]
        firsts = [asyncio.ensure_future(_first(g)) for g in gens]
        # Before the status line, so that a refused request is still a 400 / 429 / 503: a stream waits
        # for the first choice to have its first chunk (refusals come before any token), a whole
        # answer for every choice's.
        try:
            await asyncio.wait(firsts, return_when=asyncio.FIRST_COMPLETED if stream else asyncio.ALL_COMPLETED)
        except asyncio.CancelledError:  # the client left before the status line
            await _stop(firsts, gens)
            raise
        failed = next((t.exception() for t in firsts if t.done() and not t.cancelled() and t.exception()), None)
        if failed is not None:
            await _stop(firsts, gens)
            self.owner._count(str(http_error_for(failed).status))
            return http_error_for(failed).response()
        if stream:
            return StreamingResponse(self._events(firsts, gens, usage_in_stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        tasks = [asyncio.ensure_future(_rest(first, g)) for first, g in zip(firsts, gens)]
        try:
            got = await asyncio.gather(*tasks)
        except Exception as e:  # noqa: BLE001 — one choice failed: the others stop too (their sequences end)
            await _stop(tasks, gens)
            self.owner._count(str(http_error_for(e).status))
            return http_error_for(e).response()
        self.owner._count("ok")
        choices, done = [], 0
        for i, chunks in enumerate(got):
            text = "".join(c.text for c in chunks)
            finish = chunks[-1].finish_reason if chunks else "length"
            done += chunks[-1].completion_tokens if chunks else 0
            choices.append(self._choice(i, text, chunks, finish, delta=False))
        return JSONResponse(self._envelope(choices, self._usage(done), False))

    async def _events(self, firsts: list, gens: list, usage_in_stream: bool) -> AsyncIterator[str]:
        done = [0] * len(gens)
        try:
            async with contextlib.aclosing(_merge(firsts, gens)) as merged:  # a client gone mid-stream aborts now
                async for i, c, is_first in merged:
                    done[i] = c.completion_tokens
                    choice = self._choice(i, c.text, [c], c.finish_reason, delta=True, first=is_first)
                    yield f"data: {json.dumps(self._envelope([choice], None, True, usage_field=usage_in_stream))}\n\n"
            if usage_in_stream:
                yield f"data: {json.dumps(self._envelope([], self._usage(sum(done)), True))}\n\n"
            self.owner._count("ok")
        except Exception as e:  # noqa: BLE001 — the status line is sent; the error is an event
            err = http_error_for(e)
            self.owner._count(str(err.status))
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'param': err.param, 'code': err.code}})}\n\n"
        yield "data: [DONE]\n\n"


def _closing(response, share):
    """The response, returning the quota lease once it has been sent (a stream: at its end)."""
    from .quota import close_lease

    if not isinstance(response, StreamingResponse):
        close_lease(share)
        return response
    body = response.body_iterator

    async def closing():
        try:
            async for part in body:
                yield part
        finally:
            close_lease(share)

    response.body_iterator = closing()
    return response


async def _first(gen):
    """A generator's first chunk (None when it ends without one)."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _rest(first: asyncio.Future, gen) -> list:
    """Every chunk of one choice, its first from the task that is reading it."""
    head = await first
    got = [] if head is None else [head]
    async with contextlib.aclosing(gen):
        async for c in gen:
            got.append(c)
    return got


async def _stop(tasks: list, gens: list) -> None:
    """Cancel the tasks reading the choices, then close every generator: their sequences end."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for gen in gens:
        with contextlib.suppress(Exception):
            await gen.aclose()


async def _merge(firsts: list, gens: list) -> AsyncIterator[tuple[int, Any, bool]]:
    """(choice index, chunk, its first?) from every choice as they come (`firsts`: the tasks reading
    each choice's first chunk); a choice's error is raised, and ending the iteration for any reason
    stops every choice."""
    tasks: list = []
    try:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                head = await firsts[i]
                if head is not None:
                    queue.put_nowait((i, head, None))
                async for c in gens[i]:
                    queue.put_nowait((i, c, None))
            except Exception as e:  # noqa: BLE001
                queue.put_nowait((i, None, e))
            finally:
                queue.put_nowait((i, None, None))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(gens))]
        seen, left = [False] * len(gens), len(gens)
        while left:
            i, c, error = await queue.get()
            if error is not None:
                raise error
            if c is None:
                left -= 1
                continue
            yield i, c, not seen[i]
            seen[i] = True
    finally:
        await _stop(tasks + list(firsts), gens)
