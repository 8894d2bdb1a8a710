"""One request inside the engine (Sequence) and what a step reports of it (TokenEvent)."""

from __future__ import annotations

import dataclasses
from typing import Hashable

from .guided import Guide
from .prefix_cache import BlockHash
from .sampling import SamplingParams


@dataclasses.dataclass
class Sequence:
    seq_id: Hashable
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the request's seed, or a random one: sampling draws uniform(seed, position)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in the cache
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | ...
    arrival: int = 0  # order of arrival: the queue and preemption follow it
    preemptions: int = 0
    overtaken: int = 0  # admissions that went ahead of this sequence while it waited
    # Whose it is (model/fair.py): its tenant's share of the engine and its priority class
    tenant: Hashable = ""
    weight: float = 1.0
    priority: int = 0
    cache_salt: bytes = b""  # keeps its cached prefix apart from other callers' (model/prefix_cache.py)
    block_hashes: list[BlockHash] = dataclasses.field(default_factory=list)  # of its full blocks so far
    cached_prompt_tokens: int | None = None  # prompt tokens found cached when it first started
    guide: Guide | None = None  # guided decoding: its place in the grammar (kept through preemption)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def pending(self, limit: int) -> list[int]:
        """Up to `limit` tokens not yet in the cache: the rest of the prompt, then of the output (only
        the last sampled token in steady decoding; all of them when recomputing after preemption)."""
        n, start = len(self.prompt_ids), self.num_cached
        if start < n:
            chunk = self.prompt_ids[start:start + limit]
            if len(chunk) < limit:
                chunk = chunk + self.output_ids[:limit - len(chunk)]
            return chunk
        return self.output_ids[start - n:start - n + limit]


@dataclasses.dataclass
class TokenEvent:
    seq_id: Hashable
    token_id: int  # -1 when the sequence failed (see `error`)
    logprob: float
    top: list[tuple[int, float]]
    finish_reason: str | None  # set on the sequence's last event
    error: Exception | None = None  # why the sequence failed (finish_reason "error")
    cached_tokens: int = 0  # prompt tokens the prefix cache held when the sequence started
