"""Sampling parameters and batched sampling with per-sequence random streams.

Each sequence owns a torch.Generator (seeded from its request's seed, or at random), and draws
exactly one uniform number per sampled token. A seeded request therefore gives the same tokens
whether it runs alone or inside any batch. Logprobs are from the model's own distribution
(log-softmax of the raw logits, before temperature, top-k or top-p).
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → all tokens
    seed: int | None = None
    logprobs: int = 0  # number of top alternatives to report per token
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError with a message a user can act on."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1 (got {self.max_tokens})")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20 (got {self.logprobs})")

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else random.SystemRandom().randrange(2**63))
        return g


@dataclasses.dataclass
class Sampled:
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token
    top: list[list[tuple[int, float]]]  # per row: the top-N (token, logprob), N = that row's `logprobs`


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Sampled:
    """logits [B, V] float32 → one token per row."""
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    chosen = torch.argmax(logits, dim=-1)
    rows = [b for b, p in enumerate(params) if p.temperature > 0]
    if rows:
        chosen[rows] = _draw(logits[rows], [params[b] for b in rows], [generators[b] for b in rows])
    chosen_lp = logp.gather(1, chosen[:, None])[:, 0]
    n_top = max(p.logprobs for p in params)
    top: list[list[tuple[int, float]]] = [[] for _ in params]
    if n_top:
        vals, ids = torch.topk(logp, n_top, dim=-1)
        for b, p in enumerate(params):
            top[b] = list(zip(ids[b, :p.logprobs].tolist(), vals[b, :p.logprobs].tolist()))
    return Sampled(chosen.tolist(), chosen_lp.tolist(), top)


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """Temperature, top-k and top-p over the sorted distribution, then inverse-CDF with one uniform per row."""
    temp = torch.tensor([p.temperature for p in params])[:, None]
    sorted_logits, sorted_ids = torch.sort(logits / temp, dim=-1, descending=True)  # [R, V]
    rank = torch.arange(logits.shape[-1])[None, :]
    top_k = torch.tensor([p.top_k or logits.shape[-1] for p in params])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
    probs = probs.masked_fill(before >= top_p, 0.0)  # keeps the smallest set reaching top_p (≥ 1 token)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.cat([torch.rand(1, generator=g) for g in generators])[:, None] * cdf[:, -1:]
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1  # kept tokens are a prefix of the sorted order
    pick = torch.minimum(torch.searchsorted(cdf, u, right=True), last_kept)  # u may round up to the total
    return sorted_ids.gather(1, pick)[:, 0]
