"""Guided decoding's cost: output tokens/s with and without a JSON schema, and the mask's µs per token.

The `small` preset in bfloat16 with its experts on N Ray expert actors (direct transport, the
in-process engine as `raymoe run --expert-actors N` runs it, no Serve), at 1 and 32 concurrent
streams. The guided run decodes every stream under a JSON schema (an array of at least 64 objects
with a bounded string, a bounded integer and an enum array) whose answers cannot end before
--new-tokens, so both runs generate the same number of tokens in the same batch shapes; the plain
run ignores EOS. Runs alternate (plain, guided, plain, ...) so both sides share the machine's noise;
each cell is the median of --repeats with the spread, and /proc/loadavg is printed with each.
"mask µs/token" is the time the masks took per guided token; "waited" the part of it a step waited
for (the rest ran while the step's forward and expert calls were in flight).

    python -m bench.bench_structured [--expert-actors 4] [--streams 1,32] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import bench_environment, loadavg

SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags"], "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}}


def run(engine, prompts: list[list[int]], params) -> tuple[float, int, float, float]:
    """(seconds, tokens, mask seconds, mask seconds waited) of one batch of streams."""
    mask0, wait0 = engine.mask_seconds, engine.mask_wait_seconds
    tokens = 0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add(i, p, params)
    while engine.has_work():
        for ev in engine.step():
            if ev.error is not None:
                raise ev.error
            tokens += 1
    return (time.perf_counter() - t0, tokens, engine.mask_seconds - mask0, engine.mask_wait_seconds - wait0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the `small` preset, written in bfloat16 to a temp dir")
    ap.add_argument("--expert-actors", type=int, default=4)
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    bench_environment()

    from raymoe.actors.pool import ExpertPool
    from raymoe.actors.remote_experts import remote_experts_factory
    from raymoe.cli.ray_session import ray_connection
    from raymoe.cluster.settings import ServeSettings
    from raymoe.model.engine import Engine
    from raymoe.model.guided import GrammarCache, GuidedSpec
    from raymoe.model.presets import init_checkpoint
    from raymoe.model.sampling import SamplingParams
    from raymoe.model.tokenizer import Tokenizer
    from raymoe.model.weights import load_model

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or str(init_checkpoint("small", Path(tmp.name) / "small", dtype=torch.bfloat16))
    settings = ServeSettings(checkpoint=ckpt, expert_actors=args.expert_actors, expert_device="cpu",
                             expert_num_cpus=0.5)
    levels = [int(c) for c in args.streams.split(",")]
    tok = Tokenizer(ckpt)
    rng = random.Random(0)
    n = args.new_tokens
    print(f"{ckpt}: small, bfloat16, {args.expert_actors} expert actors; {n} new tokens; loadavg {loadavg()}",
          flush=True)
    with ray_connection(None, settings.local_ray_cpus()), ExpertPool(ckpt, settings.pool_config("bfloat16")) as pool:
        model = load_model(ckpt, dtype=torch.bfloat16, experts_factory=remote_experts_factory(pool))
        cfg = model.cfg
        grammars = GrammarCache(tok, cfg.vocab_size, cfg.eos_token_ids)
        t0 = time.perf_counter()
        guided = grammars.compile(GuidedSpec("json_schema", json.dumps(SCHEMA)))
        print(f"schema compiled in {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
        plain_params = SamplingParams(max_tokens=n, ignore_eos=True)
        guided_params = SamplingParams(max_tokens=n, guided=guided)
        print(f"{'streams':>7} {'plain tok/s':>18} {'schema tok/s':>18} {'ratio':>16} {'mask µs/token':>14} "
              f"{'waited µs/token':>16}  loadavg")
        for c in levels:
            prompts = [[1] + [rng.randrange(3, tok.vocab_size) for _ in range(15)] for _ in range(c)]
            engine = Engine(model, kv_cache_tokens=c * (16 + n + 32), max_running=c)
            run(engine, prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
            run(engine, prompts[:1], SamplingParams(max_tokens=4, guided=guided))
            plain, schema, ratios = [], [], []
            for _ in range(args.repeats):
                s_plain, t_plain, _, _ = run(engine, prompts, plain_params)
                s_guided, t_guided, mask_s, wait_s = run(engine, prompts, guided_params)
                assert t_plain == t_guided == c * n, (t_plain, t_guided)
                plain.append(t_plain / s_plain)
                schema.append((t_guided / s_guided, mask_s / t_guided * 1e6, wait_s / t_guided * 1e6))
                ratios.append(schema[-1][0] / plain[-1])
            med = statistics.median
            print(f"{c:>7} {med(plain):8.1f} ({min(plain):.0f}-{max(plain):.0f}) "
                  f"{med(s[0] for s in schema):8.1f} ({min(s[0] for s in schema):.0f}-{max(s[0] for s in schema):.0f}) "
                  f"{med(ratios):6.3f} ({min(ratios):.2f}-{max(ratios):.2f}) {med(s[1] for s in schema):14.1f} "
                  f"{med(s[2] for s in schema):16.1f}  {loadavg()}", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
