"""Sampling parameters and batched sampling whose random draws depend only on (seed, position).

A sampled token uses exactly one uniform number, computed by hashing the sequence's seed with the
token's position in the output (`uniform`). There is no generator state, so a seeded request gives
the same tokens alone, inside any batch, after being preempted and recomputed, or when resumed on
another replica from the tokens already delivered. A request without a seed gets a random one.

Each row is sampled on its own: a row whose logits are not finite is reported in `Sampled.failed`
(that sequence fails) and never affects the other rows. Logprobs are from the model's own
distribution (log-softmax of the raw logits, before temperature, top-k or top-p).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import torch

from .errors import InvalidRequest

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (dividing by them overflows float32 logits)
MAX_TEMPERATURE = 100.0  # above this the distribution is uniform to float precision; refused as a mistake
MASK64 = (1 << 64) - 1
DEFAULT_MAX_TOKENS = 16  # a request that sets no max_tokens (as OpenAI's completions API), on every path


def default_max_tokens(room: int) -> int:
    """max_tokens of a request that sets none, where the context leaves `room` tokens after its
    prompt: the default never makes a request near the end of the context fail."""
    return min(DEFAULT_MAX_TOKENS, room)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # below GREEDY_BELOW → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → all tokens
    seed: int | None = None
    logprobs: int = 0  # number of top alternatives to report per token
    stop_token_ids: frozenset[int] | tuple[int, ...] = frozenset()
    ignore_eos: bool = False
    # A CompiledGuide (model/guided.py): every token is sampled under its grammar's mask. Not part of
    # equality: the spec's hash identifies it.
    guided: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.stop_token_ids, frozenset):  # membership is tested once per token
            object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        """Raise InvalidRequest with a message a user can act on."""
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1 (got {self.max_tokens})", "max_tokens")
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(f"temperature must be between 0 and {MAX_TEMPERATURE:g} (got {self.temperature})",
                                 "temperature")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1] (got {self.top_p})", "top_p")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (got {self.top_k})", "top_k")
        if self.logprobs < 0:  # the upper bound: the server's max_logprobs, and the vocabulary (Engine.check)
            raise InvalidRequest(f"logprobs must be >= 0 (got {self.logprobs})", "logprobs")
        if self.seed is not None and not 0 <= self.seed <= MASK64:
            raise InvalidRequest(f"seed must be in [0, 2^64) (got {self.seed})", "seed")

    def effective_seed(self) -> int:
        """The request's seed, or a fresh random one (kept by the sequence for its whole life)."""
        return self.seed if self.seed is not None else random.SystemRandom().randrange(2**64)


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) used to sample output token `position` of a sequence with `seed`."""
    return (_mix(seed ^ _mix(position)) >> 11) / float(1 << 53)


@dataclasses.dataclass
class Sampled:
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token
    top: list[list[tuple[int, float]]]  # per row: the top-N (token, logprob), N = that row's `logprobs`
    failed: list[int] = dataclasses.field(default_factory=list)  # rows whose logits were not finite


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
           allowed: torch.Tensor | None = None) -> Sampled:
    """logits [B, V] float32 → one token per row; row b draws uniform(seeds[b], positions[b]).
    allowed [B, V] bool (guided decoding): only those tokens can be drawn, and the logprobs are of
    the distribution renormalised over them (what was really sampled from)."""
    finite = torch.isfinite(logits).all(dim=-1)
    failed = [] if bool(finite.all()) else torch.nonzero(~finite).squeeze(1).tolist()
    if failed:  # keep the bad rows from producing NaNs anywhere; their results are discarded
        logits = logits.masked_fill(~finite[:, None], 0.0)
    if allowed is not None:  # after the finiteness check: masked tokens are -inf on purpose
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    chosen = torch.argmax(logits, dim=-1)
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if rows:
        u = torch.tensor([uniform(seeds[b], positions[b]) for b in rows], dtype=torch.float64)
        chosen[rows] = _draw(logits[rows], [params[b] for b in rows], u)
    chosen_lp = logp.gather(1, chosen[:, None])[:, 0]
    n_top = max(p.logprobs for p in params)
    top: list[list[tuple[int, float]]] = [[] for _ in params]
    if n_top:
        vals, ids = torch.topk(logp, min(n_top, logp.shape[-1]), dim=-1)
        for b, p in enumerate(params):
            top[b] = list(zip(ids[b, :p.logprobs].tolist(), vals[b, :p.logprobs].tolist()))
    return Sampled(chosen.tolist(), chosen_lp.tolist(), top, failed)


def _draw(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k and top-p over the sorted distribution, then inverse-CDF with one uniform per row."""
    temp = torch.tensor([p.temperature for p in params])[:, None]
    sorted_logits, sorted_ids = torch.sort(logits / temp, dim=-1, descending=True)  # [R, V]
    rank = torch.arange(logits.shape[-1])[None, :]
    top_k = torch.tensor([p.top_k or logits.shape[-1] for p in params])[:, None]
    # By value, as transformers' TopKLogitsWarper: every token tied with the k-th stays (ties are
    # common in bfloat16), so the result never depends on how the sort ordered them.
    kth = sorted_logits.gather(1, (top_k - 1).clamp(max=logits.shape[-1] - 1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1).double()  # the best token always keeps a positive mass
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64)[:, None]
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
    probs = probs.masked_fill((before >= top_p) & (rank > 0), 0.0)  # smallest set reaching top_p (≥ 1 token)
    cdf = torch.cumsum(probs, dim=-1)
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1  # kept tokens are a prefix of the sorted order
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)
    pick = torch.minimum(pick, last_kept).clamp_(min=0)  # u may round up to the total
    return sorted_ids.gather(1, pick)[:, 0]
