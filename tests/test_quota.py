"""The quota ledger in-process, on a simulated clock: concurrency, the token bucket, refunds, leases
that are never returned."""

from __future__ import annotations

from raymoe.cluster.quota import QuotaLedger


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
