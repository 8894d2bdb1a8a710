"""Fair sharing inside the engine (model/fair.py) on the real engine, with a simulated clock: the
engine's steps. Tenant A floods first, B arrives right after; both keep work waiting."""

from __future__ import annotations

import pytest

from raymoe.model.engine import Engine
from raymoe.model.sampling import SamplingParams

PROMPT, MAX_TOKENS, REQUESTS = 12, 24, 40
MAX_RUNNING, BATCH_TOKENS = 8, 64


def run(model, weights: dict[str, float], fair: bool = True, steps: int = 150):
    """Per step, each tenant's service as VTC counts it (prompt tokens at admission, ×2 per
    generated token), divided by its weight; stops when a tenant runs out of waiting work."""
    engine = Engine(model, kv_cache_tokens=4096, max_batch_tokens=BATCH_TOKENS, max_running=MAX_RUNNING)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    for tenant in weights:  # A's whole flood arrives before B's first request
        for i in range(REQUESTS):
            prompt = [1] + [(7 * i + len(tenant)) % 200 + 3] * (PROMPT - 1)
            engine.add((tenant, i), prompt, params, tenant=tenant if fair else "", weight=weights[tenant])
    service = {t: 0.0 for t in weights}
    started: set = set()
    history = []
    for _ in range(steps):
        for ev in engine.step():
            tenant = ev.seq_id[0]
            if ev.seq_id not in started:
                started.add(ev.seq_id)
                service[tenant] += PROMPT
            service[tenant] += 2.0
        if not all(any(s.seq_id[0] == t for s in engine.waiting) for t in weights):
            break  # a tenant is no longer backlogged: the bound is about backlogged tenants
        history.append({t: service[t] / weights[t] for t in weights})
    return history


def bound() -> float:
    """VTC's 2·max(w_p · longest prompt, w_q · tokens a step holds), with w_p = 1, w_q = 2."""
    return 2 * max(1 * PROMPT, 2 * MAX_RUNNING * (PROMPT + MAX_TOKENS))


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 2.0}])
def test_backlogged_tenants_stay_within_the_vtc_bound(tiny_model, weights):
    history = run(tiny_model, weights)
    assert len(history) > 40  # long enough to mean something
    worst = max(abs(h["a"] - h["b"]) for h in history)
    assert worst <= bound(), worst
    # the weights show in the service itself: b gets about weight_b / weight_a of a's tokens
    last = history[-1]
    assert abs(last["a"] - last["b"]) <= bound()


def test_first_come_first_served_breaks_the_bound(tiny_model):
    """The same arrivals without tenants: B waits behind A's whole flood (the test can fail)."""
    history = run(tiny_model, {"a": 1.0, "b": 1.0}, fair=False)
    assert max(abs(h["a"] - h["b"]) for h in history) > bound()


def test_a_better_priority_class_is_admitted_first_and_preempts_a_worse_one(tiny_model):
    engine = Engine(tiny_model, kv_cache_tokens=4096, max_batch_tokens=256, max_running=4)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    for i in range(4):
        engine.add(("batch", i), [1, 5, 6 + i], params, tenant="batch", priority=1)
    engine.step()
    assert len(engine.running) == 4
    engine.add(("urgent", 0), [1, 9, 9], params, tenant="urgent", priority=0)
    engine.step()
    assert ("urgent", 0) in engine.running and engine.preemptions == 1
    assert sum(1 for s in engine.running if s[0] == "batch") == 3
    # and the preempted sequence resumes later with its tokens (sampling is per position)
    while engine.has_work():
        engine.step()
