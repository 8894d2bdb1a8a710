"""Shared by the benchmarks: machine-wide busy CPU time, percentiles, a free port."""

from __future__ import annotations

import os
import random
import socket
import time


def bench_environment() -> None:
    """What every benchmark sets before it starts Ray: no token auth on its private instance, and
    Ray's workers at the benchmark's own priority (Ray starts them at nice 15, so on a machine doing
    anything else the served paths would yield to it while the in-process paths they are compared
    with do not)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")


def busy_cpu_seconds() -> float:
    """CPU seconds spent not idle by the whole machine since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    """CPU seconds of this process (all its threads): the load generator's own share."""
    t = os.times()
    return t.user + t.system


def _tree_and_rows(root: int, with_cmdline: bool = False) -> tuple[dict[int, list[int]], dict[int, tuple]]:
    """(pid → ids of its children, for `root` and every live process below it; pid → its
    `_proc_stats` row, for every process we can read), from one reading of /proc."""
    children: dict[int, list[int]] = {}
    rows: dict[int, tuple] = {}
    for row in _proc_stats(with_cmdline):
        children.setdefault(row[1], []).append(row[0])
        rows[row[0]] = row
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = children.get(pid, [])
        todo += tree[pid]
    return tree, rows


def process_tree(root: int | None = None) -> dict[int, list[int]]:
    """pid → ids of its children, for `root` (default: this one) and every live process below it,
    read at one moment."""
    return _tree_and_rows(os.getpid() if root is None else root)[0]


def commands_below(root: int | None = None) -> dict[int, str]:
    """pid → command line of every live process below `root` (default: this one), not `root` itself."""
    root = os.getpid() if root is None else root
    tree, rows = _tree_and_rows(root, with_cmdline=True)
    return {pid: rows[pid][3] for pid in tree if pid != root and pid in rows}


def descendants_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds so far of every live process below `root` (default: this one), not `root` itself:
    the Ray instance a benchmark started (raylet, GCS, Serve's proxy and replicas, expert actors)."""
    root = os.getpid() if root is None else root
    tree, rows = _tree_and_rows(root)
    return sum(rows[pid][2] for pid in tree if pid != root and pid in rows)


class CpuWindow:
    """CPU seconds during a window. `own`: this process (the load generator of the served paths, the
    whole work of the in-process ones); `tree`: the processes it started (its Ray instance);
    `machine`: the whole machine, which on a machine shared with others counts their work too —
    the benchmarks report own + tree (in-process paths) or tree (served paths) instead."""

    def __enter__(self) -> "CpuWindow":
        self.t0, self.busy0, self.self0 = time.perf_counter(), busy_cpu_seconds(), self_cpu_seconds()
        self.tree0 = descendants_cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.machine = busy_cpu_seconds() - self.busy0
        self.own = self_cpu_seconds() - self.self0
        self.tree = max(0.0, descendants_cpu_seconds() - self.tree0)  # a process that ended takes its share along
        self.others = max(0.0, self.machine - self.own)


def loadavg() -> str:
    """/proc/loadavg's first three fields: how busy the (shared) machine was."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _proc_stats(with_cmdline: bool = False):
    """(pid, parent pid, CPU seconds so far[, command line]) of every process we can read."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if with_cmdline:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        row = (int(pid), int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        yield row + (cmd,) if with_cmdline else row


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid → (command line, CPU seconds so far) for every process we can read."""
    return {pid: (cmd[:80], seconds) for pid, _, seconds, cmd in _proc_stats(with_cmdline=True)}


def top_processes(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                  n: int = 8) -> list[tuple[float, str]]:
    """The n processes that used the most CPU between two `process_cpu()` readings."""
    used = [(cpu - before.get(pid, ("", 0.0))[1], cmd) for pid, (cmd, cpu) in after.items()]
    return sorted(used, reverse=True)[:n]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free on every interface now, for a server this process is about to start. Chosen
    below the kernel's ephemeral range (and above Ray's worker ports, 10002-19999): a port
    `bind(0)` gives is one any outgoing connection may take before the server binds it (Serve's gRPC
    proxy once failed to bind such a port in the autoscaling demonstration)."""
    low, high = 20000, _ephemeral_low() - 1
    for port in random.sample(range(low, high), min(200, high - low)) if high > low else ():
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no such range here: any port the kernel gives
        s.bind(("", 0))
        return s.getsockname()[1]
