"""The autoscaling loop end to end (scripts/autoscale_demo.py) on Ray's fake multi-node provider:
under load Serve adds a front replica and raymoe an expert actor, the autoscaler adds a node of each
type for them, and once the load stops the replica, the actor and the expert node go away again; no
request fails. About 2 min."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a demonstration

from scripts.autoscale_demo import run


def test_load_scales_replicas_actors_and_nodes_up_and_idle_scales_them_down():
    import shared_ray

    shared_ray.leave()  # the demo starts a cluster of its own and connects this process to it
    lines = []
    result = run(clients=12, load_s=30, idle_s=90, every_s=2, out=lines.append, wait_for_front_node=False)
    steps = result["steps"]
    text = "\n".join(lines)
    # Not asserted: the idle front node's removal. Ray's autoscaler removed it ~8 s after the replica
    # in some runs and kept it for minutes in others (an open finding, see the README).
    for step in ("front replica added", "expert actor added", "front node added", "expert node added",
                 "front replica removed", "expert actor removed", "expert node removed"):
        assert step in steps, f"{step} did not happen:\n{text}"
    assert result["failed"] == 0, result["errors"][:3]
    assert result["ok"] > 50
    rows = result["timeline"]
    assert max(r["replicas"] for r in rows) == 2 and max(r["actors"] for r in rows) == 3
    assert rows[-1]["replicas"] == 1 and rows[-1]["actors"] == 2
