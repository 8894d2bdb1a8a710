"""The whole autoscaling loop on one machine, with Ray's own autoscaler: load makes Serve add a front
replica and raymoe add expert actors, their pending resources make the autoscaler add nodes, and
idle time removes them again.

Ray's fake multi-node provider (RAY_FAKE_CLUSTER=1) launches local "nodes" (a raylet each) of the
node types the Kubernetes manifests declare: the worker groups of k8s/base/rayservice.yaml (front:
1 CPU + `front_host`; expert: 2 CPUs + 2 `expert_host`), with their min/max counts. The server is
the cpu overlay's (k8s/render.py) with `--autoscale 1:2 --expert-autoscale 2:3` and short delays.
A timeline is printed every --every seconds (front replicas, expert actors and placement version,
nodes per type, tokens/s, failed requests), then how long each step took.

    python -m scripts.autoscale_demo [--clients 12] [--load-s 90] [--idle-s 120]

The cluster it starts is stopped at the end by the ids of the processes it started (processes
whose command line names its GCS address), never by name.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENV = {  # fast loops for a demonstration (defaults: 5 s autoscaler, 10 s Serve metrics, 30 s draining)
    "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1",
}


def node_types() -> dict[str, dict]:
    """The worker groups of the RayService as fake-provider node types (resources, min/max)."""
    import yaml

    docs = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "rayservice.yaml").read_text()))
    spec = next(d for d in docs if d and d.get("kind") == "RayService")["spec"]["rayClusterConfig"]
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for group in spec["workerGroupSpecs"]:
        resources = {k: float(v) for k, v in group["resources"].items()}
        resources["object_store_memory"] = 200 * 2**20
        # min_workers 0, not the group's minReplicas: Ray's autoscaler keeps its min_workers nodes
        # whichever are idle, so after Serve stops the replica on the first front node, that idle
        # node would stay while the second (busy) one cannot go. From 0, the first nodes start on
        # demand when the app deploys, and whichever node goes idle is removed.
        types[group["groupName"]] = {"resources": resources, "node_config": {}, "min_workers": 0,
                                     "max_workers": int(group.get("maxReplicas", 1))}
    return types


def autoscaler_config(port: int) -> dict:
    types = node_types()
    return {
        "cluster_name": "raymoe-autoscale-demo", "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "docker": {}, "available_node_types": types,
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


class FakeCluster:
    """`ray start --head` with the fake provider; stop() ends exactly the processes it started."""

    def __init__(self, tmp: Path) -> None:
        from bench.machine import free_port

        self.port = free_port()
        cfg = tmp / "autoscaler.yaml"
        cfg.write_text(json.dumps(autoscaler_config(self.port)))
        self.env = {**os.environ, **ENV}
        ray_bin = Path(sys.executable).with_name("ray")
        self.temp_dir = tmp / "ray"  # every process of this cluster names it (logs, sockets)
        subprocess.run([str(ray_bin), "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=0", "--include-dashboard=false", f"--autoscaling-config={cfg}",
                        f"--temp-dir={self.temp_dir}"],
                       env=self.env, check=True, capture_output=True, cwd=ROOT)
        self.address = f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """Processes of this cluster: their command line names its temp dir or its GCS port."""
        import re

        marks = re.compile(rb"%s|[:=]%d\b" % (re.escape(str(self.temp_dir).encode()), self.port))
        mine = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if marks.search(cmd):
                mine.append(int(proc.name))
        return mine

    def stop(self) -> None:
        for _ in range(3):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # `ray start` left the address for later `ray.init()` calls to join: it is gone now
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        try:
            if current.read_text().strip().endswith(f":{self.port}"):
                current.unlink()
        except OSError:
            pass


class Load:
    """`clients` threads, each streaming requests back to back (the project's resuming client)."""

    def __init__(self, target: str, clients: int, max_tokens: int = 48) -> None:
        self.target, self.clients, self.max_tokens = target, clients, max_tokens
        self.tokens = self.ok = self.failed = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        from raymoe.cluster.client import Client
        from raymoe.protos import generator_pb2 as pb

        with Client(self.target) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                request = pb.GenerateRequest(prompt=f"{(7 * i + n) % 90 + 10}+{(3 * n) % 90 + 10}=",
                                             max_tokens=self.max_tokens, ignore_eos=True)
                try:
                    got = sum(len(c.token_ids) for c in client.stream(request, timeout=120))
                    with self._lock:
                        self.tokens += got
                        self.ok += 1
                except Exception as e:  # noqa: BLE001 — counted and shown
                    with self._lock:
                        self.failed += 1
                        self.errors.append(f"{type(e).__name__}: {getattr(e, 'details', lambda: e)()}"[:200])

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=150)


def snapshot(client) -> dict:
    import ray
    from ray import serve

    from raymoe.cluster.settings import APP_NAME, DEPLOYMENT_NAME

    nodes = {"front": 0, "expert": 0}
    for n in ray.nodes():
        if n.get("Alive"):
            for kind in nodes:
                if n["Resources"].get(f"{kind}_host"):
                    nodes[kind] += 1
    try:
        dep = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
        replicas = dep.replica_states.get("RUNNING", 0)
    except Exception:  # noqa: BLE001
        replicas = -1
    try:
        placement = client.placement(timeout=10)
        actors, version = len(placement.actors), placement.version
    except Exception:  # noqa: BLE001
        actors, version = -1, -1
    return {"replicas": replicas, "actors": actors, "version": version, **{f"{k}_nodes": v for k, v in nodes.items()}}


