"""Prefix caching and cache-aware routing, served: cache on and off, 1 and 2 front replicas, one run.

Every configuration is a real `raymoe serve` (gRPC through Serve's proxy, N expert actors, the
`small` preset in bfloat16 unless --checkpoint) running, in this order:

  probe  TTFT of a request sharing its first --warm-len tokens with one the server has just
         answered, against a cold request of the same length (--probes pairs, median ratio)
  a      --users concurrent users, one --system-len-token system prompt shared by all, each with its
         own --question-len-token question (a first request warms the system prompt, as in service)
  b      --conversations concurrent chats × --turns turns: each turn resends the history plus a new
         --message-len-token user message and generates --new-tokens tokens

Columns: output tokens/s, TTFT p50/p99, prompt tokens computed / sent (sent − the usage's cached
tokens), hit rate (cached / sent), expert-actor pairs per generated token (the (token, expert) pairs
every expert actor computed, from ModelInfo: a cached token never reaches the actors). Ratios
against the same replicas without the cache follow; a PNG goes to --plot. Load average is printed
with each configuration (others share this machine).

    python -m bench.bench_prefix [--replicas 1,2] [--cache on,off] [--scenarios probe,a,b] [--users 32] ...
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.machine import bench_environment, free_port, pct


STREAM_TIMEOUT_S = 900.0


@dataclasses.dataclass
class Run:
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = dataclasses.field(default_factory=list)
    sent: int = 0
    cached: int = 0
    pairs: int = 0  # expert-actor (token, expert) pairs during the run

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


async def _one(client, ids: list[int], n: int, run: Run) -> list[int]:
    from raymoe.protos import generator_pb2 as pb

    t0, out, first, cached = time.perf_counter(), [], None, 0
    request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=n, ignore_eos=True)
    async for chunk in client.stream(request, timeout=STREAM_TIMEOUT_S):  # a stalled stream fails the run, never hangs it
        first = first or time.perf_counter()
        out += chunk.token_ids
        cached = max(cached, chunk.usage.cached_prompt_tokens)
    run.ttft.append(first - t0)
    run.tokens += len(out)
    run.sent += len(ids)
    run.cached += cached
    return out


def _actor_pairs(target: str) -> int:
    from raymoe.cluster.client import Client

    with Client(target) as c:
        return sum(a.tokens_processed for a in c.model_info(timeout=60).expert_actors)


async def _timed(target: str, body) -> Run:
    from raymoe.cluster.client import AsyncClient

    run = Run()
    before = await asyncio.to_thread(_actor_pairs, target)
    async with AsyncClient(target) as client:
        t0 = time.perf_counter()
        await body(client, run)
        run.wall = time.perf_counter() - t0
    run.pairs = await asyncio.to_thread(_actor_pairs, target) - before
    return run


def scenario_a(target: str, args, rng: random.Random, vocab: int) -> Run:
    system = [1] + [rng.randrange(3, vocab) for _ in range(args.system_len - 1)]
    questions = [[rng.randrange(3, vocab) for _ in range(args.question_len)] for _ in range(args.users)]

    async def body(client, run):
        await _one(client, system + questions[0], 1, Run())  # the system prompt seen once (not timed)
        await asyncio.gather(*(_one(client, system + q, args.new_tokens, run) for q in questions))

    return asyncio.run(_timed(target, body))


def scenario_b(target: str, args, rng: random.Random, vocab: int) -> Run:
    chats = [[1] + [rng.randrange(3, vocab) for _ in range(args.message_len - 1)] for _ in range(args.conversations)]
    messages = [[[rng.randrange(3, vocab) for _ in range(args.message_len)] for _ in range(args.turns)]
                for _ in range(args.conversations)]

    async def chat(client, c: int, run: Run) -> None:
        history = chats[c]
        for turn in range(args.turns):
            prompt = history + (messages[c][turn] if turn else [])
            history = prompt + await _one(client, prompt, args.new_tokens, run)

    async def body(client, run):
        await asyncio.gather(*(chat(client, c, run) for c in range(args.conversations)))

    return asyncio.run(_timed(target, body))


def probe(target: str, args, rng: random.Random, vocab: int) -> tuple[list[float], list[float]]:
    """(cold TTFTs, warm TTFTs): each pair is a fresh prompt answered once (cold), then a request
    sharing its first --warm-len tokens with a new tail of --question-len tokens (warm)."""
    from raymoe.cluster.client import AsyncClient

    async def pairs():
        cold, warm = [], []
        async with AsyncClient(target) as client:
            for _ in range(args.probes):
                shared = [1] + [rng.randrange(3, vocab) for _ in range(args.warm_len - 1)]
                tail = lambda: [rng.randrange(3, vocab) for _ in range(args.question_len)]  # noqa: E731
                r = Run()
                await _one(client, shared + tail(), 1, r)
                await asyncio.sleep(args.settle_s)  # the holder's report reaches the routers
                await _one(client, shared + tail(), 1, r)
                cold.append(r.ttft[0])
                warm.append(r.ttft[1])
        return cold, warm

    return asyncio.run(pairs())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the `small` preset, written in bfloat16 to a temp dir")
    ap.add_argument("--expert-actors", type=int, default=4)
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--cache", default="on,off")
    ap.add_argument("--scenarios", default="probe,a,b")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--message-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warm-len", type=int, default=1536)
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--settle-s", type=float, default=2.5, help="pause between a probe's cold and warm request")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--actor-cpus", type=float, default=0.5)
    ap.add_argument("--plot", default="bench/out/prefix.png")
    args = ap.parse_args(argv)
    bench_environment()

    import torch

    from raymoe.cli.ray_session import ray_connection
    from raymoe.cluster.settings import ServeSettings
    from raymoe.model.presets import init_checkpoint
    from raymoe.model.weights import Checkpoint

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or str(init_checkpoint("small", Path(tmp.name) / "small", dtype=torch.bfloat16))
    cfg = Checkpoint(ckpt).config
    scenarios = args.scenarios.split(",")
    kv_tokens = max(32768, args.users * (args.system_len + args.question_len + args.new_tokens))
    results: dict[tuple[int, str], dict] = {}
    print(f"{ckpt}: {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts; {args.expert_actors} expert "
          f"actors; {os.cpu_count()} CPUs", flush=True)
    for replicas in [int(r) for r in args.replicas.split(",")]:
        for cache in args.cache.split(","):
            settings = ServeSettings(checkpoint=ckpt, expert_actors=args.expert_actors, replicas=replicas,
                                     replica_num_cpus=args.replica_cpus, expert_num_cpus=args.actor_cpus,
                                     max_running=max(args.users, args.conversations), kv_cache_tokens=kv_tokens,
                                     prefix_cache=cache == "on", grpc_port=free_port(), http_port=free_port())
            print(f"\n{replicas} replica(s), cache {cache}; load {open('/proc/loadavg').read().split()[:3]}",
                  flush=True)
            with ray_connection(None, settings.local_ray_cpus()):
                results[(replicas, cache)] = serve_and_measure(settings, scenarios, args, cfg.vocab_size)
    report(results, args)
    tmp.cleanup()


def serve_and_measure(settings, scenarios: list[str], args, vocab: int) -> dict:
    from ray import serve

    from raymoe.cluster.client import Client
    from raymoe.cluster.deploy import deploy, release_pool

    out: dict = {}
    try:
        deploy(settings)
        target = f"127.0.0.1:{settings.grpc_port}"
        with Client(target) as c:
            c.wait_ready(600)
        rng = random.Random(0)  # the same prompts for every configuration
        asyncio.run(_timed(target, lambda client, run: _one(client, [1, 2, 3], 2, run)))  # warm-up
        if "probe" in scenarios:
            out["probe"] = probe(target, args, rng, vocab)
            cold, warm = out["probe"]
            print(f"  probe: cold TTFT {statistics.median(cold):.3f} s, warm {statistics.median(warm):.3f} s", flush=True)
        for name, fn in (("a", scenario_a), ("b", scenario_b)):
            if name in scenarios:
                out[name] = r = fn(target, args, rng, vocab)
                print(f"  {name}: {r.tok_s:.1f} tok/s, TTFT p50 {pct(r.ttft, 0.5):.3f} s, hit rate "
                      f"{r.cached / max(1, r.sent):.0%}", flush=True)
    finally:
        serve.shutdown()
        release_pool(settings)
    return out


def report(results: dict, args) -> None:
    print(f"\n{'replicas':>8} {'cache':>5} {'scenario':>8} {'tok/s':>8} {'ttft p50':>9} {'p99':>7} "
          f"{'computed/sent':>15} {'hit rate':>8} {'pairs/tok':>9} {'tok/s ×':>8} {'ttft ×':>7}")
    for (replicas, cache), out in results.items():
        off = results.get((replicas, "off"), {})
        for name in ("a", "b"):
            if name not in out:
                continue
            r = out[name]
            base = off.get(name)
            speed = f"{r.tok_s / base.tok_s:.2f}" if base and cache == "on" else "-"
            ttft = f"{pct(r.ttft, 0.5) / pct(base.ttft, 0.5):.2f}" if base and cache == "on" else "-"
            print(f"{replicas:>8} {cache:>5} {name:>8} {r.tok_s:>8.1f} {pct(r.ttft, 0.5):>9.3f} {pct(r.ttft, 0.99):>7.3f} "
                  f"{r.sent - r.cached:>7}/{r.sent:<7} {r.cached / max(1, r.sent):>8.0%} "
                  f"{r.pairs / max(1, r.tokens):>9.1f} {speed:>8} {ttft:>7}")
        if "probe" in out:
            cold, warm = out["probe"]
            ratios = [w / c for c, w in zip(cold, warm)]
            print(f"{replicas:>8} {cache:>5} {'probe':>8} warm/cold TTFT median {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f}; cold {statistics.median(cold):.3f} s, "
                  f"{args.warm_len} shared tokens)")
    plot(results, args)


def plot(results: dict, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r} rep, {c}" for r, c in results]
    for ax, name in zip(axes, ("a", "b")):
        runs = [out.get(name) for out in results.values()]
        if not any(runs):
            continue
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [r.tok_s if r else 0 for r in runs], 0.4, label="tok/s")
        twin = ax.twinx()
        twin.bar([x + 0.2 for x in xs], [pct(r.ttft, 0.5) if r else 0 for r in runs], 0.4, color="tab:orange",
                 label="TTFT p50 (s)")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("output tokens / s")
        twin.set_ylabel("TTFT p50 (s)")
        ax.set_title({"a": f"(a) shared {args.system_len}-token system prompt, {args.users} users",
                      "b": f"(b) {args.conversations} chats × {args.turns} turns"}[name], fontsize=9)
    fig.suptitle(f"raymoe prefix cache, {args.expert_actors} expert actors")
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100, bbox_inches="tight")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
