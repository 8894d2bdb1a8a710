"""A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`) that survives a node whose
start timed out.

Ray gives a starting node's raylet 30 s to register with the GCS, then raises "The current node timed
out during startup". On a loaded 2-core machine a node now and then never registers (no raylet log
at all, the GCS saw no RegisterNode); starting it again works. Here a node start that times out ends
the processes that attempt started and starts the node once more; any other error, or a second
timeout, is raised. Those processes, by id: this process's children that were not there before the
attempt (Ray starts a node's GCS, raylet and reaper itself) and everything below them. Workers that
other nodes' raylets start meanwhile are below those raylets, and are left alone.
"""

from __future__ import annotations

import os
import signal
import sys

from bench.machine import process_tree

TIMED_OUT = "timed out during startup"


def start_cluster(head_node_args: dict, attempts: int = 2):
    """A Cluster with its head node started (as Cluster(initialize_head=True, head_node_args=...))."""
    from ray.cluster_utils import Cluster

    return _retried(lambda: Cluster(initialize_head=True, head_node_args=head_node_args), attempts)


def add_node(cluster, attempts: int = 2, **node_args):
    """cluster.add_node(**node_args), started once more if its raylet did not register in time."""
    return _retried(lambda: cluster.add_node(**node_args), attempts)


def _retried(start, attempts: int):
    for _ in range(attempts - 1):
        before = set(process_tree()[os.getpid()])
        try:
            return start()
        except Exception as e:  # noqa: BLE001 — Ray raises a plain Exception for this
            if TIMED_OUT not in str(e):
                raise
            _end_new_children(before)
            print(f"local_cluster: a Ray node did not register in time ({e}); starting it again",
                  file=sys.stderr, flush=True)
    return start()


def _end_new_children(before: set[int]) -> None:
    """SIGKILL this process's children that are not in `before`, and everything below them."""
    tree = process_tree()
    todo = [pid for pid in tree[os.getpid()] if pid not in before]  # the attempt's GCS, raylet, ...
    while todo:
        pid = todo.pop()
        todo += tree.get(pid, [])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
