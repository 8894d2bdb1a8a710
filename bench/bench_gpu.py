"""The fast-path benchmark on GPUs, at a size that matters: bench/bench_serving.py's table (1, 32 and
128 streams: transformers, the engine, the engine with expert actors, served with local experts,
served with N actors over each transport) on a Mixtral-shaped random checkpoint (hidden 4096, FFN
14336, 32/8 heads, 8 experts top-2, bfloat16; --layers of them, 4 by default ≈ 11 GB).

Placement: with G ≥ 2 GPUs, the front replica (embeddings, attention, KV cache, router) takes one
GPU and G − 1 expert actors take one GPU each; with one GPU, the front and one expert actor share
it (half each). The engine-only rows run on GPU 0.

    python -m bench.bench_gpu [--layers 4] [--streams 1,32,128] [--checkpoint DIR] [extra bench_serving flags]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--checkpoint", help="a Mixtral checkpoint to use instead of writing a random one")
    ap.add_argument("--out", help="where to write the random checkpoint (default: a temp dir)")
    args, rest = ap.parse_known_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here; run bench/bench_serving.py for the CPU figures")
    gpus = torch.cuda.device_count()
    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        from raymoe.model.presets import init_checkpoint

        if args.out is None:
            tmp = tempfile.TemporaryDirectory()
        out = Path(args.out or tmp.name) / f"mixtral-shaped-{args.layers}l"
        print(f"writing a Mixtral-shaped checkpoint with {args.layers} layers to {out} ...", flush=True)
        ckpt = str(init_checkpoint("mixtral-shaped", out, dtype=torch.bfloat16, layers=args.layers))
    actors, expert_gpus, replica_gpus = (1, 0.5, 0.5) if gpus == 1 else (gpus - 1, 1.0, 1.0)
    print(f"{gpus} GPU(s) ({torch.cuda.get_device_name(0)}): {actors} expert actor(s) at {expert_gpus} GPU, "
          f"front at {replica_gpus} GPU", flush=True)
    from bench.bench_serving import main as bench_main

    bench_main(["--device", "cuda", "--checkpoint", ckpt, "--expert-actors", str(actors),
                "--expert-gpus", str(expert_gpus), "--replica-gpus", str(replica_gpus),
                "--plot", "bench/out/gpu.png", *rest])
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
