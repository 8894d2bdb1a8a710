"""Expert autoscaling: how many expert actors the measured work asks for (pure, no Ray).

Each actor reports the seconds it spent computing layer calls (`busy_s`) and the seconds calls
waited in it before their computation started (`queued_s`: a caller's next micro-batch behind
its previous one). Between two samples, (Δbusy + Δqueued) / Δwall is the actor's demand: the
layer calls in it on average, computing or waiting (Little's law). It is not capped at 1: calls
of several front replicas compute side by side and their summed time exceeds the wall time, and
waiting calls add to it, so a saturated actor asks for more than one that is merely busy. Like
Serve's replica autoscaling (ongoing requests against a target), the wanted count is
ceil(Σ demand / target_busy), kept within [min, max]; it must ask for
more for `upscale_after_s`, or for fewer for `downscale_after_s`, before it changes anything, and
then moves one actor at a time (each change loads experts, so no lurching). The pool host samples
it (actors/pool_host.py) and applies the answer through the live placement (actors/live.py); new
actors that do not fit make the cluster's autoscaler add nodes.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class ExpertAutoscaler:
    min_actors: int
    max_actors: int
    target_busy: float = 0.5  # the busy fraction an actor should run at
    upscale_after_s: float = 5.0
    downscale_after_s: float = 30.0
    _since: float | None = None  # when the wish to change (in `_direction`) began
    _direction: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError(f"expert autoscaling needs 1 <= MIN <= MAX (got {self.min_actors}:{self.max_actors})")
        if not 0 < self.target_busy <= 1:
            raise ValueError(f"target busy fraction must be in (0, 1] (got {self.target_busy})")

    def wanted(self, busy: list[float]) -> int:
        """The actor count Σ busy (each actor's demand, see actor_demand) asks for, within [min, max]."""
        want = math.ceil(sum(busy) / self.target_busy - 1e-9) if busy else self.min_actors
        return max(self.min_actors, min(self.max_actors, want))

    def decide(self, now: float, current: int, busy: list[float]) -> int:
        """The actor count to run now (`current` unless the wish has lasted long enough)."""
        want = self.wanted(busy)
        direction = (want > current) - (want < current)
        if direction == 0 or direction != self._direction:
            self._direction, self._since = direction, (now if direction else None)
            if direction == 0:
                return current
        delay = self.upscale_after_s if direction > 0 else self.downscale_after_s
        if now - self._since >= delay:
            self._direction, self._since = 0, None
            return current + direction
        return current


def actor_demand(before: dict[int, tuple[float, float, float]],
                 after: dict[int, tuple[float, float, float]]) -> list[float]:
    """Per actor in both samples, (Δbusy + Δqueued) / Δwall from {actor: (wall time, busy_s,
    queued_s)}: the calls in it on average (a restarted actor's counters start again: they count
    from zero)."""
    out = []
    for actor, (t1, b1, q1) in after.items():
        if actor not in before:
            continue
        t0, b0, q0 = before[actor]
        if t1 <= t0:
            continue
        restarted = b1 < b0 or q1 < q0
        busy, queued = (b1, q1) if restarted else (b1 - b0, q1 - q0)
        out.append(max(0.0, (busy + queued) / (t1 - t0)))
    return out
