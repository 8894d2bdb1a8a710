"""A calm tenant beside a flooding one: its time to first token and request latency, alone and
beside the flood, in one run (both sides share the machine's noise).

The server: the demo model (or --checkpoint) with --expert-actors actors and a tenants file of two
tenants: `calm` (no limits) and `flood` (max_concurrent --flood-limit). The flood opens --flood
concurrent streams of --flood-tokens tokens, each opening again as soon as it ends or is refused,
for as long as the calm tenant measures; the calm tenant runs --calm requests one after another
(--calm-tokens each). Per repeat it prints the calm tenant's median TTFT and latency solo and
beside the flood, their ratio, the calm errors, and what the flood got (OK / RESOURCE_EXHAUSTED /
anything else). Targets (issue 22): latency ratio ≤ 3, 0 calm errors, the flood's excess only
RESOURCE_EXHAUSTED.

    python -m bench.bench_tenants [--repeats 3] [--flood 48] [--flood-limit 8] [--flood-tokens 256]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from raymoe.cluster.client import Client
from raymoe.protos import generator_pb2 as pb


def calm_run(client: Client, count: int, tokens: int) -> tuple[list[float], list[float], int]:
    """(TTFTs, latencies, errors) of `count` sequential calm streams."""
    ttft, latency, errors = [], [], 0
    for i in range(count):
        request = pb.GenerateRequest(prompt=f"{100 + i}+{23 * i}=", max_tokens=tokens, ignore_eos=True)
        t0 = time.perf_counter()
        first = None
        try:
            for _ in client.stream(request, timeout=300, retries=0):
                first = first or time.perf_counter()
        except grpc.RpcError:
            errors += 1
            continue
        ttft.append(first - t0)
        latency.append(time.perf_counter() - t0)
    return ttft, latency, errors


def flood_worker(client: Client, tokens: int, stop: threading.Event, outcomes: collections.Counter,
                 lock: threading.Lock) -> None:
    request = pb.GenerateRequest(prompt="9+9=", max_tokens=tokens, ignore_eos=True)
    while not stop.is_set():
        try:
            for _ in client.stream(request, timeout=300, retries=0):
                if stop.is_set():
                    break
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
            time.sleep(0.05)  # a hostile client retries at once; a little slower keeps the bench's own CPU low
        with lock:
            outcomes[code] += 1


def one_repeat(target: str, args) -> dict:
    calm = Client(target, api_key="calm-key")
    solo = calm_run(calm, args.calm, args.calm_tokens)
    stop, lock, outcomes = threading.Event(), threading.Lock(), collections.Counter()
    floods = [Client(target, api_key="flood-key") for _ in range(min(args.flood, 8))]
    threads = [threading.Thread(target=flood_worker, args=(floods[i % len(floods)], args.flood_tokens, stop,
                                                          outcomes, lock), daemon=True) for i in range(args.flood)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the flood holds its slots
    beside = calm_run(calm, args.calm, args.calm_tokens)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    for c in [calm, *floods]:
        c.close()
    return {"solo": solo, "beside": beside, "flood": dict(outcomes)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--expert-actors", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flood", type=int, default=48)
    p.add_argument("--flood-limit", type=int, default=8)
    p.add_argument("--flood-tokens", type=int, default=256)
    p.add_argument("--calm", type=int, default=6)
    p.add_argument("--calm-tokens", type=int, default=32)
    args = p.parse_args()

    from bench.machine import bench_environment, free_port

    bench_environment()
    from raymoe.cluster.deploy import deploy, release_pool
    from raymoe.cluster.settings import ServeSettings

    import ray
    from ray import serve

    tenants = Path(tempfile.mkdtemp()) / "tenants.yaml"
    tenants.write_text("tenants:\n  - {name: calm, key: calm-key}\n"
                       f"  - {{name: flood, key: flood-key, max_concurrent: {args.flood_limit}}}\n")
    settings = ServeSettings(checkpoint=args.checkpoint, expert_actors=args.expert_actors, expert_num_cpus=0.25,
                             tenants_file=str(tenants), grpc_port=free_port(), http_port=free_port())
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        deploy(settings)
        target = f"127.0.0.1:{settings.grpc_port}"
        with Client(target, api_key="calm-key") as c:
            c.wait_ready(300)
        rows = []
        for r in range(args.repeats):
            load = Path("/proc/loadavg").read_text().split()[:3]
            got = one_repeat(target, args)
            (st, sl, se), (bt, bl, be) = got["solo"], got["beside"]
            row = {"ttft_solo": statistics.median(st), "lat_solo": statistics.median(sl),
                   "ttft_beside": statistics.median(bt) if bt else float("nan"),
                   "lat_beside": statistics.median(bl) if bl else float("nan"), "calm_errors": se + be,
                   "flood": got["flood"], "load": " ".join(load)}
            row["lat_ratio"] = row["lat_beside"] / row["lat_solo"]
            row["ttft_ratio"] = row["ttft_beside"] / row["ttft_solo"]
            rows.append(row)
            print(f"repeat {r}: calm TTFT {row['ttft_solo'] * 1e3:.0f} → {row['ttft_beside'] * 1e3:.0f} ms "
                  f"(×{row['ttft_ratio']:.2f}), latency {row['lat_solo'] * 1e3:.0f} → {row['lat_beside'] * 1e3:.0f} ms "
                  f"(×{row['lat_ratio']:.2f}), calm errors {row['calm_errors']}, flood {row['flood']}, "
                  f"loadavg {row['load']}", flush=True)
        for key in ("lat_ratio", "ttft_ratio"):
            values = sorted(r[key] for r in rows)
            print(f"{key}: median {statistics.median(values):.2f}, spread {values[0]:.2f}..{values[-1]:.2f} "
                  f"over {len(values)} repeats (target for latency: <= 3)")
    finally:
        serve.shutdown()
        release_pool(settings)
        ray.shutdown()


if __name__ == "__main__":
    main()
