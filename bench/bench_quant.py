"""int8 weight-only experts against bfloat16: memory, expert compute, decode speed, time to ready.

The default checkpoint is a 1-layer Mixtral-shaped bfloat16 one (`raymoe init-model --preset
mixtral-shaped --layers 1 --dtype bfloat16`, 2.8 GB, written to a temp dir and deleted at the end).
Each repeat serves it twice, one mode after the other (so both share the machine's noise): the
in-process Engine with its experts on N expert actors (the direct transport, as `raymoe serve`'s
front replica drives them; Serve's proxies add the same cost to both modes and are left out), in
bfloat16 and with `experts_int8`. Per mode:

  ready     seconds from starting the actors to every actor loaded (page cache warm for both)
  RSS       each expert actor's resident memory (VmRSS), against its share of the experts in bf16
  compute   per MoE layer call, the slowest actor's own compute (what the transport cannot hide)
  tok/s     greedy decode, 1 and 8 streams, EOS ignored
  bound     bytes a decode step must read (the routed experts' weights, the front's attention,
            router and lm_head) over the time it took, against this machine's single-thread read
            bandwidth (measured here: `sum` over 512 MB): 100% would be memory-bound at that speed

Also: `--kernels` times one expert's SwiGLU projections on each CPU option (docs/quantization.md);
`--quality` reports greedy agreement and logprob differences of int8 against bf16 on the `small`
preset (teacher-forced on the bf16 continuation).

    python -m bench.bench_quant [--checkpoint DIR] [--expert-actors 2] [--streams 1,8] [--repeats 3]
    python -m bench.bench_quant --kernels | --quality
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_serving import run_engine
from bench.machine import bench_environment

MODES = ("bfloat16", "experts_int8")


def read_bandwidth(mb: int = 512) -> float:
    """Bytes per second one thread reads (a sum over a buffer far larger than the caches)."""
    t = torch.ones(mb << 18, dtype=torch.float32)
    t.sum()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def serve_once(ckpt, mode: str, args, prompts) -> dict:
    import ray

    from raymoe.actors.pool import ExpertPool, PoolConfig
    from raymoe.actors.remote_experts import remote_experts_factory
    from raymoe.model.weights import Checkpoint, load_model

    quant = None if mode == "bfloat16" else mode
    config = PoolConfig(num_actors=args.expert_actors, num_cpus=args.actor_cpus, dtype="bfloat16", device="cpu",
                        quantization=quant, call_timeout_s=600, start_timeout_s=900)
    t0 = time.perf_counter()
    with ExpertPool(ckpt, config) as pool:
        ready = time.perf_counter() - t0
        stats = ray.get([a.stats.remote() for a in pool.group.live_actors()])
        c = Checkpoint(ckpt)
        shares = [c.expert_nbytes([int(k) for k in s["assignment"]], s["experts"]) for s in stats]
        rss = [rss_bytes(s["pid"]) for s in stats]
        model = load_model(ckpt, dtype=torch.bfloat16, experts_factory=remote_experts_factory(pool))
        out = {"ready": ready, "rss": rss, "share": shares, "weights": [s["weight_bytes"] for s in stats]}
        for n in args.streams:
            run_engine(model, prompts[n][:1], 2)  # warm-up
            r = run_engine(model, prompts[n], args.new_tokens, pool)
            out[n] = {"tok_s": r.tok_s, "compute_ms": r.compute_ms, "layer_ms": r.layer_ms, "outputs": r.outputs}
        return out


def step_bytes(ckpt, mode: str, streams: int, outputs) -> float:
    """Bytes one decode step reads: dense part (attention, router, norms, lm_head) + the distinct
    experts routed to, per layer (estimated as E·(1-(1-K/E)^streams), random routing)."""
    from raymoe.model.weights import Checkpoint

    c = Checkpoint(ckpt)
    cfg = c.config
    dense = c.dense_nbytes() - c.nbytes("model.embed_tokens.weight")  # one embedding row per token: nothing
    per_expert = c.expert_nbytes([0], [0])
    if mode != "bfloat16":  # int8 values + one bf16 scale per row
        d, f = cfg.hidden_size, cfg.intermediate_size
        per_expert = 3 * d * f + 2 * (2 * f + d)
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    distinct = e * (1 - (1 - k / e) ** streams)
    return dense + cfg.num_hidden_layers * distinct * per_expert


def bench_serving(args) -> None:
    import random

    from raymoe.cli.ray_session import ray_connection
    from raymoe.model.weights import Checkpoint

    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = tempfile.mkdtemp(prefix="bench-quant-")
        print("writing a 1-layer mixtral-shaped bfloat16 checkpoint ...", flush=True)
        ckpt = str(Path(tmp) / "ckpt")  # in its own process: its peak memory is gone before the actors start
        subprocess.run([sys.executable, "-m", "raymoe.cli.main", "init-model", "--preset", "mixtral-shaped",
                        "--layers", "1", "--dtype", "bfloat16", "--out", ckpt], check=True)
    try:
        cfg = Checkpoint(ckpt).config
        rng = random.Random(0)
        prompts = {n: [[1] + [rng.randrange(3, cfg.vocab_size) for _ in range(15)] for _ in range(n)]
                   for n in args.streams}
        for p in Path(ckpt).glob("*.safetensors"):  # page cache warm for every mode alike
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
        bandwidth = read_bandwidth()
        print(f"{ckpt}: {cfg.num_hidden_layers} layer(s), hidden {cfg.hidden_size}, {cfg.num_local_experts} experts "
              f"× {Checkpoint(ckpt).expert_nbytes([0], [0]) / 2**20:.0f} MB; {args.expert_actors} expert actors of "
              f"{args.actor_cpus} CPU; one-thread read bandwidth {bandwidth / 1e9:.2f} GB/s; "
              f"loadavg {open('/proc/loadavg').read().split()[:3]}", flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        torch.set_num_threads(1)
        with ray_connection(None, 1 + args.expert_actors):
            for rep in range(args.repeats):
                for mode in MODES if rep % 2 == 0 else reversed(MODES):
                    r = serve_once(ckpt, mode, args, prompts)
                    runs[mode].append(r)
                    print(f"  run {rep + 1} {mode:<13} ready {r['ready']:.1f} s, RSS "
                          f"{[round(x / 2**30, 2) for x in r['rss']]} GB, "
                          + ", ".join(f"{n} streams {r[n]['tok_s']:.2f} tok/s compute {r[n]['compute_ms']:.0f} ms"
                                      for n in args.streams)
                          + f"; loadavg {open('/proc/loadavg').read().split()[0]}", flush=True)
        report(ckpt, runs, args, bandwidth)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def report(ckpt, runs: dict[str, list[dict]], args, bandwidth: float) -> None:
    base, q = runs["bfloat16"], runs["experts_int8"]
    print(f"\nmedian [min-max] of {args.repeats} runs each")
    print(f"{'':<34} {'bfloat16':>24} {'experts_int8':>24} {'ratio (median)':>16}")

    def row(name: str, f, better: str) -> None:
        a, b = [f(r) for r in base], [f(r) for r in q]
        ratio = statistics.median(b) / statistics.median(a)
        print(f"{name:<34} {spread(a):>24} {spread(b):>24} {ratio:>9.2f}x {better}")

    row("time to ready (s)", lambda r: r["ready"], "(lower is better)")
    row("actor RSS (GB, largest)", lambda r: max(r["rss"]) / 2**30, "(target <= 0.65x)")
    row("actor RSS / bf16 share", lambda r: max(x / s for x, s in zip(r["rss"], r["share"])), "")
    row("actor weight bytes (GB, largest)", lambda r: max(r["weights"]) / 2**30, "")
    for n in args.streams:
        row(f"{n} streams: compute per layer call ms", lambda r: r[n]["compute_ms"],
            "(target >= 1.6x faster at 1)" if n == 1 else "")
        row(f"{n} streams: layer call ms (wall)", lambda r: r[n]["layer_ms"], "")
        row(f"{n} streams: decode tok/s", lambda r: r[n]["tok_s"], "(target >= 1.2x at 1)" if n == 1 else "")
    print(f"\nagainst memory bandwidth ({bandwidth / 1e9:.2f} GB/s one thread; each actor reads its experts with its "
          f"own thread, so the experts' bound is per actor and the actors overlap):")
    from raymoe.model.weights import Checkpoint

    c = Checkpoint(ckpt)
    for mode, rs in runs.items():
        for n in args.streams:
            step_s = statistics.median(n / r[n]["tok_s"] for r in rs)  # seconds per decode step
            need = step_bytes(ckpt, mode, n, None)
            per_actor = (need - c.dense_nbytes() + c.nbytes("model.embed_tokens.weight")) / args.expert_actors
            compute_s = statistics.median(r[n]["compute_ms"] for r in rs) / 1e3
            print(f"  {mode:<13} {n} streams: a step reads {need / 2**20:.0f} MB in {1e3 * step_s:.0f} ms = "
                  f"{need / step_s / 1e9:.2f} GB/s ({need / step_s / bandwidth:.0%} of one thread's bandwidth); "
                  f"the slowest actor's experts: {per_actor / 2**20:.0f} MB in {1e3 * compute_s:.0f} ms = "
                  f"{per_actor / compute_s / 1e9:.2f} GB/s ({per_actor / compute_s / bandwidth:.0%})")
    same = [sum(a == b for a, b in zip(rb[n]["outputs"], rq[n]["outputs"])) for rb, rq in zip(base, q)
            for n in args.streams]
    print(f"streams whose greedy tokens equal bf16's: {sum(same)}/{len(same) and sum(args.streams) * len(base)} "
          f"(random weights: near-uniform logits, so int8 rounding flips close calls)")


def bench_kernels(args) -> None:
    """One Mixtral expert's w13 [2F, D] projection (then w2 [D, F]) at M rows, each CPU option."""
    import torch.nn.functional as F

    torch.set_num_threads(1)
    d, f = 4096, 14336
    g = torch.Generator().manual_seed(0)
    from raymoe.model.quant import int8_linear, quantize

    print(f"one thread; one expert (w13 {2 * f}x{d}, w2 {d}x{f}); median [min-max] ms of {args.repeats}; "
          f"loadavg {open('/proc/loadavg').read().split()[:3]}")
    print(f"{'M':>4} {'bf16 F.linear':>22} {'int8pack_mm':>22} {'dequant→buffer':>22} {'dequant alloc':>22}")
    for m in (1, 2, 4, 8, 32):
        row = []
        for wshape in ((2 * f, d), (d, f)):
            w = (torch.randn(wshape, generator=g) * 0.02).to(torch.bfloat16)
            s = quantize(w, torch.bfloat16)
            buf = torch.empty_like(w)
            x = torch.randn(m, wshape[1], generator=g).to(torch.bfloat16)
            fns = (lambda: F.linear(x, w), lambda: int8_linear(x, s.q, s.scale),
                   lambda: F.linear(x, buf.copy_(s.q)) * s.scale, lambda: F.linear(x, s.q.to(torch.bfloat16)) * s.scale)
            row.append([timed(fn, args.repeats) for fn in fns])
            del w, s, buf
        total = [[a + b for a, b in zip(p, q)] for p, q in zip(*row)]
        print(f"{m:>4} " + " ".join(f"{spread(t):>22}" for t in total), flush=True)


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def bench_quality(args) -> None:
    """Greedy bf16 continuations vs experts_int8 on the `small` preset: whole-sequence agreement, and
    teacher-forced on bf16's tokens the int8 model's argmax agreement and |Δ logprob| of each token.
    For scale, the same figures for bf16 against float32 (the rounding bf16 itself brings)."""
    import random

    from raymoe.model.presets import init_checkpoint
    from raymoe.model.weights import load_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint("small", Path(tmp) / "small", dtype=torch.bfloat16)
        fp32 = load_model(ckpt, dtype=torch.float32)
        bf16 = load_model(ckpt, dtype=torch.bfloat16)
        int8 = load_model(ckpt, dtype=torch.bfloat16, quantization="experts_int8")
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, bf16.cfg.vocab_size) for _ in range(15)] for _ in range(32)]
    print(f"small preset (random weights), {len(prompts)} prompts × {args.new_tokens} greedy tokens, EOS ignored:")
    for name, ref, test in (("experts_int8 vs bf16", bf16, int8), ("bf16 vs float32 (for scale)", fp32, bf16)):
        print(f"  {name}: " + agreement(ref, test, prompts, args.new_tokens))


