"""The fast-path benchmark: every way of running the model, side by side in one run, as ratios.

For each number of concurrent streams (default 1, 32, 128), the same random prompts, greedy, EOS
ignored, in the checkpoint's dtype (the `small` preset written in bfloat16 unless --checkpoint):

  transformers   MixtralForCausalLM.generate, one static batch
  engine         raymoe's in-process Engine (continuous batching), every expert in this process
  engine+actors  the same Engine with its experts on N Ray actors (direct transport), no Serve; with
                 the torch threads a served replica gets (--replica-cpus), not this process's
  served-local   `raymoe serve`: gRPC streams through Serve's proxy, experts inside the replica
  served-direct  `raymoe serve --expert-actors N` (direct transport, the default)
  served-ray     `raymoe serve --expert-actors N --expert-transport ray` (Ray's object store)
With --direct-ingress, each served path gets a second row, PATH+ingress: the same deployment's
streams straight through the replica's own gRPC port (Serve's direct ingress), not the proxy.

Columns: output tokens/s and its ratio to transformers; time to first token and inter-token
latency (p50/p99, from each stream's arrival times); CPU ms per generated token (machine-wide
busy CPU during the timed window, minus the load generator's own for the served paths, divided by
tokens); and, where experts are remote, per MoE layer call the wall time from dispatch to combined
output against the slowest actor's own compute (the difference is transport and front work).
"same" counts streams whose tokens equal the in-process engine's; "msg/tok" is stream messages per
token (the server's stream interval lets several tokens share one). Each cell is the median of
--repeats runs, with their spread (slowest–fastest tokens/s); CPU counts only the processes this
benchmark runs (itself for the in-process paths, the Ray instance it started for the served ones),
so other users of a shared machine do not count, and /proc/loadavg is printed with every cell.
A PNG plot goes beside it.

    python -m bench.bench_serving [--checkpoint DIR] [--expert-actors 4] [--streams 1,32,128]
                                  [--paths transformers,engine,...] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/bench_serving.py` (the issue's command): bench.* from the root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import CpuWindow, bench_environment, free_port, loadavg, pct, process_cpu, top_processes

BY_PROCESS = False  # --by-process: print which processes used the CPU of each served run
STEP_TOKENS = 512  # tokens per engine step in the in-process paths: what `raymoe serve` uses on the device
PATHS = ("transformers", "engine", "engine+actors", "served-local", "served-direct", "served-ray")


@dataclasses.dataclass
class Result:
    tokens: int
    wall: float
    cpu: float  # seconds of CPU attributed to serving
    ttft: list[float] = dataclasses.field(default_factory=list)
    itl: list[float] = dataclasses.field(default_factory=list)
    outputs: list[list[int]] = dataclasses.field(default_factory=list)
    messages: int = 0  # stream messages (served paths): several tokens may share one
    layer_ms: float | None = None  # per layer call: dispatch → combined
    compute_ms: float | None = None  # per layer call: slowest actor's compute
    repeats: list["Result"] = dataclasses.field(default_factory=list)  # every run of the cell (median's)
    load: str = ""  # /proc/loadavg when the cell ended

    @property
    def cpu_ms_per_token(self) -> float:
        """Median over the cell's runs (this run's own without repeats)."""
        runs = self.repeats or [self]
        return statistics.median(1e3 * r.cpu / r.tokens for r in runs)

    @property
    def spread(self) -> tuple[float, float]:
        """Slowest and fastest tokens/s of the cell's runs."""
        rates = [r.tok_s for r in self.repeats or [self]]
        return min(rates), max(rates)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall


# --- the in-process paths --------------------------------------------------------------------

