"""Token ids in, finished completions out: the engine plus detokenization and stop strings.

Shared by every front end (the CLI's in-process and remote-expert runs, the gRPC server) so that
they all cut text, count tokens and report finish reasons the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable

from .engine import Engine, TokenEvent
from .sampling import SamplingParams
from .tokenizer import TextStream, Tokenizer


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids,
                               "logprobs": self.logprobs, "text": self.text, "finish_reason": self.finish_reason}
        if any(self.top_logprobs):
            out["top_logprobs"] = [[{"token_id": t, "logprob": lp} for t, lp in row] for row in self.top_logprobs]
        return out


class CompletionTracker:
    """Follows one sequence's token events: collects tokens, streams text, applies stop strings."""

    def __init__(self, prompt_ids: list[int], tokenizer: Tokenizer | None, stop: list[str]) -> None:
        self.completion = Completion(list(prompt_ids))
        self.stream = TextStream(tokenizer, prompt_ids, stop) if tokenizer is not None else None

    def resume(self, token_ids: list[int], text_bytes: int, params: SamplingParams,
               eos_ids: frozenset[int] | tuple[int, ...]) -> str | None:
        """Take the tokens a broken stream already delivered, of which the client has `text_bytes`
        bytes of text, as if they had just been generated (nothing is sent for them). Returns the
        finish reason if they already end the generation, else None. Raises ValueError when
        text_bytes is not a prefix of their text."""
        reason = None
        for token in token_ids:
            self.on_token(TokenEvent(None, token, float("nan"), [], None))
            if token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids):
                reason = "stop"
        c = self.completion
        if self.stream is not None:
            text = self.stream.text
            chars = _chars_for_bytes(text, text_bytes)
            if chars is None:
                raise ValueError(f"resume_text_bytes {text_bytes} does not end a character of the resumed tokens' "
                                 f"text ({len(text.encode())} bytes)")
            self.stream.sent = chars
            c.text = text[:chars]
            if self.stream.stopped:
                reason = "stop"
        elif text_bytes:
            raise ValueError("resume_text_bytes given, but this model has no tokenizer (no text is sent)")
        if reason is None and len(token_ids) >= params.max_tokens:
            reason = "length"
        c.finish_reason = reason
        return reason

    def on_token(self, ev: TokenEvent) -> tuple[str, bool]:
        """Apply one event; returns (new text, whether the sequence is now finished)."""
        c = self.completion
        c.token_ids.append(ev.token_id)
        c.logprobs.append(ev.logprob)
        c.top_logprobs.append(ev.top)
        delta = ""
        if self.stream is not None:
            delta = self.stream.push(ev.token_id)
            if self.stream.stopped:
                c.finish_reason = "stop"
            elif ev.finish_reason:
                delta += self.stream.finish()
        c.finish_reason = c.finish_reason or ev.finish_reason
        c.text += delta
        return delta, c.finish_reason is not None


def _chars_for_bytes(text: str, n: int) -> int | None:
    """The number of characters of `text` whose UTF-8 encoding is `n` bytes (None if none is)."""
    total = 0
    for i, ch in enumerate(text):
        if total == n:
            return i
        total += len(ch.encode())
    return len(text) if total == n else None


def complete(engine: Engine, tokenizer: Tokenizer | None, prompts: list[list[int]],
             params: list[SamplingParams], stops: list[list[str]] | None = None,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Run prompts to completion together; `on_text(i, delta)` sees text as it is produced."""
    stops = stops or [[] for _ in prompts]
    trackers: dict[Hashable, tuple[int, CompletionTracker]] = {}
    for i, (p, sp, st) in enumerate(zip(prompts, params, stops)):
        seq_id = ("complete", i)
        engine.add(seq_id, p, sp)
        trackers[seq_id] = (i, CompletionTracker(p, tokenizer, st))
    while engine.has_work():
        for ev in engine.step():
            if ev.error is not None:
                raise ev.error
            i, tracker = trackers[ev.seq_id]
            delta, done = tracker.on_token(ev)
            if delta and on_text:
                on_text(i, delta)
            if done and ev.finish_reason is None:  # a stop string ended it before the engine did
                engine.abort(ev.seq_id, "stop")
    return [t.completion for _, t in sorted(trackers.values(), key=lambda it: it[0])]
