"""Per-tenant quotas across the whole server: sequences in flight and tokens per minute.

One small Ray actor per server (`QuotaLedger`, named after the application, detached, no CPU)
keeps the counts, so they are exact over every front replica: a tenant's `max_concurrent` counts
its sequences on all replicas together (an `n: 8` request is 8), and its `tokens_per_minute` is
one token bucket (capacity a minute's tokens, refilled continuously) charged prompt + max_tokens
per sequence at admission and refunded, when the request ends, what was not generated. The price
is one actor round trip before a limited tenant's request (≈1 ms; unlimited tenants skip it) and
one after it, sent without waiting.

Refusals cost little: each replica also counts the sequences its own leases hold per tenant, and a
tenant already at its max_concurrent on this replica alone is refused right after its key is read,
before the request is parsed or the ledger asked (`refuse_early`). That count never exceeds the
ledger's, so it refuses nothing the ledger would admit. Such a refusal is answered only after the
Retry-After it names (at most PARKED_MAX of them wait at a time per replica; beyond, at once): a
client that honours Retry-After loses nothing, and one that reopens at once (a flood) is slowed to
an attempt per connection per Retry-After, instead of as many as the replica can answer — each
attempt still costs the replica Serve's per-request work, which is what a calm tenant beside the
flood waits behind (bench/bench_tenants.py).

Error bound: none while the ledger lives. A lease a replica never returns (the replica died) is
dropped after the longest request (request_timeout_s) and a margin; if the ledger itself restarts,
its counts start from zero, so a tenant may exceed max_concurrent by the sequences it had in
flight then, until those end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from typing import Any

from .engine_loop import Owner
from .tenants import Tenant

log = logging.getLogger("ray.serve")
NAMESPACE = "raymoe"
CONCURRENCY_RETRY_S = 1.0  # Retry-After when only max_concurrent refuses (sequences end at any time)
PARKED_MAX = 64  # refusals made on a replica's own count that wait out their Retry-After at once


class QuotaExceeded(Exception):
    """RESOURCE_EXHAUSTED / 429, with the seconds after which a retry may pass (Retry-After)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QuotaLedger:
    """The counts (a Ray actor; also usable in-process). Leases expire after `lease_s`."""

    def __init__(self, lease_s: float = 660.0, clock=time.monotonic) -> None:
        self.lease_s, self.clock = lease_s, clock
        self.in_flight: dict[str, int] = {}  # tenant → sequences
        self.level: dict[str, tuple[float, float]] = {}  # tenant → (tokens in the bucket, when)
        self.leases: dict[int, tuple[str, int, int, float]] = {}  # id → (tenant, sequences, tokens, expiry)
        self._ids = itertools.count(1)

    def _bucket(self, tenant: str, per_minute: int) -> float:
        tokens, at = self.level.get(tenant, (float(per_minute), self.clock()))
        now = self.clock()
        tokens = min(float(per_minute), tokens + (now - at) * per_minute / 60.0)
        self.level[tenant] = (tokens, now)
        return tokens

    def _expire(self) -> None:
        now = self.clock()
        for lease_id in [i for i, lease in self.leases.items() if lease[3] <= now]:
            self.release(lease_id, 0)

    def acquire(self, tenant: str, max_concurrent: int, per_minute: int, sequences: int,
                tokens: int) -> tuple[int, str, float]:
        """(lease id, "", 0) when admitted, else (0, why, seconds until a retry may pass)."""
        self._expire()
        running = self.in_flight.get(tenant, 0)
        if max_concurrent and running + sequences > max_concurrent:
            return 0, (f"tenant {tenant!r} has {running} sequences in flight; {sequences} more would pass its "
                       f"max_concurrent of {max_concurrent}"), CONCURRENCY_RETRY_S
        if per_minute:
            have = self._bucket(tenant, per_minute)
            if tokens > have:
                wait = (tokens - have) * 60.0 / per_minute
                return 0, (f"tenant {tenant!r} has {int(have)} of its {per_minute} tokens per minute left; this "
                           f"request needs {tokens} (prompt + max_tokens)"), wait
            self.level[tenant] = (have - tokens, self.clock())
        self.in_flight[tenant] = running + sequences
        lease_id = next(self._ids)
        self.leases[lease_id] = (tenant, sequences, tokens if per_minute else 0, self.clock() + self.lease_s)
        return lease_id, "", 0.0

    def release(self, lease_id: int, unused_tokens: int) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return
        tenant, sequences, charged, _ = lease
        self.in_flight[tenant] = max(0, self.in_flight.get(tenant, 0) - sequences)
        if charged and tenant in self.level:
            tokens, at = self.level[tenant]
            self.level[tenant] = (tokens + min(charged, max(0, unused_tokens)), at)  # capped on the next refill

    def snapshot(self) -> dict[str, Any]:
        return {"in_flight": dict(self.in_flight), "tokens": {t: v for t, (v, _) in self.level.items()}}


def ledger_name(app: str) -> str:
    return f"{app}-quota-ledger"