def run_transformers(hf, prompts, n) -> Result:
    with torch.inference_mode(), CpuWindow() as cpu:
        out = hf.generate(torch.tensor(prompts, device=hf.device), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return Result(len(prompts) * n, cpu.wall, cpu.own + cpu.tree, outputs=out[:, len(prompts[0]):].tolist())


def run_engine(model, prompts, n, pool=None, micro_batches: int = 1) -> Result:
    from raymoe.model.engine import Engine
    from raymoe.model.sampling import SamplingParams

    engine = Engine(model, kv_cache_tokens=len(prompts) * (len(prompts[0]) + n + 16), max_running=len(prompts),
                    max_batch_tokens=STEP_TOKENS, micro_batches=micro_batches)
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    before = _calls(pool)
    with CpuWindow() as cpu:
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add(i, p, params)
        stamps: dict[int, list[tuple[float, int]]] = {i: [] for i in range(len(prompts))}
        outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        while engine.has_work():
            for ev in engine.step():
                stamps[ev.seq_id].append((time.perf_counter(), 1))
                outputs[ev.seq_id].append(ev.token_id)
    r = Result(sum(map(len, outputs.values())), cpu.wall, cpu.own + cpu.tree,
               outputs=[outputs[i] for i in range(len(prompts))])
    _latencies(r, [(t0, stamps[i]) for i in range(len(prompts))])
    _layer_times(r, before, _calls(pool))
    return r


def _calls(pool) -> tuple[int, float, float] | None:
    if pool is None:
        return None
    m = pool.metrics
    return m.layer_calls, m.layer_wall_s, m.slowest_compute_s


def _layer_times(r: Result, before, after) -> None:
    if before is not None and after[0] > before[0]:
        calls = after[0] - before[0]
        r.layer_ms = 1e3 * (after[1] - before[1]) / calls
        r.compute_ms = 1e3 * (after[2] - before[2]) / calls


def _latencies(r: Result, streams: list[tuple[float, list[tuple[float, int]]]]) -> None:
    """streams: (start, [(arrival, tokens) per message]). A message of k tokens after a gap g gives
    k inter-token samples of g / k: the pace at which tokens reached the client."""
    r.ttft = [c[0][0] - t0 for t0, c in streams if c]
    r.itl = [(b - a) / k for _, c in streams for (a, _), (b, k) in zip(c, c[1:]) for _ in range(k)]


# --- the served paths ------------------------------------------------------------------------

async def _streams(target: str, prompts, n):
    from raymoe.cluster.client import AsyncClient
    from raymoe.protos import generator_pb2 as pb

    async with AsyncClient(target) as client:

        async def one(ids):
            t0, chunks, tokens = time.perf_counter(), [], []
            async for chunk in client.stream(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=n, ignore_eos=True)):
                chunks.append((time.perf_counter(), len(chunk.token_ids)))  # a chunk may carry several
                tokens += chunk.token_ids
            return t0, chunks, tokens

        return await asyncio.gather(*(one(p) for p in prompts))


def model_info(target: str):
    from raymoe.cluster.client import Client
    from raymoe.protos import generator_pb2 as pb

    with Client(target) as c:
        return c.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)


def run_served(target: str, prompts, n) -> Result:
    calls = model_info(target).expert_calls
    before = (calls.layer_calls, calls.wall_seconds, calls.slowest_compute_seconds)
    procs = process_cpu() if BY_PROCESS else None
    with CpuWindow() as cpu:
        results = asyncio.run(_streams(target, prompts, n))
    if procs is not None:
        for used, cmd in top_processes(procs, process_cpu()):
            print(f"      {1e3 * used / max(1, sum(len(t) for _, _, t in results)):6.3f} ms/token  {cmd}")
    r = Result(sum(len(t) for _, _, t in results), cpu.wall, cpu.tree, outputs=[t for _, _, t in results])
    _latencies(r, [(t0, c) for t0, c, _ in results])
    r.messages = sum(len(c) for _, c, _ in results)
    calls = model_info(target).expert_calls
    _layer_times(r, before, (calls.layer_calls, calls.wall_seconds, calls.slowest_compute_seconds))
    return r


