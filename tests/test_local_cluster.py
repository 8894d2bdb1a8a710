"""bench/local_cluster.py: a Ray node whose start timed out is started once more, after the processes
that attempt left are ended (only those); any other error is raised at once. Ray's timeout cannot be
caused on demand, so the start here is a function that does what a timed-out node start does: it
starts processes, then raises Ray's exception."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bench.local_cluster import _retried


SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_timed_out_start_is_ended_and_made_again_and_other_errors_are_not():
    """The failed attempt's process and the child it started are ended; a process that was there
    before, and one that an older child starts meanwhile (as a raylet starts workers), are not."""
    started: list[subprocess.Popen] = []
    bystander = subprocess.Popen(SLEEP)  # there before the attempt: kept
    # an older child that starts a process of its own during the attempt (a raylet starting a worker)
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; sys.stdin.readline(); "
                               f"p = subprocess.Popen({SLEEP!r}); print(p.pid, flush=True); time.sleep(60)"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    spawned = []

    def start():
        started.append(subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                         f"p = subprocess.Popen({SLEEP!r}); print(p.pid, flush=True); time.sleep(60)"],
                                        stdout=subprocess.PIPE, text=True))
        if len(started) == 1:
            parent.stdin.write("go\n")
            parent.stdin.flush()
            spawned.append(int(parent.stdout.readline()))  # the older child's new process
            spawned.append(int(started[0].stdout.readline()))  # the attempt's grandchild
            raise Exception("The current node timed out during startup. This could happen because ...")
        return "node"

    try:
        assert _retried(start, attempts=2) == "node"
        assert len(started) == 2
        assert started[0].wait(10) == -9  # the failed attempt's process, ended by id
        assert _ends(spawned[1])  # and what it started
        assert started[1].poll() is None and bystander.poll() is None and parent.poll() is None
        assert _alive(spawned[0])  # an older child's new process: not the attempt's

        def broken():
            raise ValueError("not a timeout")
        with pytest.raises(ValueError):
            _retried(broken, attempts=2)
        calls = []

        def always_late():
            calls.append(1)
            raise Exception("The current node timed out during startup.")
        with pytest.raises(Exception, match="timed out during startup"):
            _retried(always_late, attempts=2)
        assert len(calls) == 2
    finally:
        for p in started + [bystander, parent]:
            p.kill()
            p.wait()
        for pid in spawned:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _ends(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    """Running (a killed process that its parent has not reaped yet is a zombie: not running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
