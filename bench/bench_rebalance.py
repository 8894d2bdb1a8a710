"""Elastic experts, measured: a skewed router before and after `rebalance`, and placement changes
made while streams run, in one run.

A `small` checkpoint (bfloat16) whose routers prefer experts 0 and 1 (`init-model --router-skew`)
is served with `--expert-actors 4 --expert-slots 3` (one spare slot per actor for copies of hot
experts). Printed side by side:

  before / after   served tokens/s (best of --repeats) with --streams greedy streams, the predicted max/mean actor
                   load of the placement for the measured load, and the measured one (pairs each
                   actor computed in the window, max/mean); and how long the rebalance took while
                   the same streams ran (target: under 5 s, 0 failed streams, identical tokens);
  scale            `experts scale` 4 → 5 → 4 under the same load: seconds each, failed streams,
                   streams whose tokens differ from the unchanged run.

On this 2-core machine the four actors share the cores, so the slowest actor matters less than on
machines with a core (or GPU) per actor: the tokens/s gain is what the hardware allows here, the
load figures are what a rebalance changes everywhere.

    python -m bench.bench_rebalance [--streams 32] [--new-tokens 64] [--skew 6]
"""

from __future__ import annotations

import argparse
import asyncio
import random
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
            try:
                tokens = []
                async for chunk in client.stream(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=n,
                                                                    ignore_eos=True), retries=0):
                    tokens += chunk.token_ids
                return tokens
            except Exception as e:  # noqa: BLE001 — a failed stream is counted, not raised
                return e

        return await asyncio.gather(*(one(p) for p in prompts))


def load_window(target: str, prompts, n, during=None):
    """Run the streams (and `during()` on a thread meanwhile): (tokens/s, outputs, during's result)."""
    box = {}
    thread = None
    if during is not None:
        thread = threading.Thread(target=lambda: box.setdefault("r", during()))
        thread.start()
    t0 = time.perf_counter()
    outputs = asyncio.run(_streams(target, prompts, n))
    wall = time.perf_counter() - t0
    if thread is not None:
        thread.join()
    good = [o for o in outputs if isinstance(o, list)]
    return sum(len(o) for o in good) / wall, outputs, box.get("r")


def actor_pairs(client) -> dict[int, int]:
    return {a.id: a.pairs for a in client.placement(timeout=30).actors}


def measured_imbalance(before: dict[int, int], after: dict[int, int]) -> float:
    done = [after[i] - before.get(i, 0) for i in after]
    return max(done) * len(done) / sum(done) if sum(done) else 0.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skew", type=float, default=6.0, help="router skew of experts 0 and 1 (init-model --router-skew)")
    ap.add_argument("--expert-actors", type=int, default=4)
    ap.add_argument("--actor-cpus", type=float, default=0.5, help="CPU share (and torch threads) per expert actor")
    ap.add_argument("--repeats", type=int, default=3, help="tokens/s is the best of this many runs")
    ap.add_argument("--slots", type=int, default=3, help="--expert-slots: experts an actor may hold per layer "
                                                         "(2 = its share: rebalancing can only swap experts)")
    args = ap.parse_args(argv)

    import ray
    import torch
    from ray import serve

    from raymoe.cluster.client import Client
    from raymoe.cluster.deploy import deploy, release_pool
    from raymoe.cluster.settings import ServeSettings
    from raymoe.model.presets import init_checkpoint

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    ckpt = init_checkpoint("small", Path(tmp.name) / "skewed", seed=0, dtype=torch.bfloat16, router_skew=args.skew)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 1000) for _ in range(rng.randrange(8, 24))] for _ in range(args.streams)]
    bench_environment()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=8)
    settings = ServeSettings(checkpoint=str(ckpt), expert_actors=args.expert_actors, expert_slots=args.slots,
                             expert_num_cpus=args.actor_cpus, grpc_port=free_port(), http_port=free_port(), max_running=64,
                             kv_cache_tokens=16384)
    target = f"127.0.0.1:{settings.grpc_port}"
    try:
        deploy(settings)
        with Client(target) as client:
            client.wait_ready(300)
            load_window(target, prompts[:4], 8)  # warm-up
            rows = []
            for label in ("before", "after"):
                pairs0 = actor_pairs(client)
                runs = [load_window(target, prompts, args.new_tokens) for _ in range(args.repeats)]
                tps, outputs, _ = max(runs, key=lambda r: r[0])
                measured = measured_imbalance(pairs0, actor_pairs(client))
                predicted = client.placement(timeout=30).imbalance
                rows.append((label, tps, predicted, measured, outputs))
                if label == "before":
                    want = outputs
                    t0 = time.monotonic()
                    _, during, change = load_window(target, prompts, args.new_tokens,
                                                    lambda: client.rebalance_experts(timeout=300))
                    rebalance_s = time.monotonic() - t0
            print(f"\nskewed router (experts 0-1 ×{args.skew:g}), {args.expert_actors} expert actors with {args.slots} slots, "
                  f"{args.streams} streams × {args.new_tokens} tokens, bfloat16")
            print(f"{'':8} {'tok/s':>8} {'predicted max/mean':>19} {'measured max/mean':>18} {'same tokens':>12}")
            for label, tps, predicted, measured, outputs in rows:
                same = sum(o == w for o, w in zip(outputs, want))
                print(f"{label:8} {tps:8.1f} {predicted:19.2f} {measured:18.2f} {same:>6}/{len(want)}")
            print(f"after/before tokens/s: {rows[1][1] / rows[0][1]:.2f}×; load max/mean "
                  f"{rows[0][3]:.2f} → {rows[1][3]:.2f} (measured)")
            failed = sum(not isinstance(o, list) for o in during)
            same = sum(o == w for o, w in zip(during, want))
            print(f"rebalance v{change.from_version}→v{change.version} under load: {change.seconds:.2f} s "
                  f"({change.moves} copies loaded, {change.retired} dropped; predicted {change.imbalance_before:.2f} → "
                  f"{change.imbalance_after:.2f}); streams failed {failed}, identical {same}/{len(want)}; "
                  f"window {rebalance_s:.1f} s")
            for n in (args.expert_actors + 1, args.expert_actors):
                want_now = load_window(target, prompts, args.new_tokens)[1]
                _, during, change = load_window(target, prompts, args.new_tokens,
                                                lambda: client.scale_experts(n, timeout=300))
                failed = sum(not isinstance(o, list) for o in during)
                same = sum(o == w for o, w in zip(during, want_now))
                print(f"scale to {n} actors under load: {change.seconds:.2f} s ({change.moves} copies loaded, "
                      f"started {list(change.started)}, stopped {list(change.stopped)}); streams failed {failed}, "
                      f"identical {same}/{len(want_now)}")
    finally:
        serve.shutdown()
        release_pool(settings)
        ray.shutdown()
        tmp.cleanup()


if __name__ == "__main__":
    main()