def run(clients: int = 12, load_s: float = 90.0, idle_s: float = 120.0, every_s: float = 2.0,
        target_busy: float = 0.1, out=print, wait_for_front_node: bool = True) -> dict:
    """The demonstration; returns {timeline, steps, failed, ok, errors} (the test reads it).
    wait_for_front_node=False ends the idle phase once replica, actor and expert node are gone
    (Ray's autoscaler sometimes keeps the idle front node for minutes)."""
    import dataclasses

    import ray
    from ray import serve

    from bench.machine import free_port
    from raymoe.cluster.client import Client
    from raymoe.cluster.deploy import deploy, release_pool
    from k8s.render import OVERLAYS

    settings = dataclasses.replace(
        OVERLAYS["cpu"], http_host="127.0.0.1", grpc_port=free_port(), http_port=free_port(),
        replicas=1, autoscale_max_replicas=2, target_ongoing_requests=max(1, clients // 3),
        expert_actors=2, expert_autoscale_min=2, expert_autoscale_max=3, expert_target_busy=target_busy,
        upscale_delay_s=3.0, downscale_delay_s=10.0, rebalance_every_s=0.0, graceful_shutdown_s=5.0)
    tmp = tempfile.TemporaryDirectory()
    cluster = FakeCluster(Path(tmp.name))
    timeline, steps, load = [], {}, None
    t0 = time.monotonic()
    try:
        os.environ.update(ENV)
        ray.init(address=cluster.address, log_to_driver=False)
        deploy(settings, proxy_location="HeadOnly")  # every fake node shares this machine's ports
        target = f"127.0.0.1:{settings.grpc_port}"
        with Client(target) as client:
            client.wait_ready(300)
            steps["ready"] = time.monotonic() - t0
            out(f"{'t':>6} {'phase':<6} {'replicas':>8} {'experts':>7} {'v':>3} {'front nodes':>11} "
                f"{'expert nodes':>12} {'tok/s':>7} {'failed':>6}")
            first = snapshot(client)
            load = Load(target, clients)
            load_started = idle_started = last_t = time.monotonic()
            phase, phase_end, last_tokens = "load", load_started + load_s, 0
            load.start()
            while True:
                time.sleep(every_s)
                now = time.monotonic()
                snap = snapshot(client)
                tps = (load.tokens - last_tokens) / (now - last_t)
                last_tokens, last_t = load.tokens, now
                row = {"t": now - t0, "phase": phase, "tok_s": tps, "failed": load.failed, **snap}
                timeline.append(row)
                out(f"{row['t']:6.1f} {phase:<6} {snap['replicas']:>8} {snap['actors']:>7} {snap['version']:>3} "
                    f"{snap['front_nodes']:>11} {snap['expert_nodes']:>12} {tps:7.1f} {load.failed:>6}")
                for key, hit in (("front replica added", snap["replicas"] > first["replicas"]),
                                 ("expert actor added", snap["actors"] > first["actors"]),
                                 ("front node added", snap["front_nodes"] > first["front_nodes"]),
                                 ("expert node added", snap["expert_nodes"] > first["expert_nodes"])):
                    if phase == "load" and hit and key not in steps:
                        steps[key] = now - load_started
                if phase == "load" and now >= phase_end:
                    load.stop()
                    phase, phase_end, idle_started = "idle", now + idle_s, now
                elif phase == "idle":
                    for key, hit in (("front replica removed", snap["replicas"] <= first["replicas"]),
                                     ("expert actor removed", snap["actors"] <= first["actors"]),
                                     ("front node removed", snap["front_nodes"] <= first["front_nodes"]),
                                     ("expert node removed", snap["expert_nodes"] <= first["expert_nodes"])):
                        if hit and key not in steps:
                            steps[key] = now - idle_started
                    wanted = ["front replica removed", "expert actor removed", "expert node removed"]
                    done = all(k in steps for k in wanted + (["front node removed"] if wait_for_front_node else []))
                    if done or now >= phase_end:
                        break
        out("")
        for key, seconds in steps.items():
            out(f"{key:<22} {seconds:6.1f} s" + ("" if key == "ready" else
                                                  " after the load started" if "added" in key else
                                                  " after the load stopped"))
        if "front node removed" not in steps:
            out(f"front node removed     not within the idle phase ({idle_s:g} s)")
        out(f"requests: {load.ok} ok, {load.failed} failed" + (f" (first: {load.errors[0]})" if load.errors else ""))
        return {"timeline": timeline, "steps": steps, "ok": load.ok, "failed": load.failed, "errors": load.errors}
    finally:
        if load is not None:
            load.stop()
        try:
            serve.shutdown()
            release_pool(settings)
        except Exception:  # noqa: BLE001
            pass
        ray.shutdown()
        cluster.stop()
        tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=12, help="concurrent streaming clients during the load")
    ap.add_argument("--load-s", type=float, default=90.0)
    ap.add_argument("--idle-s", type=float, default=120.0, help="longest wait for everything to scale back")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between timeline rows")
    ap.add_argument("--target-busy", type=float, default=0.1,
                    help="busy fraction an expert actor should run at (the demo model's experts are light)")
    args = ap.parse_args(argv)
    result = run(args.clients, args.load_s, args.idle_s, args.every, args.target_busy)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
