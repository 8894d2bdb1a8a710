"""The quota ledger in-process, on a simulated clock: concurrency, the token bucket, refunds, leases
that are never returned."""

from __future__ import annotations

import asyncio
import time

from raymoe.cluster import quota
from raymoe.cluster.quota import QuotaLedger
from raymoe.cluster.tenants import Tenant


def test_max_concurrent_counts_sequences_and_frees_them_on_release():
    ledger = QuotaLedger(clock=lambda: 0.0)
    a, _, _ = ledger.acquire("alice", 8, 0, 6, 0)
    assert a and ledger.acquire("alice", 8, 0, 3, 0)[0] == 0  # 6 + 3 > 8: refused whole
    lease, why, wait = ledger.acquire("alice", 8, 0, 3, 0)
    assert lease == 0 and "max_concurrent of 8" in why and wait > 0
    assert ledger.acquire("bob", 8, 0, 8, 0)[0]  # per tenant
    b, _, _ = ledger.acquire("alice", 8, 0, 2, 0)
    assert b
    ledger.release(a, 0)
    ledger.release(a, 0)  # twice: no effect
    assert ledger.in_flight["alice"] == 2 and ledger.acquire("alice", 8, 0, 6, 0)[0]


def test_token_bucket_charges_at_admission_refunds_unused_and_refills_over_a_minute():
    now = [0.0]
    ledger = QuotaLedger(clock=lambda: now[0])
    first, _, _ = ledger.acquire("alice", 0, 600, 1, 500)  # prompt + max_tokens
    assert first
    lease, why, wait = ledger.acquire("alice", 0, 600, 1, 200)
    assert lease == 0 and "100 of its 600" in why and abs(wait - 10.0) < 1e-9  # 100 more at 10 tokens/s
    ledger.release(first, 300)  # generated 200 of the 500 asked for... the unused 300 come back
    assert ledger.acquire("alice", 0, 600, 1, 400)[0]
    now[0] += 30.0  # half a minute: 300 tokens more, capped at 600
    assert ledger.acquire("alice", 0, 600, 1, 300)[0] and not ledger.acquire("alice", 0, 600, 1, 10)[0]
    now[0] += 600.0
    assert ledger.snapshot()["tokens"]["alice"] <= 600  # never above a minute's worth after refill
    assert ledger.acquire("alice", 0, 600, 1, 600)[0]


def test_a_lease_never_returned_expires():
    now = [0.0]
    ledger = QuotaLedger(lease_s=60.0, clock=lambda: now[0])
    assert ledger.acquire("alice", 2, 0, 2, 0)[0]  # its replica dies with it
    assert not ledger.acquire("alice", 2, 0, 1, 0)[0]
    now[0] += 61.0
    assert ledger.acquire("alice", 2, 0, 2, 0)[0]


def test_a_tenant_at_its_limit_on_this_replica_is_refused_after_its_retry_after_and_few_wait_at_once(monkeypatch):
    """The replica's own count refuses before any parsing; the refusal waits out the Retry-After it
    names (a flood is slowed, a client that honours it loses nothing), at most PARKED_MAX at a time."""
    monkeypatch.setattr(quota, "CONCURRENCY_RETRY_S", 0.3)
    monkeypatch.setattr(quota, "PARKED_MAX", 2)
    gate = quota.QuotaGate("app", lease_s=60)
    flood, calm = Tenant(name="flood", max_concurrent=4), Tenant(name="calm")
    gate.held["flood"] = 3

    async def timed(tenant):
        t0 = time.monotonic()
        try:
            await gate.refuse_early(tenant)
            return "admitted", time.monotonic() - t0
        except quota.QuotaExceeded as e:
            assert "max_concurrent of 4" in str(e) and e.retry_after_s == 0.3
            return "refused", time.monotonic() - t0

    async def scenario():
        below = await timed(flood)  # 3 of 4: the ledger decides, not this count
        gate.held["flood"] = 4
        burst = await asyncio.gather(*(timed(flood) for _ in range(3)), timed(calm))
        return below, burst

    below, burst = asyncio.run(scenario())
    assert below[0] == "admitted" and below[1] < 0.1
    outcomes = sorted((what, seconds >= 0.3) for what, seconds in burst[:3])
    assert outcomes == [("refused", False), ("refused", True), ("refused", True)]  # two waited, one at once
    assert burst[3][0] == "admitted" and burst[3][1] < 0.1  # another tenant is never held up
    assert gate.parked == 0
