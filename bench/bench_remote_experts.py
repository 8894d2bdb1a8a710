"""Decode speed with the experts on Ray actors vs in-process (issue: expert actors).

One run on one host: the `small` preset (fresh in a temp dir unless --checkpoint), greedy, EOS
ignored, float32. For each batch size it times decode steps (after the prefill and a warm-up) with
local experts and with remote experts on 2 and 4 actors, and prints tokens/s, the ratio
remote/local, the median per-layer times (front-side dispatch + combine; round trip from dispatch
to combined output; the actors' own compute), and the bytes sent + received per decode step.

    python bench/bench_remote_experts.py [--checkpoint DIR] [--batches 1,8,32] [--actors 2,4] [--steps 24]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch


def decode_rate(model, batch: int, steps: int, prompt_len: int, warmup: int = 3, hook=None) -> float:
    """Tokens/s over `steps` decode steps of `batch` sequences (prefill and warm-up not timed)."""
    from model.engine import Engine
    from model.sampling import SamplingParams

    rng = random.Random(batch)
    engine = Engine(model, kv_cache_tokens=batch * (prompt_len + steps + warmup + 8), max_running=batch)
    params = SamplingParams(max_tokens=steps + warmup + 2, ignore_eos=True)
    for i in range(batch):
        engine.add(i, [1] + [rng.randrange(3, model.cfg.vocab_size) for _ in range(prompt_len - 1)], params)
    for _ in range(1 + warmup):  # prefill, then warm-up decode steps
        engine.step()
    if hook:
        hook()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return batch * steps / (time.perf_counter() - t0)


def time_local_experts(model, sink: list[float]) -> None:
    """Record each LocalExperts call's time in µs (the in-process reference's per-layer cost)."""
    start: list[float] = []
    for layer in model.layers:
        layer.moe.experts.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
        layer.moe.experts.register_forward_hook(lambda *_: sink.append((time.perf_counter() - start.pop()) * 1e6))


def call_cost_us(actor, n: int = 50) -> float:
    """Median round trip of an empty actor call: Ray's fixed cost per (layer, actor) dispatch."""
    import ray

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ray.get(actor.ping.remote(), timeout=30)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="default: a fresh `small` preset in a temp dir")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--actors", default="2,4")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    ap.add_argument("--local-threads", default=f"1,{os.cpu_count()}",
                    help="torch thread counts tried for the local baseline; the fastest is the baseline")
    ap.add_argument("--driver-threads", type=int, default=1, help="torch threads of the driver with remote experts")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from actors.pool import ExpertPool, PoolConfig
    from actors.remote_experts import remote_experts_factory
    from model.presets import init_checkpoint
    from model.weights import load_model

    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = tempfile.TemporaryDirectory()
        ckpt = str(init_checkpoint("small", tmp.name))
    batches = [int(b) for b in args.batches.split(",")]
    actor_counts = [int(a) for a in args.actors.split(",")]

    local = load_model(ckpt)
    cfg = local.cfg
    print(f"small preset: {cfg.num_parameters() / 1e6:.1f}M params, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, D={cfg.hidden_size}, "
          f"F={cfg.intermediate_size}; cores={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    local_us: list[float] = []
    time_local_experts(local, local_us)
    rows: dict[tuple[str, int], dict] = {}
    for b in batches:  # the baseline is the best thread count: OpenMP threads stall on a busy host
        best = None
        for threads in [int(t) for t in args.local_threads.split(",")]:
            torch.set_num_threads(threads)
            rate = decode_rate(local, b, args.steps, args.prompt_len, hook=local_us.clear)
            if best is None or rate > best["tok_s"]:
                best = {"tok_s": rate, "layer_us": statistics.median(local_us), "threads": threads}
        rows[("local", b)] = best
    torch.set_num_threads(args.driver_threads)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        for a in actor_counts:
            with ExpertPool(ckpt, PoolConfig(num_actors=a)) as pool:
                model = load_model(ckpt, experts_factory=remote_experts_factory(pool))
                threads = pool.stats()[0]["threads"]
                ping_us = call_cost_us(pool.actors[0])
                for b in batches:
                    busy0 = sum(s["busy_s"] for s in pool.stats())
                    rate = decode_rate(model, b, args.steps, args.prompt_len, hook=pool.metrics.reset)
                    m = pool.metrics
                    busy = sum(s["busy_s"] for s in pool.stats()) - busy0
                    n_layers = m.layer_calls
                    rows[(f"remote({a})", b)] = {
                        "tok_s": rate,
                        "front_us": statistics.median(d + c for d, c in zip(m.dispatch_us, m.combine_us)),
                        "layer_us": statistics.median(d + w + c for d, w, c in
                                                      zip(m.dispatch_us, m.wait_us, m.combine_us)),
                        "actor_us": busy * 1e6 / max(1, m.calls),
                        "bytes": (m.bytes_sent + m.bytes_received) / args.steps,
                        "calls": m.calls / max(1, n_layers), "threads": threads,
                        "cpus": pool.bundle["CPU"], "ping_us": ping_us}
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    print(f"\n{args.steps} decode steps per cell; layer_us = median per-layer experts time "
          f"(remote: dispatch → combined; front = dispatch + combine work on the driver; "
          f"actor = mean compute per actor call)\n")
    head = f"{'experts':<10} {'batch':>5} {'tok/s':>9} {'ratio':>6} {'layer_us':>9} {'front_us':>9} " \
           f"{'actor_us':>9} {'calls/lyr':>9} {'bytes/step':>11}"
    print(head)
    print("-" * len(head))
    for (name, b), r in rows.items():
        ratio = r["tok_s"] / rows[("local", b)]["tok_s"]
        extra = (f"{r['front_us']:>9.0f} {r['actor_us']:>9.0f} {r['calls']:>9.1f} {r['bytes']:>11.0f}"
                 if "front_us" in r else f"{'':>9} {'':>9} {'':>9} {'':>11}")
        note = f"  ({r['threads']} thread(s))" if name == "local" else ""
        print(f"{name:<10} {b:>5} {r['tok_s']:>9.1f} {ratio:>6.2f} {r['layer_us']:>9.0f} {extra}{note}")
    print(f"\ndriver threads with remote experts: {args.driver_threads}")
    for a in actor_counts:
        r = rows.get((f"remote({a})", batches[-1]))
        if r:
            print(f"remote({a}) actors: {r['cpus']:g} CPU, {r['threads']} torch thread(s) each; "
                  f"an empty actor call round trip takes {r['ping_us']:.0f} µs (median)")
    big = batches[-1]
    for a in actor_counts:
        ratio = rows[(f"remote({a})", big)]["tok_s"] / rows[("local", big)]["tok_s"]
        print(f"batch {big}: remote({a})/local = {ratio:.2f} (target ≥ 0.70)")


if __name__ == "__main__":
    main()
