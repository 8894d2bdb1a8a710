"""The OpenAI door's answers: one request's choices in OpenAI's shapes, whole or as server-sent events.

Several choices: `n` (both endpoints) and a batch of prompts (completions: a list of strings or of
token-id lists) are one engine sequence each, generated side by side; choice k of prompt p has
index p·n + k, and with a `seed` choice k samples with seed + k (so choices differ, and the same
request gives the same choices). Usage counts each prompt once and every choice's tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from .openai_guided import ToolCallStream, chat_message
from .openai_request import CHAT_NAMES, COMPLETION_NAMES, http_error_for


class CompletionView:
    """One request's answer in OpenAI's shapes, whole or as server-sent events: a choice per
    (prompt, k < n), each its own sequence of the engine."""

    def __init__(self, owner, reqs: list, n: int, obj: str, prefix: str, chat: bool = False,
                 logprobs: bool = False, tools=None, share=None) -> None:
        self.owner, self.reqs, self.n, self.obj, self.chat, self.logprobs = owner, reqs, n, obj, chat, logprobs
        self.share = share  # the tenant's Owner of every choice's sequence (cluster/engine_loop.py)
        self.tools = tools if tools is not None and tools.active else None  # the answers may be tool calls
        self.names = CHAT_NAMES if chat else COMPLETION_NAMES  # the endpoint's spelling of the fields in errors
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.choices = [(r, k) for r in reqs for k in range(n)]  # index p·n + k
        self.text_offset = [0] * len(self.choices)  # characters of each completion so far (text_offset)

    def _chunks(self, index: int):
        r, k = self.choices[index]
        params = r.params
        if k and params.seed is not None:  # choice k samples with its own seed (without one: random each)
            params = dataclasses.replace(params, seed=(params.seed + k) % 2**64)
        tenant = self.share.tenant if self.share is not None else ""  # its name salts the prefix cache
        return self.owner.generate(r.prompt_ids, params, r.stop, owner=self.share,
                                   cache_salt=self.owner.cache_salt(tenant, r.cache_salt))

    def _usage(self, completion_tokens: int, cached: list[int]) -> dict:
        """cached: each choice's cached prompt tokens; a prompt counts once, as its first choice found it."""
        n = sum(len(r.prompt_ids) for r in self.reqs)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(cached[::self.n])}}

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and UTF-8 bytes as it stands in the output (a byte piece is its byte)."""
        tok = self.owner.tokenizer
        if tok is None:
            return str(token_id), []
        raw = tok.token_bytes(token_id)
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
        if self.tools is not None:
            message, finish = chat_message(text, self.tools, finish)
            return {"index": index, "message": message, "logprobs": lp, "finish_reason": finish}
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
            self.owner._count(str(http_error_for(failed, self.names).status))
            return http_error_for(failed, self.names).response()
        if stream:
            return StreamingResponse(self._events(firsts, gens, usage_in_stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        tasks = [asyncio.ensure_future(_rest(first, g)) for first, g in zip(firsts, gens)]
        try:
            got = await asyncio.gather(*tasks)
        except Exception as e:  # noqa: BLE001 — one choice failed: the others stop too (their sequences end)
            await _stop(tasks, gens)
            self.owner._count(str(http_error_for(e, self.names).status))
            return http_error_for(e, self.names).response()
        self.owner._count("ok")
        choices, done = [], 0
        cached = [chunks[-1].cached_tokens if chunks else 0 for chunks in got]
        for i, chunks in enumerate(got):
            text = "".join(c.text for c in chunks)
            finish = chunks[-1].finish_reason if chunks else "length"
            done += chunks[-1].completion_tokens if chunks else 0
            choices.append(self._choice(i, text, chunks, finish, delta=False))
        return JSONResponse(self._envelope(choices, self._usage(done, cached), False))

    async def _events(self, firsts: list, gens: list, usage_in_stream: bool) -> AsyncIterator[str]:
        done, cached = [0] * len(gens), [0] * len(gens)
        calls = [ToolCallStream() for _ in gens] if self.tools is not None else None
        try:
            async with contextlib.aclosing(_merge(firsts, gens)) as merged:  # a client gone mid-stream aborts now
                async for i, c, is_first in merged:
                    done[i], cached[i] = c.completion_tokens, c.cached_tokens
                    choice = self._choice(i, c.text, [c], c.finish_reason, delta=True, first=is_first)
                    if calls is not None:  # text, or tool calls held to their end
                        delta, _, was_call = calls[i].push(c.text, c.finish_reason is not None)
                        choice["delta"] = {**({"role": "assistant"} if is_first else {}), **(delta or {})}
                        if was_call and c.finish_reason == "stop":
                            choice["finish_reason"] = "tool_calls"
                    yield f"data: {json.dumps(self._envelope([choice], None, True, usage_field=usage_in_stream))}\n\n"
            if usage_in_stream:
                yield f"data: {json.dumps(self._envelope([], self._usage(sum(done), cached), True))}\n\n"
            self.owner._count("ok")
        except Exception as e:  # noqa: BLE001 — the status line is sent; the error is an event
            err = http_error_for(e, self.names)
            self.owner._count(str(err.status))
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'param': err.param, 'code': err.code}})}\n\n"
        yield "data: [DONE]\n\n"


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
