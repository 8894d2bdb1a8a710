"""What losing an expert actor costs the streams in flight: failover to a copy against a restart.

Two servers in one run, each with 4 expert actors of the `small` preset (bfloat16) and 16 greedy
streams: one with `--expert-replicas 2` (every expert has a copy on another actor: a dead actor's
pairs go to the copies at once), one without copies (the streams wait for Ray to restart the actor
and for it to reload its experts). In each, one expert actor is SIGKILLed while the streams run;
printed: the longest pause a stream saw (its largest gap between two messages) against the same
streams without the kill, the streams that failed, and those whose tokens differ.

    python -m bench.bench_failover [--streams 16] [--new-tokens 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path


from bench.machine import bench_environment, free_port


async def _streams(target: str, prompts, n):
    from raymoe.cluster.client import AsyncClient
    from raymoe.protos import generator_pb2 as pb

    async with AsyncClient(target) as client:
        async def one(ids):
            arrivals, tokens = [time.perf_counter()], []
            try:
                async for chunk in client.stream(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=n,
                                                                    ignore_eos=True), retries=0):
                    arrivals.append(time.perf_counter())
                    tokens += chunk.token_ids
            except Exception as e:  # noqa: BLE001
                return e, 0.0
            return tokens, max(b - a for a, b in zip(arrivals[1:], arrivals[2:])) if len(arrivals) > 2 else 0.0

        return await asyncio.gather(*(one(p) for p in prompts))


def expert_actor_pids() -> list[int]:
    from ray._private.state import actors

    return [a["Pid"] for a in actors().values() if a["ActorClassName"] == "ExpertActor" and a["State"] == "ALIVE"]


def measure(replicas: int, ckpt: Path, prompts, n) -> tuple[float, float, int, int]:
    """(longest pause without a kill, with one, failed streams, differing streams)."""
    from ray import serve

    from raymoe.cluster.client import Client
    from raymoe.cluster.deploy import deploy, release_pool
    from raymoe.cluster.settings import ServeSettings

    settings = ServeSettings(checkpoint=str(ckpt), expert_actors=4, expert_replicas=replicas, expert_num_cpus=0.25,
                             grpc_port=free_port(), http_port=free_port(), stream_interval_ms=0, max_running=32)
    target = f"127.0.0.1:{settings.grpc_port}"
    try:
        deploy(settings)
        with Client(target) as c:
            c.wait_ready(300)
        asyncio.run(_streams(target, prompts[:2], 4))  # warm-up
        calm = asyncio.run(_streams(target, prompts, n))
        victim = sorted(expert_actor_pids())[1]
        timer = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
        timer.start()
        hit = asyncio.run(_streams(target, prompts, n))
        timer.join()
        failed = sum(not isinstance(t, list) for t, _ in hit)
        differ = sum(isinstance(t, list) and t != w for (t, _), (w, _) in zip(hit, calm))
        return max(g for _, g in calm), max(g for _, g in hit), failed, differ
    finally:
        serve.shutdown()
        release_pool(settings)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    args = ap.parse_args(argv)

    import ray
    import torch

    from raymoe.model.presets import init_checkpoint

    tmp = tempfile.TemporaryDirectory()
    ckpt = init_checkpoint("small", Path(tmp.name) / "small", seed=0, dtype=torch.bfloat16)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 1000) for _ in range(rng.randrange(8, 24))] for _ in range(args.streams)]
    bench_environment()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=8)
    try:
        rows = [(label, *measure(r, ckpt, prompts, args.new_tokens)) for label, r in
                (("2 copies (failover)", 2), ("1 copy (restart)", 1))]
    finally:
        ray.shutdown()
        tmp.cleanup()
    print(f"\nSIGKILL of one of 4 expert actors during {args.streams} streams × {args.new_tokens} tokens (small, bf16)")
    print(f"{'':22} {'longest pause, calm':>20} {'with the kill':>14} {'added':>7} {'failed':>7} {'differ':>7}")
    for label, calm, hit, failed, differ in rows:
        print(f"{label:22} {calm:19.3f}s {hit:13.3f}s {hit - calm:6.2f}s {failed:>7} {differ:>7}")


if __name__ == "__main__":
    main()
