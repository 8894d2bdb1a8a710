"""The OpenAI-compatible HTTP door: /v1/completions, /v1/chat/completions, /v1/models, /health.

Served on Serve's HTTP proxy by the same front replica as the gRPC methods (the Generator class
inherits these routes; `serve.ingress` binds them), so both doors drive one engine loop. The body is
parsed in cluster/openai_request.py and the answer shaped in cluster/openai_response.py.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raymoe.model.chat import ChatError

from .auth import http_tenant
from .failures import Unauthenticated
from .openai_request import CHAT_NAMES, HttpError, http_error_for, parse_chat, parse_completion, wants_logprobs
from .openai_response import CompletionView
from .quota import close_lease
from .requests import build_request
from .tools import chat_messages

app = FastAPI(title="raymoe", description="OpenAI-compatible API of a raymoe server", docs_url=None, redoc_url=None,
              openapi_url=None)


@app.exception_handler(HttpError)
async def _http_error(_request: Request, error: HttpError) -> JSONResponse:
    return error.response()


@app.exception_handler(StarletteHTTPException)
async def _framework_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods answer in OpenAI's shape too."""
    return HttpError(error.status_code, str(error.detail), "invalid_request_error",
                     code="not_found" if error.status_code == 404 else None).response()


# --- the routes --------------------------------------------------------------------------------

def _front() -> "OpenAIRoutes":
    """The replica's Generator. The routes are plain functions that look it up, rather than methods
    bound by Serve's class-based views: those are bound by changing the functions' signatures in
    the process that applies `serve.ingress`, which a replica unpickling the app does not repeat."""
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
    `limits`, `tokenizer`, `chat`, `model_id`, `tenants`, `quota`, `pool_health`, `serving`, `generate`
    (a sequence's chunks) and `cache_salt`."""

    async def http_health(self) -> JSONResponse:
        ok = self.serving
        status = "ok" if ok else "loading" if self.loop.loading else "unavailable"
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    async def http_models(self, request: Request) -> JSONResponse:
        try:
            self._http_auth(request)
        except Unauthenticated as e:
            return http_error_for(e).response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "raymoe"}]})

    async def http_completions(self, request: Request):
        try:
            tenant = self._http_auth(request)
            await self.quota.refuse_early(tenant)  # before reading the body: an over-limit tenant's refusal stays cheap
            body = await self._json_body(request)
            kw, prompts, (stream, usage) = parse_completion(body)
            self._check_model(body)
            n = kw.pop("n")
            reqs = await asyncio.to_thread(lambda: [self._build({**kw, **p}) for p in prompts])  # off the event loop
            share = await self._share(tenant, reqs, n)
        except Exception as e:  # noqa: BLE001
            return http_error_for(e).response()
        view = CompletionView(self, reqs, n, "text_completion", "cmpl", logprobs=wants_logprobs(body), share=share)
        return _closing(await view.respond(stream, usage), share)

    async def http_chat_completions(self, request: Request):
        try:
            tenant = self._http_auth(request)
            await self.quota.refuse_early(tenant)  # before reading the body: an over-limit tenant's refusal stays cheap
            body = await self._json_body(request)
            kw, messages, stream, usage, want_logprobs = parse_chat(body)
            self._check_model(body)
            if self.chat is None or self.tokenizer is None:
                raise HttpError(400, "this model has no chat template (no chat_template in its "
                                "tokenizer_config.json); use /v1/completions", param="messages",
                                code="no_chat_template")
            messages, offered = chat_messages(messages, kw["tools"], self.chat.uses_tools)
            try:
                kw["prompt_ids"] = await asyncio.to_thread(self.chat.prompt_ids, self.tokenizer, messages, offered)
            except ChatError as e:
                raise HttpError(400, str(e), param="messages") from None
            n = kw.pop("n")
            req = await asyncio.to_thread(self._build, kw)
            share = await self._share(tenant, [req], n)
        except Exception as e:  # noqa: BLE001
            return http_error_for(e, CHAT_NAMES).response()
        view = CompletionView(self, [req], n, "chat.completion", "chatcmpl", chat=True, logprobs=want_logprobs,
                              tools=req.tools, share=share)
        return _closing(await view.respond(stream, usage), share)

    # --- helpers ---

    def _http_auth(self, request: Request):
        """The caller's tenant (Unauthenticated for a missing or unknown key)."""
        return http_tenant(self.tenants, request)

    async def _share(self, tenant, reqs: list, n: int):
        """The request's Owner (the tenant's share, its quota lease): every choice is a sequence."""
        tokens = n * sum(len(r.prompt_ids) + r.params.max_tokens for r in reqs)
        return await self.quota.owner(tenant, n * len(reqs), tokens, max(r.params.max_tokens for r in reqs))

    async def _json_body(self, request: Request) -> dict:
        from .http_body import BodyError, read_json_body

        try:
            return await read_json_body(request)
        except BodyError as e:
            raise HttpError(e.status, e.message, param=e.field) from None

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise HttpError(404, f"model {model!r} is not served here (this server serves {self.model_id!r})",
                            param="model", code="model_not_found")

    def _build(self, kw: dict):
        return build_request(self.cfg, self.limits, self.tokenizer, grammars=self.grammars, **kw)


def _closing(response, share):
    """The response, returning the quota lease once it has been sent (a stream: at its end; a
    choice cancelled before it started reports nothing itself)."""
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
