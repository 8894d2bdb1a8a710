"""One request, checked once: plain values from either door (gRPC or HTTP) → what the engine runs.

Both front doors translate their wire format into `build_request`'s arguments, so a field means
the same thing, has the same default and meets the same limit whichever way it arrives. Every
failure is an InvalidRequest naming the field and, for a limit, the limit (the server's settings
in `RequestLimits` set them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from raymoe.model.config import ModelConfig
from raymoe.model.errors import InvalidRequest
from raymoe.model.guided import GrammarCache, GuidedSpec
from raymoe.model.sampling import GREEDY_BELOW, MAX_TEMPERATURE, SamplingParams, default_max_tokens
from raymoe.model.tokenizer import Tokenizer

from .tools import ToolRequest

MAX_CACHE_SALT_CHARS = 256


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """Server-side caps on what one request may ask for (0 = derived from the model); the values
    and their defaults come from ServeSettings (`request_limits()`)."""

    max_prompt_tokens: int  # 0 → the context minus one (room for one new token)
    max_tokens: int  # 0 → whatever the context leaves after the prompt
    max_stop_strings: int
    max_stop_chars: int  # per stop string
    max_stop_token_ids: int
    max_logprobs: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0 (got {getattr(self, f.name)})")


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    resume_ids: list[int] = dataclasses.field(default_factory=list)  # tokens already delivered
    resume_text_bytes: int = 0  # UTF-8 bytes of text already delivered for them
    cache_salt: str = ""  # the request's own part of the prefix cache's salt
    tools: ToolRequest = ToolRequest((), "none")  # the answer is read back as tool calls when active


def check_counts(cfg: ModelConfig, limits: RequestLimits, *, prompt_ids: int = 0, stop: int = 0,
                 stop_token_ids: int = 0, resume_ids: int = 0) -> None:
    """The lengths of a request's lists, checked before they are copied or looked at (a hostile
    message may carry millions of entries): the same limits build_request applies."""
    ctx = cfg.max_position_embeddings
    max_prompt = limits.max_prompt_tokens or ctx - 1
    if prompt_ids > max_prompt:
        raise InvalidRequest(f"prompt has {prompt_ids} tokens; the limit is {max_prompt}", "prompt")
    if stop > limits.max_stop_strings:
        raise InvalidRequest(f"at most {limits.max_stop_strings} stop strings are allowed (got {stop})", "stop")
    if stop_token_ids > limits.max_stop_token_ids:
        raise InvalidRequest(f"at most {limits.max_stop_token_ids} stop_token_ids are allowed "
                             f"(got {stop_token_ids})", "stop_token_ids")
    most = min(limits.max_tokens or ctx, ctx - 1)
    if resume_ids > most:
        raise InvalidRequest(f"resume_token_ids has {resume_ids} tokens; at most {most} can have been generated",
                             "resume_token_ids")


def build_request(cfg: ModelConfig, limits: RequestLimits, tokenizer: Tokenizer | None, *,
                  prompt: str | None = None, prompt_ids: Sequence[int] | None = None,
                  max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, logprobs: int | None = None,
                  stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                  add_bos: bool = True, resume_ids: Sequence[int] = (), resume_text_bytes: int = 0,
                  guided: GuidedSpec | None = None, grammars: GrammarCache | None = None,
                  tools: ToolRequest | None = None, cache_salt: str | None = None) -> Request:
    """Check every field against the model and the limits; None means "not set" (the default).
    `guided` is compiled here (through the replica's grammar cache), before any work is queued."""
    if (prompt is not None and prompt != "") == bool(prompt_ids):
        raise InvalidRequest("give exactly one of prompt and prompt_token_ids" if prompt
                             else "the prompt is empty: set prompt or prompt_token_ids", "prompt")
    ctx = cfg.max_position_embeddings
    max_prompt = limits.max_prompt_tokens or ctx - 1
    if prompt:
        if tokenizer is None:
            raise InvalidRequest("this model has no tokenizer; send prompt_token_ids instead of prompt", "prompt")
        if len(prompt) > 64 * max_prompt:  # no tokenizer gives more than a piece per char; bound the work first
            raise InvalidRequest(f"prompt is too long ({len(prompt)} characters; the limit is "
                                 f"{max_prompt} tokens)", "prompt")
        ids = tokenizer.encode(prompt, bos=add_bos)
    else:
        check_counts(cfg, limits, prompt_ids=len(prompt_ids))  # type: ignore[arg-type]
        ids = [int(t) for t in prompt_ids]  # type: ignore[union-attr]
    if len(ids) > max_prompt:
        raise InvalidRequest(f"prompt has {len(ids)} tokens; the limit is {max_prompt}", "prompt")
    bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {cfg.vocab_size})",
                             "prompt_token_ids")

    room = ctx - len(ids)
    cap = min(limits.max_tokens or room, room)
    n = default_max_tokens(cap) if max_tokens is None or max_tokens == 0 else int(max_tokens)
    if n < 1:
        raise InvalidRequest(f"max_tokens must be at least 1 (got {n})", "max_tokens")
    if n > cap:
        why = (f"the server's limit is {limits.max_tokens}" if limits.max_tokens and limits.max_tokens < room
               else f"the prompt ({len(ids)} tokens) leaves {room} of the model's {ctx}-token context")
        raise InvalidRequest(f"max_tokens is {n}; {why}", "max_tokens")

    t = 0.0 if temperature is None else float(temperature)
    if not math.isfinite(t) or t < 0:
        raise InvalidRequest(f"temperature must be a finite number >= 0 (got {t})", "temperature")
    if t > MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature must be at most {MAX_TEMPERATURE:g} (got {t:g})", "temperature")
    if t < GREEDY_BELOW:
        t = 0.0  # below this, sampling is greedy in all but name (and dividing by it overflows)
    p = 1.0 if top_p is None else float(top_p)
    if not math.isfinite(p) or not 0 < p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1] (got {p})", "top_p")
    k = 0 if top_k is None else int(top_k)
    if k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (got {k})", "top_k")
    k = 0 if k >= cfg.vocab_size else k  # every token: the same as no filter
    if seed is not None and not 0 <= int(seed) < 2**64:
        raise InvalidRequest(f"seed must be in [0, 2^64) (got {seed})", "seed")
    lp = 0 if logprobs is None else int(logprobs)
    if not 0 <= lp <= limits.max_logprobs:
        raise InvalidRequest(f"logprobs must be between 0 and {limits.max_logprobs} (got {lp})", "logprobs")

    check_counts(cfg, limits, stop=len(stop), stop_token_ids=len(stop_token_ids))
    stop = list(stop)
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest(f"at most {limits.max_stop_strings} stop strings are allowed (got {len(stop)})", "stop")
    for s in stop:
        if not isinstance(s, str) or not 1 <= len(s) <= limits.max_stop_chars:
            raise InvalidRequest(f"each stop string must have 1 to {limits.max_stop_chars} characters "
                                 f"(got {len(s) if isinstance(s, str) else type(s).__name__})", "stop")
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidRequest(f"at most {limits.max_stop_token_ids} stop_token_ids are allowed "
                             f"(got {len(stop_token_ids)})", "stop_token_ids")
    stops = frozenset(int(s) for s in stop_token_ids)
    bad = next((s for s in stops if not 0 <= s < cfg.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"stop token id {bad} is outside the vocabulary [0, {cfg.vocab_size})", "stop_token_ids")

    check_counts(cfg, limits, resume_ids=len(resume_ids))
    resumed = [int(r) for r in resume_ids]
    if len(ids) + len(resumed) > ctx:  # implied by the checks of max_tokens below; said first, plainly
        raise InvalidRequest(f"prompt ({len(ids)} tokens) + resume_token_ids ({len(resumed)}) exceed the "
                             f"model's {ctx}-token context", "resume_token_ids")
    if len(resumed) > n:
        raise InvalidRequest(f"resume_token_ids has {len(resumed)} tokens, more than max_tokens ({n})",
                             "resume_token_ids")
    bad = next((r for r in resumed if not 0 <= r < cfg.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"resume_token_ids: token id {bad} is outside the vocabulary [0, {cfg.vocab_size})",
                             "resume_token_ids")
    if resume_text_bytes and not resumed:
        raise InvalidRequest("resume_text_bytes needs resume_token_ids", "resume_text_bytes")
    if resumed and t > 0 and seed is None:
        raise InvalidRequest("resuming a sampled generation needs its seed (the first response's `seed`)", "seed")
    salt = cache_salt or ""
    if not isinstance(salt, str) or len(salt) > MAX_CACHE_SALT_CHARS:
        raise InvalidRequest(f"cache_salt must be a string of at most {MAX_CACHE_SALT_CHARS} characters", "cache_salt")
    compiled = None
    tools = tools or ToolRequest((), "none")
    if tools.active:
        if guided is not None:
            raise InvalidRequest(f"{guided.field} cannot be combined with tool calls (set tool_choice to none)",
                                 guided.field)
        guided = tools.spec()
    if guided is not None:
        if grammars is None:
            raise InvalidRequest("guided decoding needs the model's tokenizer, and this model has none", guided.field)
        if ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with guided decoding (the grammar decides where "
                                 "the answer ends)", "ignore_eos")
        compiled = grammars.compile(guided)
        if resume_ids:  # resumed tokens that leave the grammar: refused now, not once queued
            compiled.guide().replay([int(r) for r in resume_ids])
    params = SamplingParams(max_tokens=n, temperature=t, top_p=p, top_k=k, seed=None if seed is None else int(seed),
                            logprobs=lp, stop_token_ids=stops, ignore_eos=bool(ignore_eos), guided=compiled)
    # The seed is fixed here, so the first response can tell the client which one to resume with.
    params = dataclasses.replace(params, seed=params.effective_seed())
    return Request(ids, params, stop, resumed, int(resume_text_bytes), salt, tools)