def ledger_actor(app: str, lease_s: float):
    import ray

    return ray.remote(QuotaLedger).options(
        name=ledger_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_task_retries=-1).remote(lease_s)


def remove_ledger(app: str) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(ledger_name(app), namespace=NAMESPACE), no_restart=True)
    except ValueError:  # none was started (no tenant had limits)
        pass


class Lease:
    """A request's admission: `finished(generated)` once per sequence; the lease is returned (with
    the tokens not generated) when the last one finished, or at `close()`, whichever is first (the
    door closes it when the request ends: a choice cancelled before it started reports nothing)."""

    def __init__(self, gate: "QuotaGate", tenant: str, lease_id: int, sequences: int, max_tokens: int) -> None:
        self.gate, self.tenant, self.lease_id, self.left, self.max_tokens = gate, tenant, lease_id, sequences, max_tokens
        self.sequences, self.unused = sequences, sequences * max_tokens
        gate.held[tenant] = gate.held.get(tenant, 0) + sequences

    def finished(self, generated: int) -> None:
        self.unused -= min(max(generated, 0), self.max_tokens)
        self.left -= 1
        if self.left <= 0:
            self.close()

    def close(self) -> None:
        if self.lease_id:
            self.gate.held[self.tenant] -= self.sequences
            self.gate.release(self.lease_id, self.unused)
            self.lease_id = 0


class QuotaGate:
    """A replica's door to the ledger, and its per-tenant metrics (by name, never by key)."""

    def __init__(self, app: str, lease_s: float, metrics=None) -> None:
        self.app, self.lease_s, self.metrics = app, lease_s, metrics
        self._ledger = None
        self.held: dict[str, int] = {}  # tenant → sequences this replica's open leases hold
        self.parked = 0  # early refusals waiting out their Retry-After

    async def refuse_early(self, tenant: Tenant) -> None:
        """QuotaExceeded when the tenant's sequences on this replica alone already fill its
        max_concurrent (checked before the request is parsed), answered after its Retry-After
        (see the module's doc)."""
        if not tenant.max_concurrent or self.held.get(tenant.name, 0) < tenant.max_concurrent:
            return
        self._count(tenant, "requests")
        self._count(tenant, "refused")
        error = QuotaExceeded(f"tenant {tenant.name!r} has {self.held[tenant.name]} sequences in flight; more "
                              f"would pass its max_concurrent of {tenant.max_concurrent}", CONCURRENCY_RETRY_S)
        if self.parked < PARKED_MAX:
            self.parked += 1
            try:
                await asyncio.sleep(CONCURRENCY_RETRY_S)
            finally:
                self.parked -= 1
        raise error

    def _actor(self):
        if self._ledger is None:
            self._ledger = ledger_actor(self.app, self.lease_s)
        return self._ledger

    async def owner(self, tenant: Tenant, sequences: int, tokens: int, max_tokens: int) -> Owner:
        """The Owner of a request's sequences: the tenant's share and, for a tenant with limits, its
        lease (`tokens`: prompt + max_tokens over all its sequences; max_tokens: per sequence).
        QuotaExceeded when the tenant is at a limit; InvalidRequest when it could never pass."""
        lease = await self.admit(tenant, sequences, tokens, max_tokens)
        return Owner(tenant.name, tenant.weight, tenant.priority, lease)

    async def admit(self, tenant: Tenant, sequences: int, tokens: int, max_tokens: int) -> Lease | None:
        """The lease of a request of `sequences` sequences (None: the tenant has no limits)."""
        self._count(tenant, "requests")
        if not tenant.limited:
            return None
        if tenant.tokens_per_minute and tokens > tenant.tokens_per_minute:
            from raymoe.model.errors import InvalidRequest

            raise InvalidRequest(f"prompt + max_tokens over all choices is {tokens} tokens, more than tenant "
                                 f"{tenant.name!r} may use in a minute ({tenant.tokens_per_minute})", "max_tokens")
        actor = await asyncio.to_thread(self._actor)  # creating or finding it asks the GCS
        lease_id, why, wait = await actor.acquire.remote(tenant.name, tenant.max_concurrent, tenant.tokens_per_minute,
                                                         sequences, tokens)
        if not lease_id:
            self._count(tenant, "refused")
            raise QuotaExceeded(why, math.ceil(wait))
        return Lease(self, tenant.name, lease_id, sequences, max_tokens)

    def release(self, lease_id: int, unused: int) -> None:
        try:
            self._actor().release.remote(lease_id, unused)  # not awaited: the answer is already out
        except Exception as e:  # noqa: BLE001 — the lease expires in the ledger instead
            log.warning("returning a quota lease failed: %s", e)

    def _count(self, tenant: Tenant, what: str) -> None:
        if self.metrics is not None:
            self.metrics.tenant_requests.inc(tags={"tenant": tenant.name, "outcome": what})


def close_lease(owner: Owner | None) -> None:
    if owner is not None and owner.lease is not None:
        owner.lease.close()
