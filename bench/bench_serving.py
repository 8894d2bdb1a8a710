"""Serving benchmark: gRPC streams through Ray Serve vs the in-process engine vs transformers.

One run, side by side, on the `small` preset: for each concurrency (default 1, 8, 32) the same
prompts go (a) as concurrent GenerateStream calls to `raymoe serve` with experts on N actors,
(b) as one batch to the in-process engine, (c) as one static batch to transformers' generate.
Prints output tokens/s, time to first token and inter-token latency (p50/p99) for the server,
the ratios served/in-process and served/transformers, and saves a PNG plot.

    python bench/bench_serving.py [--checkpoint DIR] [--expert-actors 4] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_streams(target: str, prompts: list[list[int]], new_tokens: int) -> dict:
    from cluster.client import Client
    from protos import generator_pb2 as pb

    def one(ids):
        with Client(target) as c:
            t0 = time.perf_counter()
            stamps = []  # one per token: a chunk may carry several when the client lags behind
            for chunk in c.stream(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=new_tokens, ignore_eos=True)):
                stamps += [time.perf_counter()] * len(chunk.token_ids)
        return t0, stamps

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t
    ttft = [s[0] - t0 for t0, s in results]
    itl = [b - a for _, s in results for a, b in zip(s, s[1:])]
    return {"tok_s": sum(len(s) for _, s in results) / wall, "ttft": ttft, "itl": itl}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--expert-actors", type=int, default=4)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--plot", default="bench/out/serving.png")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from ray import serve
    from transformers import MixtralForCausalLM

    from cluster.remote_session import ray_connection
    from cluster.serve_cmd import deploy
    from cluster.settings import ServeSettings
    from model.engine import Engine
    from model.presets import init_checkpoint
    from model.sampling import SamplingParams
    from model.weights import load_model

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or str(init_checkpoint("small", Path(tmp.name) / "small"))
    levels = [int(c) for c in args.concurrency.split(",")]
    rng = random.Random(0)
    local = load_model(ckpt)
    vocab = local.cfg.vocab_size
    prompts = {c: [[1] + [rng.randrange(3, vocab) for _ in range(args.prompt_len - 1)] for _ in range(c)]
               for c in levels}
    n = args.new_tokens

    inproc = {}
    for c in levels:
        engine = Engine(local, kv_cache_tokens=c * (args.prompt_len + n + 16), max_running=c)
        engine.generate(prompts[c][:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        t = time.perf_counter()
        engine.generate(prompts[c], SamplingParams(max_tokens=n, ignore_eos=True))
        inproc[c] = c * n / (time.perf_counter() - t)
    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf_tps = {}
    for c in levels:
        with torch.inference_mode():
            hf.generate(torch.tensor(prompts[c][:1]), max_new_tokens=4, do_sample=False, pad_token_id=0)
            t = time.perf_counter()
            hf.generate(torch.tensor(prompts[c]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            hf_tps[c] = c * n / (time.perf_counter() - t)
    del hf, local

    settings = ServeSettings(checkpoint=ckpt, expert_actors=args.expert_actors, grpc_port=free_port(),
                             max_running=max(levels), replica_num_cpus=1.0)
    served = {}
    with ray_connection(None, settings.local_ray_cpus()):
        deploy(settings, http_port=free_port())
        target = f"127.0.0.1:{settings.grpc_port}"
        from cluster.client import Client

        with Client(target) as c:
            c.wait_ready(300)
        run_streams(target, prompts[levels[0]][:1], 4)  # warm-up
        for c in levels:
            served[c] = run_streams(target, prompts[c], n)
        serve.shutdown()

    print(f"small preset, {args.expert_actors} expert actors, {n} new tokens, prompt {args.prompt_len} tokens")
    print(f"{'conc':>4} {'served tok/s':>12} {'in-proc':>8} {'hf':>7} {'srv/inproc':>10} {'srv/hf':>7} "
          f"{'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8}")
    for c in levels:
        s = served[c]
        print(f"{c:>4} {s['tok_s']:>12.1f} {inproc[c]:>8.1f} {hf_tps[c]:>7.1f} {s['tok_s'] / inproc[c]:>9.2f}x "
              f"{s['tok_s'] / hf_tps[c]:>6.2f}x {1e3 * statistics.median(s['ttft']):>7.0f}ms "
              f"{1e3 * pct(s['ttft'], 0.99):>7.0f}ms {1e3 * statistics.median(s['itl']):>6.0f}ms "
              f"{1e3 * pct(s['itl'], 0.99):>6.0f}ms")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, series in (("served (gRPC, remote experts)", {c: served[c]["tok_s"] for c in levels}),
                              ("in-process engine", inproc), ("transformers generate", hf_tps)):
            ax.plot(levels, [series[c] for c in levels], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"raymoe small preset, {args.expert_actors} expert actors")
        ax.legend()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=100, bbox_inches="tight")
        print(f"plot: {args.plot}")
    except ImportError:
        print("matplotlib not installed: no plot")
    tmp.cleanup()


if __name__ == "__main__":
    main()
