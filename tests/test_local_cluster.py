"""bench/local_cluster.py: a Ray node whose start timed out is started once more, after the processes
that attempt left are ended (only those); any other error is raised at once. Ray's timeout cannot be
caused on demand, so the start here is a function that does what a timed-out node start does: it
starts processes, then raises Ray's exception."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.local_cluster import _retried


def test_a_timed_out_start_is_ended_and_made_again_and_other_errors_are_not():
    started: list[subprocess.Popen] = []
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # there before: kept

    def start():
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        if len(started) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")
        return "node"

    try:
        assert _retried(start, attempts=2) == "node"
        assert len(started) == 2
        assert started[0].wait(10) == -9  # the failed attempt's process, ended by id
        assert started[1].poll() is None and bystander.poll() is None

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
        for p in started + [bystander]:
            p.kill()
            p.wait()
