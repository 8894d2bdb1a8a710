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

import dataclasses
import time

import numpy as np
import torch
from ray.util.metrics import Histogram

from .expert_actor import from_wire, pack
from .errors import ExpertsUnavailable
from .live_plan import LayerRoute
from .metrics import LATENCY_BUCKETS
from .pool import ExpertPool
from .transport import Unreachable


_CALL_HISTOGRAM = None


def _call_histogram():
    """Front-side latency of one layer's expert calls, dispatch to combined output (created on first use)."""
    global _CALL_HISTOGRAM
    if _CALL_HISTOGRAM is None:
        _CALL_HISTOGRAM = Histogram("raymoe_expert_layer_seconds", "Dispatch to combine of one MoE layer's "
                                    "expert actor calls", boundaries=LATENCY_BUCKETS, tag_keys=("layer",))
    return _CALL_HISTOGRAM


class Pending:
    """One layer's expert calls in flight; `result()` waits (bounded) and combines."""

    def __init__(self, owner: "RemoteExperts", x: torch.Tensor, calls: list, sends: list["Send"], like: torch.Tensor,
                 started: float, version: int, spare: frozenset, dead: frozenset = frozenset()) -> None:
        self.owner, self.x, self.calls, self.sends = owner, x, calls, sends
        self.actors = [s.actor for s in sends]
        self.version = version  # of the plan it was routed by (live placement waits for it to return)
        self.spare = spare  # actors whose failed calls can go to other copies
        self.dead = dead  # actors that failed this layer call for good (it was routed around them)
        self.shape, self.dtype, self.device = tuple(like.shape), like.dtype, like.device
        self.started = started  # when dispatch began

    def result(self, timeout_s: float | None = None) -> torch.Tensor:
        """The layer's expert output [T, D] on the input's device; ExpertsUnavailable after the timeout.
        A call that failed on an actor whose experts all have other copies is sent to them at once
        (failover), without waiting for the actor's restart."""
        pool = self.owner.pool
        timeout = pool.config.call_timeout_s if timeout_s is None else timeout_s
        t0 = time.perf_counter()
        lost = None
        try:
            parts = pool.transport().gather(self.calls, self.actors, timeout, self.spare)
        except Unreachable as e:
            lost = e
        finally:
            pool.end_call(self.version)
        if lost is not None:
            return self._around(lost, timeout - (time.perf_counter() - t0))
        t1 = time.perf_counter()
        out = torch.zeros(self.shape, dtype=self.dtype)
        received, failed = 0, []
        for send, part in zip(self.sends, parts):  # Σ over actors of their partial sums
            if part is None:
                failed.append(send)
                continue
            out.index_add_(0, send.tokens, from_wire(part[0], self.dtype).view(send.tokens.numel(), -1))
            received += part[0].nbytes
        if failed:  # their pairs go to the experts' other copies now
            for send in failed:
                pool.suspect(send.actor)
            again = self._resend(failed, t0, failed=frozenset(s.actor for s in failed) | self.dead, dead=self.dead)
            left = max(0.001, timeout - (time.perf_counter() - t0))
            out += again.result(left).to(out.dtype).cpu()
        t2 = time.perf_counter()
        _call_histogram().observe(t2 - self.started, tags={"layer": str(self.owner.layer)})
        m = pool.metrics
        m.layer_wall_s += t2 - self.started
        m.slowest_compute_s += max((part[1] for part in parts if part is not None), default=0.0)
        m.wait_us.append((t1 - t0) * 1e6)
        m.combine_us.append((t2 - t1) * 1e6)
        m.bytes_received += received
        return out.to(self.device)

    def _around(self, e: Unreachable, left_s: float) -> torch.Tensor:
        """The layer's output once `e.actors` failed for good a call that had no other copy to go to
        *in its route*: the route may have left a copy out only because it was suspected (silent for
        a while, as an actor is on a loaded machine), so while every expert they were sent still has
        a copy on an actor that has not failed this call, all the pairs are sent again around them
        (a suspected copy then gets them, and is waited for). Otherwise, and after a timeout, the
        experts are named: ExpertsUnavailable."""
        pool, layer = self.owner.pool, self.owner.layer
        dead = self.dead | frozenset(e.actors)
        owners = pool.plan.owners(layer)
        sent = {int(x) for s in self.sends if s.actor in e.actors for x in s.experts.unique()}
        if e.reason.startswith("no answer") or left_s <= 0 or dead == self.dead or \
                any(all(o in dead for o in owners[x]) for x in sent):
            raise self.owner.unavailable(sorted(dead), e.reason) from None
        for a in e.actors:
            pool.suspect(a)
        again = self._resend(self.sends, time.perf_counter(), failed=dead, dead=dead)
        return again.result(left_s).to(self.dtype).to(self.device)

    def _resend(self, sends: list["Send"], t0: float, failed: frozenset, dead: frozenset) -> "Pending":
        """The pairs of `sends` routed and sent again (around `failed`)."""
        return self.owner.send_pairs(self.x, torch.cat([s.tokens[s.local] for s in sends]),
                                     torch.cat([s.experts for s in sends]), torch.cat([s.weights for s in sends]),
                                     self.x, t0, failed=failed, dead=dead)


