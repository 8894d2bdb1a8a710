"""Two of the limits a hostile client meets, measured against a default server (issue 22):

  resume  --resumes concurrent requests each replaying --replay `<s>` tokens (resume_token_ids)
          beside a running stream: the stream's largest gap between messages (target ≤ 1 s), and
          how long the slowest replayed request took. Each trial uses new prompts (a cold cache).
  big     a 9 MB GenerateRequest at the default --max-message-bytes (8 MiB): its status (target
          RESOURCE_EXHAUSTED or INVALID_ARGUMENT) and that the next request is answered.

The `small` preset in bfloat16 unless --checkpoint, --expert-actors actors, `raymoe serve`'s defaults
otherwise (--max-batch-tokens to try another step size).

    python -m bench.bench_limits [--trials 2] [--resumes 10] [--replay 3000] [--max-batch-tokens N]
"""

from __future__ import annotations

import argparse
import threading
import time

from bench.machine import bench_environment, free_port
from bench.server import checkpoint_or_small, served


def resume_trial(client, trial: int, resumes: int, replay: int) -> tuple[float, float, set]:
    """(the running stream's largest gap, the slowest replayed request's seconds, their outcomes)."""
    import grpc

    from raymoe.protos import generator_pb2 as pb

    gaps, stop = [], threading.Event()

    def running() -> None:
        last = time.perf_counter()
        request = pb.GenerateRequest(prompt_token_ids=[1, 5, 6, 7], max_tokens=600, ignore_eos=True)
        for _ in client.stream(request, timeout=600):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if stop.is_set():
                break

    def resumed(i: int, out: list) -> None:
        t0 = time.perf_counter()
        request = pb.GenerateRequest(prompt_token_ids=[1, 9 + trial, 10 + i], max_tokens=replay + 16, ignore_eos=True,
                                     resume_token_ids=[1] * replay)
        try:
            reply = client.stub.Generate(request, timeout=600)
            out[i] = ("OK", len(reply.token_ids), time.perf_counter() - t0)
        except grpc.RpcError as e:
            out[i] = (e.code().name, 0, time.perf_counter() - t0)

    stream = threading.Thread(target=running)
    stream.start()
    time.sleep(1.0)  # the stream is under way
    out: list = [None] * resumes
    threads = [threading.Thread(target=resumed, args=(i, out)) for i in range(resumes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    stream.join()
    return max(gaps[1:]), max(o[2] for o in out), {(o[0], o[1]) for o in out}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--expert-actors", type=int, default=2)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--resumes", type=int, default=10)
    ap.add_argument("--replay", type=int, default=3000)
    ap.add_argument("--max-batch-tokens", type=int, default=0, help="0: raymoe serve's default")
    args = ap.parse_args(argv)
    bench_environment()

    import grpc

    from raymoe.cluster.client import Client
    from raymoe.cluster.settings import ServeSettings
    from raymoe.protos import generator_pb2 as pb

    with checkpoint_or_small(args.checkpoint) as ckpt:
        s = ServeSettings(checkpoint=ckpt, expert_actors=args.expert_actors, max_batch_tokens=args.max_batch_tokens,
                          grpc_port=free_port(), http_port=free_port())
        with served(s) as target, Client(target) as client:
            steps = client.model_info(timeout=60).max_batch_tokens
            print(f"{ckpt}: {args.expert_actors} expert actors, max_batch_tokens {steps}")
            for trial in range(args.trials):
                gap, slowest, outcomes = resume_trial(client, trial, args.resumes, args.replay)
                print(f"resume trial {trial}: {args.resumes} × {args.replay} replayed tokens → {sorted(outcomes)} "
                      f"(slowest {slowest:.1f} s); the running stream's largest gap {gap:.3f} s (target ≤ 1 s)",
                      flush=True)
            t0 = time.perf_counter()
            try:
                client.stub.Generate(pb.GenerateRequest(prompt="x" * (9 << 20), max_tokens=4), timeout=60)
                print("9 MB message: accepted (target: refused)")
            except grpc.RpcError as e:
                print(f"9 MB message: {e.code().name} after {time.perf_counter() - t0:.2f} s")
            after = client.stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 5], max_tokens=4), timeout=60)
            print(f"the next request: {len(after.token_ids)} tokens")


if __name__ == "__main__":
    main()
