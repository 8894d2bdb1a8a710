"""A short chaos soak (bench/chaos.py): 45 s of mixed traffic against a multi-node server while
an expert actor, a front replica and a worker node are lost in turn; nothing may be lost and every
completion must equal its fault-free reference. The 10-minute run is the same command."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a soak


def test_three_kinds_of_fault_under_traffic_lose_nothing(capsys):
    from bench.chaos import main
    import shared_ray

    shared_ray.leave()  # the soak starts a cluster of its own and connects this process to it
    status = main(["--minutes", "0.75", "--fault-every", "12", "--clients", "4", "--requests", "12", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    kinds = [f["kind"] for f in report["faults"] if not f["what"].startswith("not injected")]
    assert {"expert", "replica", "node"} <= set(kinds), report["faults"]
    assert report["outcomes"].get("identical", 0) > 20
    assert report["outcomes"].get("lost", 0) == 0, report["errors"]
    assert set(report["outcomes"]) <= {"identical", "cancelled", "refused"}, report["outcomes"]
    assert status == 0 and report["ok"]
