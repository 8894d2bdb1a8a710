"""Scaling the expert actors under load (issue 20, item 5): a server with --start actors, --clients
threads each looping a --new-tokens greedy request, and `scale` to each of --steps in turn (the
Experts service's ScaleExperts, as `raymoe experts scale` sends it). Prints each change's time
(target for 2 → 4 under 24 clients: ≤ 10 s) and what the clients got: answers equal to the first
answer, other answers (bfloat16 rounds differently in other batch compositions), and errors by status
(target: none).

    python -m bench.bench_scale [--start 2] [--steps 4,2,4] [--clients 24] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import collections
import threading
import time

from bench.machine import bench_environment, free_port
from bench.server import checkpoint_or_small, served


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the `small` preset, written in bfloat16 to a temp dir")
    ap.add_argument("--start", type=int, default=2)
    ap.add_argument("--steps", default="4,2,4")
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--settle-s", type=float, default=5.0, help="load before the first change and between changes")
    args = ap.parse_args(argv)
    bench_environment()

    import grpc

    from raymoe.cluster.client import Client
    from raymoe.cluster.settings import ServeSettings
    from raymoe.protos import generator_pb2 as pb

    request = pb.GenerateRequest(prompt_token_ids=[1, 5, 6, 7], max_tokens=args.new_tokens)
    with checkpoint_or_small(args.checkpoint) as ckpt:
        s = ServeSettings(checkpoint=ckpt, expert_actors=args.start, grpc_port=free_port(), http_port=free_port())
        with served(s) as target, Client(target) as admin:
            first = list(admin.stub.Generate(request, timeout=60).token_ids)
            stop, lock, outcomes = threading.Event(), threading.Lock(), collections.Counter()

            def client() -> None:
                with Client(target) as c:
                    while not stop.is_set():
                        try:
                            got = "same" if list(c.stub.Generate(request, timeout=120).token_ids) == first else "other"
                        except grpc.RpcError as e:
                            got = e.code().name
                        with lock:
                            outcomes[got] += 1

            threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(args.settle_s)
            now = args.start
            for n in (int(x) for x in args.steps.split(",")):
                t0 = time.perf_counter()
                change = admin.scale_experts(n, timeout=300)
                print(f"scale {now} → {n} under {args.clients} clients: {time.perf_counter() - t0:.1f} s "
                      f"(started {list(change.started)}, stopped {list(change.stopped)})", flush=True)
                now = n
                time.sleep(args.settle_s)
            stop.set()
            for t in threads:
                t.join(timeout=150)
            print(f"clients: {dict(outcomes)} (same: the first answer; other: a different answer)")


if __name__ == "__main__":
    main()
