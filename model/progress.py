"""Loading progress: bytes read of bytes to read, and the rate, for whoever loads weights.

Pure bookkeeping (no I/O, no Ray): the checkpoint reader calls `add` after every tensor; the
front and the expert actors expose `snapshot()`; the CLI prints `line()`. Thread-safe, because an
expert actor loads on a background thread while Ray calls ask how far it got.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable


@dataclasses.dataclass
class LoadProgress:
    total_bytes: int
    what: str = ""  # e.g. "experts[0-1]@layers[0-31]" or "dense part"
    bytes_read: int = 0
    state: str = "LOADING"  # LOADING | READY | FAILED
    error: str = ""
    started: float = dataclasses.field(default_factory=time.monotonic)
    finished: float | None = None
    on_add: Callable[["LoadProgress"], None] | None = None  # e.g. a metric gauge; called outside the lock

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
        if self.on_add is not None:
            self.on_add(self)

    def done(self, error: BaseException | None = None) -> None:
        with self._lock:
            self.finished = time.monotonic()
            self.state, self.error = ("FAILED", f"{type(error).__name__}: {error}") if error else ("READY", "")
        if self.on_add is not None:
            self.on_add(self)

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def snapshot(self) -> dict:
        with self._lock:
            return {"what": self.what, "state": self.state, "bytes_read": self.bytes_read,
                    "total_bytes": self.total_bytes, "seconds": round(self.seconds, 3), "error": self.error}


def progress_line(parts: list[dict]) -> str:
    """One line for many loaders' snapshots: the total, then each part that is not done."""
    read, total = sum(p["bytes_read"] for p in parts), sum(p["total_bytes"] for p in parts)
    secs = max((p["seconds"] for p in parts), default=0.0)
    rate = read / secs if secs > 0 else 0.0
    head = f"{read / 2**30:.2f} of {total / 2**30:.2f} GB ({read / max(1, total):.0%}), {rate / 2**20:.0f} MB/s"
    busy = [f"{p['what']} {p['bytes_read'] / max(1, p['total_bytes']):.0%}" for p in parts if p["state"] == "LOADING"]
    failed = [f"{p['what']} FAILED ({p['error']})" for p in parts if p["state"] == "FAILED"]
    return "; ".join([head, *busy[:6], *([f"+{len(busy) - 6} more"] if len(busy) > 6 else []), *failed])
