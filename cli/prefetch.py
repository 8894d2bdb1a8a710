"""Warm the page cache with a checkpoint while the server's processes start.

Starting Ray, Serve and the expert actors takes several seconds before the first expert byte is
read; the disk sits idle meanwhile. When the expert actors run on this machine (a private Ray
instance), `raymoe serve` / `run` ask the kernel to read the checkpoint's files ahead
sequentially, and the actors then copy
their tensors from memory. The files are read in order with large reads into one small buffer
(posix_fadvise WILLNEED returns at once and reads nothing much on some kernels and virtual disks).
Bounded by the memory the machine has free: only as many bytes as fit in half of MemAvailable are
read, so the read-ahead never pushes out what the actors load.
"""

from __future__ import annotations

import threading
from pathlib import Path

STEP = 16 << 20  # bytes per read


def available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _read_ahead(files: list[Path], budget: int) -> None:
    buf = bytearray(STEP)
    for path in files:
        try:
            with open(path, "rb", buffering=0) as f:
                while budget > 0:
                    n = f.readinto(buf)
                    if not n:
                        break
                    budget -= n
        except OSError:
            continue
        if budget <= 0:
            return


def prefetch(checkpoint: str | Path) -> threading.Thread | None:
    """Start reading the checkpoint's safetensors files ahead on a background thread; returns it
    (None when there is nothing to read)."""
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        return None
    thread = threading.Thread(target=_read_ahead, args=(files, available_bytes() // 2),
                              name="raymoe-prefetch", daemon=True)
    thread.start()
    return thread
