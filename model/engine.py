"""The generation engine: continuous batching over token ids. It knows nothing of text, protos or Ray.

Sequences are added at any time and join the running batch at the next `step()`. A step packs
one decode token of every running sequence plus prompt chunks of newly admitted ones (up to
`max_batch_tokens`), runs the model once, and samples for every sequence whose pending tokens are
all in the cache. A sequence is admitted only when the KV cache can hold its prompt plus
max_tokens, so memory stays bounded and nothing running is ever preempted.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Hashable

import torch

from .kv_cache import PagedKVCache
from .sampling import SamplingParams, sample
from .step import StepLayout, build_layout
from .transformer import Mixtral


@dataclasses.dataclass
class Sequence:
    seq_id: Hashable
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in the cache
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | ...

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def pending(self, limit: int) -> list[int]:
        """Up to `limit` tokens not yet in the cache (the rest of the prompt, or the last sampled token)."""
        n = len(self.prompt_ids)
        if self.num_cached < n:
            return self.prompt_ids[self.num_cached:self.num_cached + limit]
        return self.output_ids[self.num_cached - n:][:limit]


@dataclasses.dataclass
class TokenEvent:
    seq_id: Hashable
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    finish_reason: str | None  # set on the sequence's last token


class Engine:
    def __init__(self, model: Mixtral, *, kv_cache_tokens: int = 16384, block_size: int = 16,
                 max_batch_tokens: int = 2048, max_running: int = 64, micro_batches: int = 1) -> None:
        """micro_batches > 1 splits each step's batch so that, with remote experts, the attention of
        one part runs while another part's experts compute (see Mixtral.forward_micro)."""
        self.model, self.cfg = model, model.cfg
        self.cache = PagedKVCache(self.cfg, kv_cache_tokens, block_size=block_size, dtype=model.dtype)
        self.max_batch_tokens, self.max_running, self.micro_batches = max_batch_tokens, max_running, micro_batches
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[Hashable, Sequence] = {}
        self.last_batch = (0, 0)  # (sequences, tokens) of the latest step, for metrics

    # --- requests ---------------------------------------------------------------------------

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (a message for the user) if the request can never run."""
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        need, ctx = len(prompt_ids) + params.max_tokens, self.cfg.max_position_embeddings
        if need > ctx:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                             f"exceeds the model's context of {ctx} tokens")
        capacity = self.cache.num_blocks * self.cache.block_size
        if need > capacity:
            raise ValueError(f"prompt + max_tokens = {need} tokens exceeds the KV cache ({capacity} tokens)")

    def add(self, seq_id: Hashable, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        self.check(prompt_ids, params)
        if seq_id in self.running or any(s.seq_id == seq_id for s in self.waiting):
            raise ValueError(f"sequence id {seq_id!r} is already in use")
        seq = Sequence(seq_id, list(prompt_ids), params, params.generator())
        self.waiting.append(seq)
        return seq

    def abort(self, seq_id: Hashable, reason: str = "cancelled") -> Sequence | None:
        """End a sequence now (client gone, deadline, stop string) and free its memory."""
        seq = self.running.pop(seq_id, None)
        if seq is None:
            for s in self.waiting:
                if s.seq_id == seq_id:
                    self.waiting.remove(s)
                    seq = s
                    break
        if seq is not None:
            seq.finish_reason = seq.finish_reason or reason
            self.cache.release(seq_id)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- stepping ---------------------------------------------------------------------------

    def _schedule(self) -> list[tuple[Sequence, list[int]]]:
        budget = self.max_batch_tokens
        batch = []
        for seq in self.running.values():  # running sequences first: one decode token or a prompt chunk
            prefilling = seq.num_cached < len(seq.prompt_ids)
            chunk = seq.pending(max(budget, 0) if prefilling else 1)  # decoding never waits for budget
            if chunk:
                batch.append((seq, chunk))
                budget -= len(chunk)
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not self.cache.can_reserve(len(seq.prompt_ids) + seq.params.max_tokens):
                break  # first come, first served: wait for memory rather than overtake
            self.waiting.popleft()
            self.cache.reserve(seq.seq_id, len(seq.prompt_ids) + seq.params.max_tokens)
            self.running[seq.seq_id] = seq
            chunk = seq.pending(budget)
            batch.append((seq, chunk))
            budget -= len(chunk)
        return batch

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        batch = self._schedule()
        self.last_batch = (len(batch), sum(len(c) for _, c in batch))
        if not batch:
            return []
        parts = [self._inputs(part) for part in self._split(batch)]
        if len(parts) == 1:
            hiddens = [self.model(*parts[0], self.cache)]
        else:  # micro-batches: attention of one overlaps the (remote) experts of another
            hiddens = self.model.forward_micro(parts, self.cache)
        last = torch.cat([h[layout.last_index] for h, (_, layout) in zip(hiddens, parts)])  # [B, D], batch order
        for seq, chunk in batch:
            seq.num_cached += len(chunk)
        ready = [b for b, (s, _) in enumerate(batch) if s.num_cached == s.num_tokens]
        if not ready:
            return []
        logits = self.model.logits(last[ready])
        seqs = [batch[b][0] for b in ready]
        out = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        events = []
        for i, seq in enumerate(seqs):
            token = out.token_ids[i]
            seq.output_ids.append(token)
            seq.logprobs.append(out.logprobs[i])
            seq.top_logprobs.append(out.top[i])
            seq.finish_reason = self._finish_reason(seq, token)
            if seq.finish_reason:
                self.running.pop(seq.seq_id)
                self.cache.release(seq.seq_id)
            events.append(TokenEvent(seq.seq_id, token, out.logprobs[i], out.top[i], seq.finish_reason))
        return events

    def _split(self, batch: list[tuple[Sequence, list[int]]]) -> list[list[tuple[Sequence, list[int]]]]:
        """Contiguous parts of about equal token counts (one part unless micro-batching applies)."""
        n = min(self.micro_batches, len(batch))
        if n <= 1:
            return [batch]
        total, parts, acc = sum(len(c) for _, c in batch), [[]], 0
        for item in batch:
            if acc >= total * len(parts) / n and len(parts) < n:
                parts.append([])
            parts[-1].append(item)
            acc += len(item[1])
        return parts

    def _inputs(self, part: list[tuple[Sequence, list[int]]]) -> tuple[torch.Tensor, StepLayout]:
        layout = build_layout([len(c) for _, c in part], [s.num_cached for s, _ in part],
                              block_tables=[self.cache.table(s.seq_id) for s, _ in part],
                              block_size=self.cache.block_size, sliding_window=self.cfg.sliding_window)
        return torch.tensor([t for _, c in part for t in c], dtype=torch.long), layout

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.params.stop_token_ids or (not seq.params.ignore_eos and token in self.cfg.eos_token_ids):
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens:
            return "length"
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run a batch of prompts to completion (all joining at once, mixed lengths welcome)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add(("generate", i), p, sp) for i, (p, sp) in enumerate(zip(prompts, plist))]
        while self.has_work():
            self.step()
        return seqs