@dataclasses.dataclass
class Send:
    """What one actor was sent for one layer call (kept so that it can go elsewhere on failure)."""

    actor: int
    tokens: torch.Tensor  # [n] the distinct tokens sent (rows of the layer's x)
    local: torch.Tensor  # [P] per pair, its row in `tokens`
    experts: torch.Tensor  # [P] int32
    weights: torch.Tensor  # [P] float32


class RemoteExperts:
    """One layer's experts on the pool's actors; a drop-in for model.moe.LocalExperts."""

    def __init__(self, layer: int, pool: ExpertPool) -> None:
        self.layer, self.pool = layer, pool
        self.num_experts = pool.model_config.num_local_experts

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.dispatch(x, weights, idx).result()

    def assign(self, idx: torch.Tensor, route: LayerRoute | None = None) -> torch.Tensor:
        """idx [T, K] → the pool index (actor id) of the actor computing each pair, [T·K].

        An expert with copies has its pairs split between them by load: the actors' pairs of
        single-copy experts are counted first, then each replicated expert (heaviest first) fills
        its copies' actors up to a common level (water-filling), and its k-th pair goes to the copy
        whose share covers k. Deterministic for a given batch."""
        flat = idx.reshape(-1)
        r = route or self.pool.route(self.layer)
        if not r.replicated:
            return r.owner[flat, 0]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel()) - starts[flat[order]]  # k-th pair of its expert
        bounds = split_by_load(counts.tolist(), r.owner_lists, r.num_owner_list)  # [E][R] cumulative
        copy = torch.searchsorted(torch.tensor(bounds)[flat], rank[:, None], right=True).squeeze(1)
        return r.owner[flat, copy]

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> Pending:
        """Send every actor of the layer its payload; returns at once."""
        t0 = time.perf_counter()
        T, K = idx.shape
        token = torch.from_numpy(np.arange(T * K) // K)
        experts = torch.from_numpy(idx.reshape(-1).cpu().numpy().astype(np.int32))
        return self.send_pairs(x.detach().cpu(), token, experts, weights.reshape(-1).detach().cpu().float(), x, t0)

    def send_pairs(self, x: torch.Tensor, token: torch.Tensor, experts: torch.Tensor, w: torch.Tensor,
                   like: torch.Tensor, t0: float, failed: frozenset = frozenset(), dead: frozenset = frozenset()) -> Pending:
        """(token, expert, weight) pairs over x [T, D] (CPU) → one payload per actor computing them
        (`failed`: actors that just failed these pairs; they get them again only as a last resort;
        `dead`: those that failed them for good, see Pending._around)."""
        pool = self.pool
        version, route = pool.begin_call(self.layer, failed)
        try:
            return self._send(x, token, experts, w, route, version, like, t0, dead)
        except BaseException:
            pool.end_call(version)
            raise

    def _send(self, x: torch.Tensor, token: torch.Tensor, experts: torch.Tensor, w: torch.Tensor, route: LayerRoute,
              version: int, like: torch.Tensor, t0: float, dead: frozenset = frozenset()) -> Pending:
        pool, T = self.pool, x.shape[0]
        # In numpy: a layer call has a few dozen pairs, where each torch op costs 5-10x a numpy one.
        ex = experts.numpy()
        actor_of = self.assign(experts.long(), route).numpy() if route.replicated else route.owner.numpy()[ex, 0]
        # Pairs grouped by actor and, within an actor, by token (stable: a token's pairs keep their
        # order), so each actor's distinct tokens come sorted, whatever order the pairs came in.
        tok = token.numpy()
        order = np.argsort(actor_of * T + tok, kind="stable")
        per_actor = np.bincount(actor_of, minlength=len(pool.actors)).tolist()
        tok, ex, wn = tok[order], ex[order], w.numpy()[order]
        transport = pool.transport()
        calls, sends = [], []
        sent, start = 0, 0
        for a, n in enumerate(per_actor):
            if not n:
                continue
            t, e, ww = tok[start:start + n], ex[start:start + n], wn[start:start + n]
            start += n
            first = np.empty(n, dtype=bool)  # a pair whose token differs from the previous pair's
            first[0] = True
            np.not_equal(t[1:], t[:-1], out=first[1:])
            tokens, local = t[first], np.cumsum(first) - 1  # distinct tokens (sorted), pair → row
            rows = torch.from_numpy(tokens)
            payload = pack(x if tokens.size == T else x.index_select(0, rows), local, e, ww)
            calls.append(transport.submit(a, self.layer, payload, spare=a in route.spare))
            sends.append(Send(a, rows, torch.from_numpy(local), torch.from_numpy(e), torch.from_numpy(ww)))
            sent += payload.nbytes
        m = pool.metrics
        m.dispatch_us.append((time.perf_counter() - t0) * 1e6)
        m.bytes_sent += sent
        m.calls += len(calls)
        m.layer_calls += 1
        return Pending(self, x, calls, sends, like, t0, version, route.spare, dead)

    def unavailable(self, actors: list[int], reason: str) -> ExpertsUnavailable:
        """The experts of `actors` that no other actor holds but one Ray reports dead for good (all of
        them, without copies): a copy merely suspected (silent a while, on a loaded machine) still counts."""
        down = set(actors) | set(self.pool.failover.dead)
        names = [self.pool.actor_name(a) for a in sorted(set(actors))]
        owners = self.pool.plan.owners(self.layer)
        hosted = sorted({e for a in set(actors) for e in self.pool.hosted(a, self.layer)})
        experts = [e for e in hosted if all(o in down for o in owners[e])] or hosted
        return ExpertsUnavailable(self.layer, experts, f"actor(s) {', '.join(names)}: {reason}")


def split_by_load(counts: list[int], owner: list[list[int]], num_owners: list[int]) -> list[list[int]]:
    """[E][R] cumulative pair counts per copy: copy r of expert e takes ranks [bounds[r-1], bounds[r]).

    Pairs of single-copy experts load their actors first; each replicated expert, heaviest first,
    then pours its pairs into its copies' actors, the least loaded first, up to a common level."""
    E, width = len(counts), len(owner[0])
    load: dict[int, int] = {}
    for e in range(E):
        if num_owners[e] == 1:
            load[owner[e][0]] = load.get(owner[e][0], 0) + counts[e]
    bounds = [[counts[e]] * width for e in range(E)]
    for e in sorted((e for e in range(E) if num_owners[e] > 1), key=lambda e: -counts[e]):
        actors = owner[e][:num_owners[e]]
        share = _water_fill([load.get(a, 0) for a in actors], counts[e])
        total = 0
        for i, a in enumerate(actors):
            total += share[i]
            bounds[e][i] = total
            load[a] = load.get(a, 0) + share[i]
    return bounds


def _water_fill(level: list[int], amount: int) -> list[int]:
    """Split `amount` units over bins at `level` so the fullest ends as low as possible (ties: the
    earlier bins take the remainder)."""
    n = len(level)
    order = sorted(range(n), key=lambda j: (level[j], j))
    for k in range(1, n + 1):
        if k < n:
            need = sum(level[order[k]] - level[order[j]] for j in range(k))
            if need < amount:
                continue
        height, extra = divmod(sum(level[order[j]] for j in range(k)) + amount, k)
        share = [0] * n
        for j in range(k):
            share[order[j]] = height - level[order[j]] + (1 if j < extra else 0)
        return share
    raise AssertionError("unreachable")


def remote_experts_factory(pool: ExpertPool):
    """For load_model / Mixtral: layer → RemoteExperts(layer, pool)."""
    return lambda layer: RemoteExperts(layer, pool)
