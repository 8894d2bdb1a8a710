"""What other work on the same cores costs the in-process engine: the ceiling of a served path.

A served front shares its machine with work the in-process engine never sees: Serve's proxy, the
load generator, Ray's own processes, the replica's event loop. This benchmark runs the in-process
engine (the `small` preset in bfloat16 unless --checkpoint; --streams streams of --new-tokens
tokens, greedy, EOS ignored) alone and beside a synthetic load of --shares cores (one process per
core, each busy for --burst-ms out of every burst/(share/cores) ms), and prints tokens/s as a
ratio to the engine alone (the median of --repeats runs, spread in brackets).

torch's CPU kernels run each op on an OpenMP team of one thread per core; a thread preempted by
other work holds the whole team at the op's end, so a share s of the cores taken by anything else
costs the engine more than s. Compare the ratios with the CPU share the served path's other
processes use (`bench_serving --by-process`): that share's ratio bounds what any served path can
reach on this machine against the engine alone.

    python -m bench.bench_contention [--streams 32] [--shares 0,0.1,0.2,0.3] [--burst-ms 0.5,3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/bench_contention.py`: bench.* from the root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_serving import run_engine
from bench.machine import loadavg

BUSY_LOOP = """
import sys, time
busy, period = float(sys.argv[1]), float(sys.argv[2])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(max(0.0, period - busy))
"""


def competitors(share: float, burst_s: float, cores: int) -> list[subprocess.Popen]:
    """`share` cores of busy work in bursts of `burst_s`, spread over one process per core."""
    if share <= 0:
        return []
    per = share / cores
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(burst_s), str(burst_s / per)])
            for _ in range(cores)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the `small` preset, written in bfloat16 to a temp dir")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--shares", default="0,0.1,0.2,0.3", help="cores of competing work (0: the engine alone)")
    ap.add_argument("--burst-ms", default="0.5,3", help="length of each competing burst")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from raymoe.model.config import resolve_dtype
    from raymoe.model.presets import init_checkpoint
    from raymoe.model.weights import Checkpoint, load_model

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(init_checkpoint("small", Path(tmp) / "small", dtype=torch.bfloat16))
        cfg = Checkpoint(ckpt).config
        dtype = resolve_dtype("auto", cfg, "cpu")
        model = load_model(ckpt, dtype=getattr(torch, dtype))
        rng = random.Random(0)
        prompts = [[1] + [rng.randrange(3, cfg.vocab_size) for _ in range(args.prompt_len - 1)]
                   for _ in range(args.streams)]
        cores = os.cpu_count() or 1
        print(f"{ckpt}: {dtype}, {args.streams} streams x {args.new_tokens} tokens; {cores} CPUs; "
              f"torch threads {torch.get_num_threads()}; loadavg {loadavg()}", flush=True)
        run_engine(model, prompts[:1], 4)  # warm-up
        cells = [(0.0, 0.0)] + [(float(s), float(b) / 1e3) for s in args.shares.split(",") if float(s) > 0
                                for b in args.burst_ms.split(",")]
        alone = None
        print(f"{'competing cores':>15} {'burst ms':>8} {'tok/s':>8} {'spread':>13} {'vs alone':>8}  loadavg")
        for share, burst in cells:
            procs = competitors(share, burst, cores)
            try:
                time.sleep(0.5 if procs else 0.0)
                rates = sorted(r.tokens / r.wall for r in (run_engine(model, prompts, args.new_tokens)
                                                           for _ in range(max(1, args.repeats))))
            finally:
                for p in procs:  # only the processes this benchmark started, by their handle
                    p.kill()
                    p.wait()
            median = statistics.median(rates)
            alone = alone or median
            print(f"{share:15.2f} {burst * 1e3:8.1f} {median:8.1f} {rates[0]:6.0f}–{rates[-1]:<6.0f} "
                  f"{median / alone:7.2f}x  {loadavg()}", flush=True)


if __name__ == "__main__":
    main()
