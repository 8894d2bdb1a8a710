"""In-process engine vs transformers' generate on the same checkpoint (issue: model core).

One run, side by side: batch 1 and batch 32, 64 new tokens each, greedy, EOS ignored, float32.
Prints tokens/s for each and the ratio ours / transformers.

    python bench/bench_engine.py [--checkpoint DIR] [--new-tokens 64] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="default: a fresh `small` preset in a temp dir")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=2, help="best of N timed runs after a warm-up")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from transformers import MixtralForCausalLM

    from model.engine import Engine
    from model.presets import init_checkpoint
    from model.sampling import SamplingParams
    from model.weights import load_model

    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = tempfile.TemporaryDirectory()
        ckpt = str(init_checkpoint("small", tmp.name))
    ours = load_model(ckpt)
    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    cfg = ours.cfg
    print(f"checkpoint {ckpt}: {cfg.num_parameters() / 1e6:.1f}M params, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, threads={torch.get_num_threads()}")
    rng = random.Random(0)
    n = args.new_tokens

    def run_ours(prompts):
        engine = Engine(ours, kv_cache_tokens=len(prompts) * (args.prompt_len + n + 16), max_running=len(prompts))
        seqs = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
        return [s.output_ids for s in seqs]

    @torch.inference_mode()
    def run_hf(prompts):
        out = hf.generate(torch.tensor(prompts), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
        return out[:, args.prompt_len:].tolist()

    def best(fn, prompts):
        fn(prompts)  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn(prompts)
            times.append(time.perf_counter() - t)
        return min(times), out

    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} {'same tokens':>12}")
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [[1] + [rng.randrange(3, cfg.vocab_size) for _ in range(args.prompt_len - 1)] for _ in range(b)]
        t_ours, o_ours = best(run_ours, prompts)
        t_hf, o_hf = best(run_hf, prompts)
        same = sum(a == h for a, h in zip(o_ours, o_hf))
        print(f"{b:>5} {b * n / t_ours:>11.1f} {b * n / t_hf:>10.1f} {t_hf / t_ours:>5.2f}x {same:>6}/{b:<5}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