# --- the run ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the `small` preset, written in bfloat16 to a temp dir")
    ap.add_argument("--expert-actors", type=int, default=4)
    ap.add_argument("--streams", default="1,32,128")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--stream-interval-ms", type=float, default=None,
                    help="the server's stream interval (default: raymoe serve's)")
    ap.add_argument("--micro-batches", type=int, default=0, help="front micro-batches with actors (0: the default)")
    ap.add_argument("--replica-cpus", type=float, default=None,
                    help="CPUs (and torch threads) of the front replica (default: the machine's cores with local "
                         "experts, as the in-process engine has; 1 with expert actors)")
    ap.add_argument("--actor-cpus", type=float, default=0.5, help="CPU share of each expert actor")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: transformers, the engine and the front replica on GPU 0, expert actors on GPUs")
    ap.add_argument("--replica-gpus", type=float, default=1.0, help="with --device cuda: GPU share of the front")
    ap.add_argument("--expert-gpus", type=float, default=1.0, help="with --device cuda: GPU share of each actor")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median and the spread are reported")
    ap.add_argument("--plot", default="bench/out/serving.png")
    ap.add_argument("--by-process", action="store_true", help="per served run, the processes that used the CPU")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="also measure each served path straight through its replica's own gRPC port (Serve's "
                         "direct ingress, raymoe serve --direct-ingress), as the row PATH+ingress")
    args = ap.parse_args(argv)
    global BY_PROCESS, STEP_TOKENS
    BY_PROCESS = args.by_process
    from raymoe.cluster.settings import ServeSettings

    STEP_TOKENS = ServeSettings().effective_max_batch_tokens(args.device)  # the same steps as the served paths
    bench_environment()
    paths = args.paths.split(",")
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown paths: {', '.join(sorted(unknown))} (choose from {', '.join(PATHS)})")

    from raymoe.model.config import resolve_dtype
    from raymoe.model.presets import init_checkpoint
    from raymoe.model.weights import Checkpoint, load_model

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or str(init_checkpoint("small", Path(tmp.name) / "small", dtype=torch.bfloat16))
    cfg = Checkpoint(ckpt).config
    dtype = resolve_dtype("auto", cfg, args.device)  # float32 where this CPU has no fast bfloat16 (all paths alike)
    levels = [int(c) for c in args.streams.split(",")]
    rng = random.Random(0)
    prompts = {c: [[1] + [rng.randrange(3, cfg.vocab_size) for _ in range(args.prompt_len - 1)] for _ in range(c)]
               for c in levels}
    n = args.new_tokens
    results: dict[str, dict[int, Result]] = {}
    print(f"{ckpt}: {cfg.num_parameters() / 1e6:.0f}M parameters, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, {dtype}; {n} new tokens, prompt "
          f"{args.prompt_len}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}; "
          f"loadavg {loadavg()}", flush=True)

    def measure(name, fn):
        fn(prompts[levels[0]][:1], 4)  # warm-up
        results[name] = {}
        for c in levels:  # the median of --repeats: this shared machine's speed varies from run to run
            runs = sorted((fn(prompts[c], n) for _ in range(max(1, args.repeats))), key=lambda x: x.tok_s)
            r = runs[len(runs) // 2]
            r.repeats, r.load = runs, loadavg()
            results[name][c] = r
            lo, hi = r.spread
            print(f"  {name:<14} {c:>4} streams: {r.tok_s:8.1f} tok/s (runs {lo:.1f}–{hi:.1f}), "
                  f"{r.cpu_ms_per_token:.2f} CPU ms/token; loadavg {r.load}", flush=True)

    if "transformers" in paths:
        from transformers import MixtralForCausalLM

        hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval().to(args.device)
        measure("transformers", lambda p, k: run_transformers(hf, p, k))
        del hf
    if "engine" in paths:
        local = load_model(ckpt, dtype=getattr(torch, dtype), device=args.device)
        measure("engine", lambda p, k: run_engine(local, p, k))
        del local
    need_ray = [p for p in paths if p == "engine+actors" or p.startswith("served")]
    if need_ray:
        from raymoe.cli.ray_session import ray_connection
        from raymoe.cluster.settings import ServeSettings

        gpu = args.device == "cuda"
        base = ServeSettings(checkpoint=ckpt, expert_actors=args.expert_actors, max_running=max(levels),
                             expert_device="gpu" if gpu else "cpu", expert_num_gpus=args.expert_gpus,
                             replica_num_gpus=args.replica_gpus if gpu else 0.0,
                             micro_batches=args.micro_batches, replica_num_cpus=args.replica_cpus or 1.0,
                             expert_num_cpus=args.actor_cpus,
                             **({} if args.stream_interval_ms is None else {"stream_interval_ms": args.stream_interval_ms}))
        with ray_connection(None, base.local_ray_cpus(), direct_ingress=args.direct_ingress):
            if "engine+actors" in paths:
                from raymoe.actors.pool import ExpertPool
                from raymoe.actors.remote_experts import remote_experts_factory

                with ExpertPool(ckpt, base.pool_config(dtype)) as pool:
                    remote = load_model(ckpt, dtype=getattr(torch, dtype), experts_factory=remote_experts_factory(pool),
                                        device=args.device)
                    threads = torch.get_num_threads()  # the front as a served replica runs it (cluster/replica.py)
                    torch.set_num_threads(max(1, int(base.replica_num_cpus)))
                    try:
                        measure("engine+actors", lambda p, k: run_engine(remote, p, k, pool,
                                                                         base.effective_micro_batches(pool.device)))
                    finally:
                        torch.set_num_threads(threads)
            for name in [p for p in paths if p.startswith("served")]:
                settings = dataclasses.replace(
                    base, grpc_port=free_port(), http_port=free_port(), expert_actors=0 if name == "served-local" else args.expert_actors,
                    expert_transport="ray" if name == "served-ray" else "direct",
                    # with local experts the replica is the whole model: it gets the cores the engine has
                    replica_num_cpus=args.replica_cpus or float(os.cpu_count() or 1) if name == "served-local"
                    else args.replica_cpus or 1.0)
                serve_one(name, settings, measure, args.direct_ingress)
    report(results, levels, args)
    tmp.cleanup()


def serve_one(name: str, settings, measure, direct_ingress: bool = False) -> None:
    from ray import serve

    from raymoe.cluster.client import Client
    from raymoe.cluster.deploy import deploy, release_pool

    try:
        deploy(settings)
        target = f"127.0.0.1:{settings.grpc_port}"
        with Client(target) as c:
            c.wait_ready(300)
        measure(name, lambda p, k: run_served(target, p, k))
        if direct_ingress:  # the same deployment, straight through the replica's own port
            from raymoe.cluster.direct_ingress import endpoints

            own = endpoints(settings.app_name, (settings.grpc_port, settings.http_port), timeout_s=30).grpc
            if not own:
                raise SystemExit("--direct-ingress: the replica serves on no port of its own")
            # one replica's port: run_served reads that replica's own counters before and after
            measure(f"{name}+ingress", lambda p, k: run_served(own[0], p, k))
    finally:
        serve.shutdown()
        release_pool(settings)


def report(results: dict[str, dict[int, Result]], levels: list[int], args) -> None:
    ref = results.get("engine")
    hf = results.get("transformers")
    print(f"\nmedian of {args.repeats} runs per cell; spread = slowest–fastest run's tok/s\n"
          f"{'path':<21} {'streams':>7} {'tok/s':>8} {'spread':>15} {'vs hf':>6} {'ttft p50':>9} {'p99':>7} "
          f"{'itl p50':>8} {'p99':>7} {'CPU ms/tok':>10} {'vs hf':>6} {'layer ms':>9} {'compute':>8} {'msg/tok':>7} "
          f"{'same':>7} {'loadavg':>16}")
    for name, by_level in results.items():
        for c in levels:
            r = by_level[c]
            ms = lambda xs, q: f"{1e3 * pct(xs, q):.1f}" if xs else "-"  # noqa: E731
            vs = f"{r.tok_s / hf[c].tok_s:.2f}x" if hf else "-"
            cpu_tok = r.cpu_ms_per_token
            cpu_vs = f"{cpu_tok / hf[c].cpu_ms_per_token:.2f}x" if hf else "-"
            lo, hi = r.spread
            layer = f"{r.layer_ms:.2f}" if r.layer_ms is not None else "-"
            compute = f"{r.compute_ms:.2f}" if r.compute_ms is not None else "-"
            same = f"{sum(a == b for a, b in zip(r.outputs, ref[c].outputs))}/{c}" if ref else "-"
            print(f"{name:<21} {c:>7} {r.tok_s:>8.1f} {f'{lo:.0f}–{hi:.0f}':>15} {vs:>6} {ms(r.ttft, 0.5):>9} {ms(r.ttft, 0.99):>7} "
                  f"{ms(r.itl, 0.5):>8} {ms(r.itl, 0.99):>7} {cpu_tok:>10.2f} {cpu_vs:>6} {layer:>9} {compute:>8} "
                  f"{r.messages / r.tokens if r.messages else 1:>7.2f} {same:>7} {r.load:>16}")
    plot(results, levels, args)


def plot(results: dict[str, dict[int, Result]], levels: list[int], args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, by_level in results.items():
        a.plot(levels, [by_level[c].tok_s for c in levels], marker="o", label=name)
        b.plot(levels, [by_level[c].cpu_ms_per_token for c in levels], marker="o", label=name)
    for ax, label in ((a, "output tokens / s"), (b, "CPU ms per generated token")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    b.set_yscale("log")  # 1 stream costs 10x more per token than 128
    a.legend(fontsize=8)
    fig.suptitle(f"raymoe, {args.expert_actors} expert actors, {args.new_tokens} new tokens")
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100, bbox_inches="tight")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
