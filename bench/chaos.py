"""Chaos soak: mixed traffic against a multi-node raymoe server while faults are injected.

One command starts a `ray.cluster_utils.Cluster` on this machine (a head with the front replicas
and Serve's proxy, three worker nodes offering `expert_host`, one of them spare), serves a
checkpoint with 2 front replicas and 2 expert actors, measures every request of a fixed pool once
fault-free (the reference), then for --minutes runs client threads that send a random mix —
streaming and unary, greedy and seeded sampling, streams cancelled half-way, bad requests — while a
fault is injected every --fault-every seconds, in turn: SIGKILL of an expert actor, SIGKILL of a
front replica, removal of a worker node that hosts an expert actor (a fresh node is added in its
place). Clients are the project's own (`cluster.client.Client`: broken streams are resumed).

It reports requests sent and how each ended (identical to the reference, differing, tokens missing
or duplicated, lost = an error after the client's retries, cancelled, refused as expected), latency
p50/p99 of completed requests, and the resident memory of every raymoe process alive both after a
warm-up under load (the first 10 s) and at the end. Exit status 1 if any request was lost or not identical.

    python -m bench.chaos [--minutes 10] [--fault-every 30] [--clients 8] [--checkpoint DIR] [--json]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


from bench.machine import bench_environment, free_port, pct

FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_failure_threshold": 3}
FAULTS = ("expert", "replica", "node")
ROLES = {"ServeReplica": "front replica", "ExpertActor": "expert actor", "ProxyActor": "proxy",
         "PoolHost": "pool host", "ServeController": "controller"}


@dataclasses.dataclass
class Report:
    sent: int = 0
    outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)
    faults: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)
    resumptions: int = 0
    memory: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # process → (start, end) bytes
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        bad = sum(n for k, n in self.outcomes.items() if k not in ("identical", "cancelled", "refused"))
        return bad == 0 and self.outcomes["identical"] > 0

    def to_json(self) -> dict:
        growth = {k: (e - s) / s for k, (s, e) in self.memory.items() if s}
        return {"sent": self.sent, "outcomes": dict(self.outcomes), "resumptions": self.resumptions,
                "latency_p50_s": pct(self.latencies, 0.5), "latency_p99_s": pct(self.latencies, 0.99),
                "faults": [{"at_s": round(t, 1), "kind": k, "what": w} for t, k, w in self.faults],
                "memory_bytes": {k: {"start": s, "end": e} for k, (s, e) in self.memory.items()},
                "max_memory_growth": max(growth.values(), default=0.0), "errors": self.errors[:20], "ok": self.ok}


def request_pool(vocab: int, n: int, seed: int = 0):
    """n distinct requests: prompt, length, greedy or seeded sampling, stream or unary."""
    from raymoe.protos import generator_pb2 as pb

    rng = random.Random(seed)
    pool = []
    for i in range(n):
        kw = dict(prompt_token_ids=[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 12))],
                  max_tokens=rng.randrange(40, 300), ignore_eos=True)
        if i % 2:
            kw.update(temperature=0.8, top_p=0.9, seed=1000 + i)
        pool.append((pb.GenerateRequest(**kw), i % 3 != 0))  # (request, streamed?)
    return pool


def run_request(client, request, streamed: bool, timeout: float) -> list[int]:
    if streamed:
        return [t for chunk in client.stream(request, timeout=timeout) for t in chunk.token_ids]
    return list(client.generate(request, timeout=timeout).token_ids)


def classify(got: list[int], want: list[int]) -> str:
    if got == want:
        return "identical"
    if len(got) < len(want) and want[:len(got)] == got:
        return "missing tokens"
    if len(got) > len(want):
        return "duplicated tokens"
    return "differing"


class Chaos:
    def __init__(self, args) -> None:
        self.args = args
        self.report = Report()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    # --- the cluster ---------------------------------------------------------------------------

    def start(self, checkpoint: str) -> None:
        import ray

        from bench.local_cluster import start_cluster
        from raymoe.cluster.deploy import deploy
        from raymoe.cluster.settings import ServeSettings

        self.cluster = start_cluster({"num_cpus": 3, "resources": {"front_host": 2}, "include_dashboard": False,
                                      "_system_config": FAST_FAILURE_DETECTION})
        self.workers = [self.add_worker() for _ in range(3)]  # two for the actors, one spare
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, namespace="raymoe-chaos", log_to_driver=False)
        self.settings = ServeSettings(
            checkpoint=checkpoint, expert_actors=2, expert_num_cpus=0.5, expert_resources={"expert_host": 1},
            expert_timeout_s=60, replicas=2, replica_num_cpus=0.5, replica_resources={"front_host": 1},
            grpc_port=free_port(), http_port=free_port(), graceful_shutdown_s=2.0, max_running=32)
        deploy(self.settings, proxy_location="HeadOnly")
        self.target = f"127.0.0.1:{self.settings.grpc_port}"

    def add_worker(self):
        from bench.local_cluster import add_node

        return add_node(self.cluster, num_cpus=1, resources={"expert_host": 1})

    def shutdown(self) -> None:
        import ray
        from ray import serve

        from raymoe.cluster.deploy import release_pool

        try:
            serve.shutdown()
            release_pool(self.settings)
        finally:
            ray.shutdown()
            self.cluster.shutdown()

    def processes(self) -> dict[int, tuple[str, str, str]]:
        """pid → (role, actor name or id, node id) of every live raymoe process."""
        from ray._private.state import actors

        out = {}
        for a in actors().values():
            role = next((r for prefix, r in ROLES.items() if a["ActorClassName"].startswith(prefix)), None)
            if role and a["State"] == "ALIVE" and a.get("Pid"):
                out[a["Pid"]] = (role, a.get("Name") or a["ActorID"][:8], a["Address"].get("NodeID", ""))
        return out

    # --- faults --------------------------------------------------------------------------------

    def inject(self, kind: str) -> str:
        procs = self.processes()
        if kind in ("expert", "replica"):
            role = "expert actor" if kind == "expert" else "front replica"
            pid = random.choice([p for p, (r, _, _) in procs.items() if r == role])
            os.kill(pid, signal.SIGKILL)
            return f"SIGKILL {role} pid {pid} ({procs[pid][1]})"
        hosting = {node for r, _, node in procs.values() if r == "expert actor"}
        victim = next(w for w in self.workers if w.node_id in hosting)
        doomed = [pid for pid, (_, _, node) in procs.items() if node == victim.node_id]
        self.cluster.remove_node(victim, allow_graceful=False)
        for pid in doomed:  # the whole machine is gone: its worker processes die with the raylet
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.workers.remove(victim)
        self.workers.append(self.add_worker())  # the autoscaler's replacement
        return f"removed worker node {victim.node_id[:12]} (and {len(doomed)} process(es) on it), added another"

    def faults(self, t0: float, until: float) -> None:
        """On the main thread (removing a node uses signals): a fault every --fault-every s until `until`."""
        i = 0
        while t0 + (i + 1) * self.args.fault_every < until:
            time.sleep(max(0.0, t0 + (i + 1) * self.args.fault_every - time.monotonic()))
            kind = FAULTS[i % len(FAULTS)]
            i += 1
            try:
                what = self.inject(kind)
            except Exception as e:  # noqa: BLE001 — a fault that could not be injected is reported
                what = f"not injected: {type(e).__name__}: {e}"
            self.report.faults.append((time.monotonic() - t0, kind, what))
            print(f"  [{time.monotonic() - t0:6.1f}s] fault: {what}", flush=True)

    # --- traffic -------------------------------------------------------------------------------

    def client_loop(self, seed: int, pool, reference) -> None:
        import grpc

        from raymoe.cluster.client import Client
        from raymoe.protos import generator_pb2 as pb

        rng = random.Random(seed)
        with Client(self.target) as client:
            while not self.stop.is_set():
                roll = rng.random()
                t = time.monotonic()
                try:
                    if roll < 0.08:  # a bad request: refused, never retried
                        try:
                            client.generate(pb.GenerateRequest(prompt_token_ids=[1, 2], temperature=-1.0), timeout=30)
                            outcome = "bad request accepted"
                        except grpc.RpcError as e:
                            outcome = "refused" if e.code() == grpc.StatusCode.INVALID_ARGUMENT else f"bad request: {e.code().name}"
                    elif roll < 0.16:  # a client that walks away half-way
                        request, _ = rng.choice(pool)
                        stream = client.stream(request, timeout=120)
                        for _ in range(3):
                            next(stream)
                        stream.close()
                        outcome = "cancelled"
                    else:
                        i = rng.randrange(len(pool))
                        request, streamed = pool[i]
                        outcome = classify(run_request(client, request, streamed, 180), reference[i])
                        if outcome == "identical":
                            with self.lock:
                                self.report.latencies.append(time.monotonic() - t)
                except Exception as e:  # noqa: BLE001 — lost: the client gave up
                    outcome = "lost"
                    with self.lock:
                        self.report.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                with self.lock:
                    self.report.sent += 1
                    self.report.outcomes[outcome] += 1
            with self.lock:
                self.report.resumptions += client.resumptions

    def memory(self) -> dict[int, tuple[str, int]]:
        out = {}
        for pid, (role, name, _) in self.processes().items():
            try:
                with open(f"/proc/{pid}/status") as f:
                    rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
                out[pid] = (f"{role} {name} (pid {pid})", rss)
            except (OSError, StopIteration):
                pass
        return out

    def run(self, checkpoint: str) -> Report:
        from raymoe.cluster.client import Client
        from raymoe.model.config import ModelConfig

        vocab = ModelConfig.from_file(Path(checkpoint) / "config.json").vocab_size
        pool = request_pool(vocab, self.args.requests)
        self.start(checkpoint)
        try:
            with Client(self.target) as client:
                client.wait_ready(300)
                reference = [run_request(client, r, s, 180) for r, s in pool]
            print(f"reference: {len(pool)} requests measured fault-free; soaking for {self.args.minutes:g} min with "
                  f"{self.args.clients} clients, a fault every {self.args.fault_every:g} s", flush=True)
            t0 = time.monotonic()
            threads = [threading.Thread(target=self.client_loop, args=(i, pool, reference), daemon=True)
                       for i in range(self.args.clients)]
            for th in threads:
                th.start()
            until = t0 + self.args.minutes * 60
            time.sleep(min(10.0, self.args.fault_every / 2))  # warmed up under load: the baseline
            start_mem = self.memory()
            self.faults(t0, until)
            time.sleep(max(0.0, until - time.monotonic()))
            self.stop.set()
            for th in threads:
                th.join(300)
            end_mem = self.memory()
            self.report.memory = {start_mem[p][0]: (start_mem[p][1], end_mem[p][1]) for p in start_mem if p in end_mem}
        finally:
            self.shutdown()
        return self.report


def print_report(r: Report) -> None:
    print(f"\nrequests sent {r.sent}; resumptions by the clients {r.resumptions}")
    for outcome, n in sorted(r.outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {outcome:<22} {n}")
    if r.latencies:
        print(f"latency of identical completions: p50 {pct(r.latencies, 0.5):.2f} s, p99 {pct(r.latencies, 0.99):.2f} s, "
              f"mean {statistics.mean(r.latencies):.2f} s")
    print(f"faults injected {len(r.faults)}: " + ", ".join(f"{k}@{t:.0f}s" for t, k, _ in r.faults))
    print("memory of the processes alive at start and end (RSS):")
    for name, (s, e) in sorted(r.memory.items()):
        print(f"  {name:<60} {s / 2**20:8.1f} MB → {e / 2**20:8.1f} MB ({(e - s) / s:+.1%})")
    for err in r.errors[:5]:
        print(f"  lost: {err}")
    print("OK: nothing lost, every completion identical" if r.ok else "FAILED: requests lost or not identical")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=24, help="distinct requests in the pool")
    ap.add_argument("--checkpoint", help="default: a fresh `tiny` preset checkpoint")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object at the end")
    args = ap.parse_args(argv)
    bench_environment()
    random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from raymoe.model.presets import init_checkpoint

            checkpoint = str(init_checkpoint("tiny", Path(tmp) / "tiny"))
        report = Chaos(args).run(checkpoint)
    print_report(report)
    if args.json:
        print(json.dumps(report.to_json()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
