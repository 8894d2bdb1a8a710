"""Failover: a dead copy's pairs go to a live copy at once.

A layer call that fails on an actor whose experts have other copies makes RemoteExperts `suspect`
it: from then on every route of this process leaves it out wherever its experts have another copy
(actors/live_plan.py's layer_route), until a background thread sees it answer as loaded again (a
restarted process reloads its experts first). Suspicion is per process: each front replica
notices failures on its own calls. Replacing an actor dead for good is the pool host's
(actors/live.py: dead_actors, replace_dead).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import ray

from .metrics import count_failover

if TYPE_CHECKING:
    from .actor_group import ActorGroup

SUSPECT_CHECK_S = 0.2  # how often an actor suspected dead is asked whether it is back


class Failover:
    """The actors this process suspects dead (`down`; `dead`: those Ray reports dead for good), and
    the thread that clears them again."""

    def __init__(self, group: "ActorGroup", metrics: Any) -> None:
        self.group, self.metrics = group, metrics  # metrics: the pool's DispatchMetrics (counts failovers)
        self.down: frozenset = frozenset()  # replaced whole, never changed in place: routes key on it
        self.dead: frozenset = frozenset()  # those of `down` Ray reports dead for good (not merely silent)
        self._lock = threading.Lock()
        self._checker: threading.Thread | None = None

    def suspect(self, actor: int) -> None:
        """Route nothing to `actor` where its experts have other copies, until it answers as loaded
        again, checked on a background thread."""
        with self._lock:
            if actor in self.down:
                return
            self.down = self.down | {actor}
            self.metrics.failovers += 1
            if self._checker is None:
                self._checker = threading.Thread(target=self._check_suspects, name="raymoe-failover", daemon=True)
                self._checker.start()
        count_failover(self.group.actor_name(actor))

    def _check_suspects(self) -> None:
        while True:
            with self._lock:
                if not self.down:
                    self._checker = None
                    return
            actors = self.group.actors
            for actor in list(self.down):
                handle = actors[actor] if actor < len(actors) else None
                died = False
                try:
                    back = handle is not None and ray.get(handle.progress.remote(), timeout=1.0)["state"] == "READY"
                except ray.exceptions.ActorDiedError:  # no restart will come (until the pool replaces it)
                    back, died = False, True
                except Exception:  # noqa: BLE001 — silent (busy, or restarting)
                    back = False
                with self._lock:
                    if back or handle is None:
                        self.down, self.dead = self.down - {actor}, self.dead - {actor}
                    elif died:
                        self.dead = self.dead | {actor}
            time.sleep(SUSPECT_CHECK_S)
