"""Fair sharing of one engine between tenants: virtual token counters (VTC) and priority classes.

VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24): each tenant has a counter
of the service it received, prompt tokens weighted `prompt_weight` and generated tokens
`output_weight` (a generated token costs a step, a prompt token a share of one), divided by the
tenant's `weight`. The engine admits, among the waiting sequences, those of the tenant with the
smallest counter first (its oldest first), and preempts, when memory runs out, a sequence of the
tenant with the largest. A tenant that arrives after a pause has its counter lifted to the
smallest counter of the tenants being served, so idling saves up no credit. For two tenants that
both keep work waiting, the difference of their counters stays within 2·max(prompt_weight ·
longest prompt, output_weight · tokens one step can hold) — the paper's bound, which
tests/test_fair.py checks on the engine with a simulated clock (its steps). It is work-conserving:
nothing waits while there is room.

Priority classes come before counters: a lower `priority` number is admitted first and, when no
slot or memory is free, preempts a sequence of a higher number (as vLLM's priority scheduling).
With one tenant and one class everything is first come, first served, as without this module.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Protocol


class Shared(Protocol):
    """What the policy reads of a sequence (model/engine.py's Sequence)."""

    tenant: str
    weight: float
    priority: int
    arrival: int


class FairShare:
    def __init__(self, prompt_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.prompt_weight, self.output_weight = prompt_weight, output_weight
        self.counters: dict[Hashable, float] = {}

    def arrive(self, tenant: Hashable, active: Iterable[Hashable]) -> None:
        """A sequence of `tenant` arrives; `active`: the tenants with sequences waiting or running."""
        others = [self.counters.get(t, 0.0) for t in set(active) if t != tenant]
        if tenant not in set(active) and others:  # back after a pause: no credit saved up meanwhile
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(others))
        self.counters.setdefault(tenant, 0.0)

    def charge(self, seq: Shared, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = self.prompt_weight * prompt_tokens + self.output_weight * output_tokens
        self.counters[seq.tenant] = self.counters.get(seq.tenant, 0.0) + cost / seq.weight

    def key(self, seq: Shared) -> tuple[int, float, int]:
        """Admission order: class, then the tenant's counter, then arrival."""
        return seq.priority, self.counters.get(seq.tenant, 0.0), seq.arrival

    def order(self, waiting: Iterable[Shared]) -> list:
        return sorted(waiting, key=self.key)

    def victim(self, running: Iterable[Shared]):
        """The sequence to preempt: the highest class number, then the largest counter, then the
        latest arrival (with one tenant and class: the latest arrival, as before)."""
        return max(running, key=self.key)
