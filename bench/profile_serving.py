"""Where the served path spends its CPU: py-spy on the front replica, Serve's proxy and an expert actor.

Deploys `raymoe serve` (the `small` preset in bfloat16 unless --checkpoint, --expert-actors N; 0
puts the experts inside the replica), keeps --streams gRPC streams of --new-tokens tokens looping
against it, and samples each of those processes with `py-spy record` for --seconds at once (only
this benchmark's own processes: the machine may run other Ray instances with the same names).
Prints, per process, the share of a core each thread used and the functions with the most samples
of their own ("self") and under them ("total"); the raw py-spy files stay in --out.

    python -m bench.profile_serving [--expert-actors 4] [--streams 32] [--seconds 20] [--gil]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.machine import bench_environment, commands_below, descendants_cpu_seconds, free_port, loadavg

ROLES = {"replica": "ServeReplica", "proxy": "ProxyActor", "actor": "ExpertActor"}


def loop_streams(target: str, prompts: list[list[int]], n: int, stop: threading.Event, done: list[int]) -> None:
    """Every stream starts again as soon as it ends, until `stop`."""
    from raymoe.cluster.client import AsyncClient
    from raymoe.protos import generator_pb2 as pb

    async def main() -> None:
        async with AsyncClient(target) as client:
            async def one(ids):
                while not stop.is_set():
                    async for chunk in client.stream(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=n,
                                                                        ignore_eos=True)):
                        done[0] += len(chunk.token_ids)

            await asyncio.gather(*(one(p) for p in prompts))

    asyncio.run(main())


@dataclasses.dataclass
class Profile:
    samples: int
    threads: collections.Counter  # thread → samples
    self_: collections.Counter  # function → samples where it was the innermost frame
    total: collections.Counter  # function → samples where it was on the stack


def read_raw(path: Path) -> Profile:
    """py-spy's raw (collapsed) output: `thread;frame;...;frame count` per line."""
    p = Profile(0, collections.Counter(), collections.Counter(), collections.Counter())
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        frames = stack.split(";")
        thread, frames = frames[0], [_short(f) for f in frames[1:]]
        p.samples += k
        p.threads[thread] += k
        if frames:
            p.self_[frames[-1]] += k
        for f in set(frames):
            p.total[f] += k
    return p


def _short(frame: str) -> str:
    """`fn (path/to/file.py:12)` → `fn (file.py)`: lines merged, the file's last two parts kept."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({'/'.join(Path(file).parts[-2:])})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--expert-actors", type=int, default=4)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before sampling")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--actor-cpus", type=float, default=0.5)
    ap.add_argument("--gil", action="store_true", help="only samples holding the GIL (py-spy --gil)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default="bench/out/profile")
    args = ap.parse_args(argv)
    bench_environment()

    from ray import serve

    from raymoe.cli.ray_session import ray_connection
    from raymoe.cluster.client import Client
    from raymoe.cluster.deploy import deploy, release_pool
    from raymoe.cluster.settings import ServeSettings
    from raymoe.model.presets import init_checkpoint
    from raymoe.model.weights import Checkpoint

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or str(init_checkpoint("small", Path(tmp.name) / "small", dtype=torch.bfloat16))
    vocab = Checkpoint(ckpt).config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, vocab, (15,), generator=gen).tolist() for _ in range(args.streams)]
    settings = ServeSettings(checkpoint=ckpt, expert_actors=args.expert_actors, max_running=max(64, args.streams),
                             grpc_port=free_port(), http_port=free_port(), replica_num_cpus=args.replica_cpus,
                             expert_num_cpus=args.actor_cpus, expert_device="cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ray_connection(None, settings.local_ray_cpus()):
        try:
            deploy(settings)
            target = f"127.0.0.1:{settings.grpc_port}"
            with Client(target) as c:
                c.wait_ready(300)
            stop, done = threading.Event(), [0]
            load = threading.Thread(target=loop_streams, args=(target, prompts, args.new_tokens, stop, done), daemon=True)
            load.start()
            time.sleep(args.warmup)
            procs = commands_below()
            chosen = {role: next((p for p, c in sorted(procs.items()) if mark in c), None) for role, mark in ROLES.items()}
            t0, tok0, cpu0 = time.perf_counter(), done[0], descendants_cpu_seconds()
            spies = {}
            for role, pid in chosen.items():
                if pid is None:
                    continue
                cmd = [str(Path(os.sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration",
                       str(int(args.seconds)), "--format", "raw", "--threads", "--nonblocking",
                       "--output", str(out / f"{role}.txt"), *(["--gil"] if args.gil else [])]
                spies[role] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for role, spy in spies.items():
                _, err = spy.communicate()
                if spy.returncode:
                    print(f"py-spy on the {role} failed: {err.decode()[-300:]}")
            wall, tokens = time.perf_counter() - t0, done[0] - tok0
            cpu = descendants_cpu_seconds() - cpu0
            stop.set()
            print(f"{args.streams} streams, {args.expert_actors} expert actors: {tokens / wall:.1f} tok/s while sampling, "
                  f"{1e3 * cpu / max(1, tokens):.2f} CPU ms/token (the server's processes); loadavg {loadavg()}")
            for role, pid in chosen.items():
                path = out / f"{role}.txt"
                if pid is None or not path.exists():
                    continue
                report(role, pid, read_raw(path), wall, tokens, args.top)
        finally:
            serve.shutdown()
            release_pool(settings)
    tmp.cleanup()


def report(role: str, pid: int, p: Profile, wall: float, tokens: int, top: int) -> None:
    rate = p.samples / max(wall, 1e-9)  # samples per second ≈ 100 × cores busy (py-spy's default rate)
    print(f"\n== {role} (pid {pid}): {p.samples} busy samples = {rate / 100:.2f} cores, "
          f"{10 * p.samples / max(1, tokens):.3f} ms/token")
    for thread, k in p.threads.most_common(6):
        print(f"   thread {thread[:60]:<60} {100 * k / p.samples:5.1f}%")
    print("   self:")
    for f, k in p.self_.most_common(top):
        print(f"     {100 * k / p.samples:5.1f}%  {f}")
    print("   total:")
    for f, k in p.total.most_common(top + 10):
        print(f"     {100 * k / p.samples:5.1f}%  {f}")


if __name__ == "__main__":
    main()
