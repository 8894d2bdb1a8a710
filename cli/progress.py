"""What a starting command shows while weights load: a progress line every couple of seconds.

`raymoe run` prints the front's dense part and its expert actors' loading on stderr (stdout stays
one JSON object with --json); `raymoe serve` prints its expert actors' loading, found by name in
the cluster, until the server answers. Lines look like
    raymoe: loading experts: 1.37 of 5.25 GB (26%), 412 MB/s; experts[0-1]@layers[0-1] 31%; ...
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

from raymoe.model.progress import progress_line

EVERY_S = 1.0  # a line at least every second or so (the target is every 2 s, on a busy machine)


class Ticker:
    """Prints `line()` (when it returns text) at once and then every `every_s` until closed.

    line() runs on a thread of its own (it may ask Ray, which can take seconds on a machine busy
    starting processes): each beat prints the newest text it has, so the beat never slips; a
    beat with nothing new repeats the last text with the time waited since it came."""

    def __init__(self, line: Callable[[], str | None], every_s: float = EVERY_S, out: TextIO | None = None) -> None:
        self.line, self.every_s, self.out = line, every_s, out or sys.stderr
        self._stop = threading.Event()
        self._fresh = threading.Event()
        self._latest: tuple[str | None, float] = (None, time.monotonic())
        self._threads = [threading.Thread(target=self._sample, name="raymoe-progress-sample", daemon=True),
                         threading.Thread(target=self._print, name="raymoe-progress", daemon=True)]

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                text = self.line()
            except Exception as e:  # noqa: BLE001 — progress must never break the command
                text = f"raymoe: (progress unavailable: {type(e).__name__})"
            self._latest = (text, time.monotonic())
            self._fresh.set()
            self._stop.wait(self.every_s / 2)

    def _print(self) -> None:
        self._fresh.wait(self.every_s)  # the first line as soon as there is one
        next_at = time.monotonic()
        while True:
            text, at = self._latest
            if text:
                stale = time.monotonic() - at
                print(text if self._fresh.is_set() or stale < self.every_s else f"{text} (+{stale:.0f} s)",
                      file=self.out, flush=True)
            self._fresh.clear()
            next_at += self.every_s  # on a fixed beat, however long line() takes
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return

    def __enter__(self) -> "Ticker":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


class PoolProgress:
    """An ExpertPool's on_progress callback that keeps the latest snapshots for a Ticker."""

    def __init__(self, num_actors: int) -> None:
        self.num_actors, self.snapshots, self.t0 = num_actors, [], time.monotonic()

    def __call__(self, snapshots: list[dict]) -> None:
        self.snapshots = snapshots

    def line(self) -> str:
        if not self.snapshots:
            return f"raymoe: starting {self.num_actors} expert actor(s) ({time.monotonic() - self.t0:.0f} s)"
        if all(s["state"] == "READY" for s in self.snapshots):
            return ""
        return f"raymoe: loading experts: {progress_line(self.snapshots)}"


def serve_progress_line(app: str, t0: float) -> str:
    from raymoe.actors.pool_host import pool_progress

    snaps = pool_progress(app)
    waited = f"{time.monotonic() - t0:.0f} s"
    if not snaps:
        return f"raymoe: starting the front replica and its expert pool ({waited})"
    if all(s["state"] == "READY" for s in snaps):
        return f"raymoe: experts loaded; waiting for the front replica(s) ({waited})"
    return f"raymoe: loading experts: {progress_line(snaps)}"