def agreement(ref, test, prompts, n_new: int) -> str:
    from raymoe.model.engine import Engine
    from raymoe.model.sampling import SamplingParams
    from raymoe.model.step import build_layout

    params = SamplingParams(max_tokens=n_new, ignore_eos=True)
    seq_r = Engine(ref, kv_cache_tokens=8192).generate(prompts, params)
    seq_t = Engine(test, kv_cache_tokens=8192).generate(prompts, params)
    same_seq = sum(a.output_ids == b.output_ids for a, b in zip(seq_r, seq_t))
    prefix = [next((i for i, (x, y) in enumerate(zip(a.output_ids, b.output_ids)) if x != y), n_new)
              for a, b in zip(seq_r, seq_t)]
    argmax_same, deltas = 0, []
    with torch.inference_mode():
        for p, s in zip(prompts, seq_r):
            ids = p + s.output_ids
            layout = build_layout([len(ids)], [0], sliding_window=ref.cfg.sliding_window)
            lp = [torch.log_softmax(m.logits(m(torch.tensor(ids), layout)).float(), -1)[len(p) - 1:-1] for m in (ref, test)]
            chosen = torch.tensor(s.output_ids)[:, None]
            argmax_same += int((lp[1].argmax(-1) == chosen[:, 0]).sum())
            deltas += (lp[1].gather(1, chosen) - lp[0].gather(1, chosen)).abs().squeeze(1).tolist()
    deltas.sort()
    total = len(prompts) * n_new
    return (f"whole continuations equal {same_seq}/{len(prompts)}, tokens before the first difference "
            f"{sum(prefix) / total:.1%}; teacher-forced on the reference's tokens: argmax agrees at "
            f"{argmax_same / total:.1%}, |Δ logprob| of the chosen token mean {statistics.mean(deltas):.4f}, "
            f"p50 {deltas[len(deltas) // 2]:.4f}, p99 {deltas[int(0.99 * len(deltas))]:.4f}, max {deltas[-1]:.4f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: a 1-layer mixtral-shaped bfloat16 checkpoint in a temp dir")
    ap.add_argument("--expert-actors", type=int, default=2)
    ap.add_argument("--actor-cpus", type=float, default=0.5)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernels", action="store_true", help="only the per-expert kernel timings")
    ap.add_argument("--quality", action="store_true", help="only greedy agreement / logprob differences (small preset)")
    args = ap.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    bench_environment()
    if args.kernels:
        bench_kernels(args)
    elif args.quality:
        bench_quality(args)
    else:
        bench_serving(args)


if __name__ == "__main__":
    main()
