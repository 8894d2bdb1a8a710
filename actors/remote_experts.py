"""RemoteExperts: the model's Experts seam, computed by expert actors over the object store.

Per MoE layer and step (never per token):
  1. route   each (token, slot) pair to an actor owning its expert; an expert with replicas has its
             pairs dealt out in turn to its copies (deterministic: by rank within the expert);
  2. group   pairs by actor; each actor gets one payload (one numpy byte array): the hidden states
             of its distinct tokens x [n, D] plus, per pair, (row into x, expert id, router weight);
  3. compute every actor of the layer at once; each runs one matmul per expert and sums its pairs
             per token with the router weights (a token whose experts share an actor costs one row);
  4. combine the partial outputs: out[T, D] = Σ_actors scatter-add of their rows.
`dispatch` (1–3, non-blocking) and `Pending.result` (wait + 4) are separate so a caller can overlap
other work (e.g. attention of another micro-batch) with the experts; `__call__` does both.

Legend: T = tokens, K = experts per token, P = T·K pairs, n = an actor's distinct tokens, D = hidden.
"""

from __future__ import annotations

import time

import torch

from .expert_actor import from_wire, pack
from .pool import ExpertPool, ExpertsUnavailable
from .transport import Unreachable


_CALL_HISTOGRAM = None


def _call_histogram():
    """Front-side latency of one layer's expert calls, dispatch to combined output (created on first use)."""
    global _CALL_HISTOGRAM
    if _CALL_HISTOGRAM is None:
        from ray.util.metrics import Histogram

        from .metrics import LATENCY_BUCKETS

        _CALL_HISTOGRAM = Histogram("raymoe_expert_layer_seconds", "Dispatch to combine of one MoE layer's "
                                    "expert actor calls", boundaries=LATENCY_BUCKETS, tag_keys=("layer",))
    return _CALL_HISTOGRAM


class Pending:
    """One layer's expert calls in flight; `result()` waits (bounded) and combines."""

    def __init__(self, owner: "RemoteExperts", calls: list, actors: list[int], rows: list[torch.Tensor],
                 like: torch.Tensor, started: float) -> None:
        self.owner, self.calls, self.actors, self.rows = owner, calls, actors, rows  # rows: tokens per actor
        self.shape, self.dtype, self.device = tuple(like.shape), like.dtype, like.device
        self.started = started  # when dispatch began

    def result(self, timeout_s: float | None = None) -> torch.Tensor:
        """The layer's expert output [T, D] on the input's device; ExpertsUnavailable after the timeout."""
        pool = self.owner.pool
        timeout = pool.config.call_timeout_s if timeout_s is None else timeout_s
        t0 = time.perf_counter()
        try:
            parts = pool.transport().gather(self.calls, self.actors, timeout)
        except Unreachable as e:
            raise self.owner.unavailable(e.actors, e.reason) from None
        t1 = time.perf_counter()
        out = torch.zeros(self.shape, dtype=self.dtype)
        received = 0
        for rows, (part, _) in zip(self.rows, parts):  # Σ over actors of their partial sums
            out.index_add_(0, rows, from_wire(part, self.dtype).view(rows.numel(), -1))
            received += part.nbytes
        t2 = time.perf_counter()
        _call_histogram().observe(t2 - self.started, tags={"layer": str(self.owner.layer)})
        m = pool.metrics
        m.layer_wall_s += t2 - self.started
        m.slowest_compute_s += max(seconds for _, seconds in parts)
        m.wait_us.append((t1 - t0) * 1e6)
        m.combine_us.append((t2 - t1) * 1e6)
        m.bytes_received += received
        return out.to(self.device)


class RemoteExperts:
    """One layer's experts on the pool's actors; a drop-in for model.moe.LocalExperts."""

    def __init__(self, layer: int, pool: ExpertPool) -> None:
        self.layer, self.pool = layer, pool
        self.route = pool.route(layer)
        self.num_experts = pool.model_config.num_local_experts

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.dispatch(x, weights, idx).result()

    def assign(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [T, K] → the pool index of the actor computing each pair, [T·K]."""
        flat = idx.reshape(-1)
        r = self.route
        if not r.replicated:
            return r.owner[flat, 0]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel()) - starts[flat[order]]  # k-th pair of its expert
        return r.owner[flat, rank % r.num_owners[flat]]

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> Pending:
        """Send every actor of the layer its payload; returns at once."""
        t0 = time.perf_counter()
        pool, (T, K), like = self.pool, idx.shape, x
        x = x.detach().cpu()
        actor_of = self.assign(idx.cpu())  # [P]
        # Pairs grouped by actor, in pair order within an actor, so each actor's tokens come sorted.
        by_actor = torch.argsort(actor_of, stable=True)  # [P]
        per_actor = torch.bincount(actor_of, minlength=len(pool.actors)).tolist()
        token = by_actor // K  # [P] token of each grouped pair
        experts = idx.reshape(-1).cpu().to(torch.int32)[by_actor]
        w = weights.reshape(-1).detach().cpu().float()[by_actor]
        transport = pool.transport()
        calls, actors, rows = [], [], []
        sent, start = 0, 0
        for a, n in enumerate(per_actor):
            if not n:
                continue
            sel = slice(start, start + n)
            start += n
            tokens, local = torch.unique_consecutive(token[sel], return_inverse=True)  # distinct tokens, pair → row
            payload = pack(x if tokens.numel() == T else x[tokens], local, experts[sel], w[sel])
            calls.append(transport.submit(a, self.layer, payload))
            actors.append(a)
            rows.append(tokens)
            sent += payload.nbytes
        m = pool.metrics
        m.dispatch_us.append((time.perf_counter() - t0) * 1e6)
        m.bytes_sent += sent
        m.calls += len(calls)
        m.layer_calls += 1
        return Pending(self, calls, actors, rows, like, t0)

    def unavailable(self, actors: list[int], reason: str) -> ExpertsUnavailable:
        names = [self.pool.placement.actors[a].name for a in sorted(set(actors))]
        experts = [e for a in actors for e in self.pool.hosted(a, self.layer)]
        return ExpertsUnavailable(self.layer, experts, f"actor(s) {', '.join(names)}: {reason}")


def remote_experts_factory(pool: ExpertPool):
    """For load_model / Mixtral: layer → RemoteExperts(layer, pool)."""
    return lambda layer: RemoteExperts(layer, pool)
