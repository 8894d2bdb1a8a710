"""Metric constants shared by the expert actors and the serving side.

Lives in actors/ because actors/ must not import cluster/ (serving); cluster/metrics.py imports
from here so every latency histogram in the project uses the same buckets (Grafana panels
compare them side by side).
"""

from __future__ import annotations

# Seconds; from 1 ms (one small expert call) to 30 s (a stalled step).
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class PlacementMetrics:
    """The expert placement, as the pool's creator (the pool host) sees it: its version, copies per
    (layer, expert), each actor's predicted share of the load, and the changes made (by kind, with
    their duration). Failovers are counted where they happen, by the front replicas."""

    _instance: "PlacementMetrics | None" = None

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram  # lazily: importing LATENCY_BUCKETS needs no Ray

        self.version = Gauge("raymoe_placement_version", "Version of the expert placement now serving")
        self.copies = Gauge("raymoe_expert_copies", "Copies of each expert", tag_keys=("layer", "expert"))
        self.actor_load = Gauge("raymoe_expert_actor_load_share", "An expert actor's predicted share of the "
                                "measured load under the current placement (1/actors when even)", tag_keys=("actor",))
        self.changes = Counter("raymoe_placement_changes", "Placement changes made (scale, rebalance)",
                               tag_keys=("kind",))
        self.change_seconds = Histogram("raymoe_placement_change_seconds", "Duration of a placement change, "
                                        "request to the last old copy retired", boundaries=LATENCY_BUCKETS)

    @classmethod
    def get(cls) -> "PlacementMetrics":
        if cls._instance is None:
            cls._instance = PlacementMetrics()
        return cls._instance

    def show(self, plan, names: dict[int, str], shares: list[float] | None = None) -> None:
        self.version.set(plan.version)
        for layer in range(plan.num_layers):
            for e, n in enumerate(plan.copies(layer)):
                self.copies.set(n, tags={"layer": str(layer), "expert": str(e)})
        total = sum(shares) if shares else 0.0
        for a, share in zip(plan.actors, shares or [1.0] * len(plan.actors)):
            self.actor_load.set(share / (total or len(plan.actors)), tags={"actor": names.get(a.id, str(a.id))})


_FAILOVERS = None


def count_failover(actor: str) -> None:
    """One actor's calls went to other copies after it failed (a front replica's counter)."""
    global _FAILOVERS
    try:
        if _FAILOVERS is None:
            from ray.util.metrics import Counter  # lazily, as above

            _FAILOVERS = Counter("raymoe_expert_failovers", "Expert actors whose layer calls went to other "
                                 "copies after they failed", tag_keys=("actor",))
        _FAILOVERS.inc(tags={"actor": actor})
    except Exception:  # noqa: BLE001 — outside a Ray worker (no metrics agent): counted in DispatchMetrics only
        pass
