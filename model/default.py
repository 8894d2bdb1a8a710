"""Where the default model lives when a command is given no --checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PACKAGED = Path(__file__).parent / "demo_model"  # the trained demo model shipped with the package


def cache_dir() -> Path:
    return Path(os.environ.get("RAYMOE_CACHE", Path.home() / ".cache" / "raymoe"))


def default_checkpoint() -> Path:
    """The shipped demo model if present, else a `tiny` random checkpoint created once in the cache."""
    if (PACKAGED / "config.json").exists():
        return PACKAGED
    target = cache_dir() / "default-tiny"
    if not target.exists():  # created under a temporary name and renamed, so it is complete or absent
        from .presets import init_checkpoint  # only here: it imports torch, and this module stays light

        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        init_checkpoint("tiny", tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return target
