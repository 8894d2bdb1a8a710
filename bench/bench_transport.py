"""Candidate transports for one MoE layer call, side by side: what a fan-out to A expert actors and
back costs, in wall time and machine CPU, with payloads the size of real layer calls.

The actors only echo (a result the size of the request), so the figures are transport alone:
  ray        classic actor calls through the object store: ray.get([a.f.remote(x) ...])   (today)
  compiled   a Ray compiled graph (ray.dag, MultiOutputNode) over shared-memory channels
  rdt-gloo   Ray Direct Transport: torch tensors actor → actor over a gloo group (one hop: an
             expert returns its tensor to a "front" actor; the driver orchestrates both calls)
  direct     raymoe's direct transport (actors/direct.py): one TCP connection per actor
A = 1 is also what "fewer, larger calls" gives (one actor per layer, layer_groups = actors).

    python -m bench.bench_transport [--actors 1,4] [--kib 1,16,64] [--rounds 400]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


from bench.machine import CpuWindow, bench_environment


def echo_actor_class(ray):
    import torch

    @ray.remote(num_cpus=0.25)
    class Echo:
        def __init__(self) -> None:
            from raymoe.actors.direct import DirectServer

            torch.set_num_threads(1)
            self.server = DirectServer(lambda layer, payload: (payload, 0.0), host=ray.util.get_node_ip_address())

        def f(self, x):
            return x

        def endpoint(self):
            return self.server.endpoint()

        @ray.method(tensor_transport="gloo")
        def produce(self, n: int):
            return torch.ones(n, dtype=torch.uint8)

        def consume(self, t) -> int:
            return int(t.numel())

    return Echo


def timed(round_fn, rounds: int) -> tuple[float, float]:
    """(median wall ms per round, machine CPU ms per round excluding this process)."""
    for _ in range(20):
        round_fn()
    samples = []
    with CpuWindow() as cpu:
        for _ in range(rounds):
            t = time.perf_counter()
            round_fn()
            samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3, (cpu.machine) * 1e3 / rounds


def bench_ray(actors, x):
    import ray

    return lambda: ray.get([a.f.remote(x) for a in actors])


def bench_compiled(actors, x):
    from ray.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        dag = MultiOutputNode([a.f.bind(inp) for a in actors])
    compiled = dag.experimental_compile()

    def one():
        refs = compiled.execute(x)
        out = [r.get() for r in refs] if isinstance(refs, list) else refs.get()
        del out

    return one, compiled


def bench_direct(actors, x):
    import ray

    from raymoe.actors.direct import DirectChannel

    channels = [DirectChannel(ep, 10.0) for ep in ray.get([a.endpoint.remote() for a in actors])]
    ids = iter(range(1 << 30))

    def one():
        calls = []
        for ch in channels:
            i = next(ids)
            ch.send(i, 0, x)
            calls.append(i)
        for ch, i in zip(channels, calls):
            ch.recv(i, 10.0)

    return one


def bench_rdt(ray, Echo, actors, nbytes):
    from ray.experimental.collective import create_collective_group

    front = Echo.remote()
    group = create_collective_group([front, *actors], backend="gloo")

    def one():
        ray.get([front.consume.remote(a.produce.remote(nbytes)) for a in actors])

    return one, group, front


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", default="1,4")
    ap.add_argument("--kib", default="1,16,64", help="request (and reply) size per actor")
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--only", default="ray,compiled,rdt-gloo,direct")
    args = ap.parse_args()
    bench_environment()
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    Echo = echo_actor_class(ray)
    only = args.only.split(",")
    rows = []
    print(f"{'transport':<10} {'A':>2} {'KiB':>5} {'wall ms':>8} {'CPU ms':>7}   (per layer call: fan-out + gather)")
    for n_actors in [int(a) for a in args.actors.split(",")]:
        for kib in [int(k) for k in args.kib.split(",")]:
            x = np.ones(kib * 1024, dtype=np.uint8)
            for name in only:
                actors = [Echo.remote() for _ in range(n_actors)]
                ray.get([a.endpoint.remote() for a in actors])
                cleanup = []
                try:
                    if name == "ray":
                        fn = bench_ray(actors, x)
                    elif name == "compiled":
                        fn, compiled = bench_compiled(actors, x)
                        cleanup.append(compiled.teardown)
                    elif name == "direct":
                        fn = bench_direct(actors, x)
                    elif name == "rdt-gloo":
                        fn, group, front = bench_rdt(ray, Echo, actors, kib * 1024)
                        cleanup.append(lambda: ray.kill(front))
                    else:
                        raise SystemExit(f"unknown transport {name}")
                    wall, cpu = timed(fn, args.rounds)
                    rows.append((name, n_actors, kib, wall, cpu))
                    print(f"{name:<10} {n_actors:>2} {kib:>5} {wall:>8.3f} {cpu:>7.3f}", flush=True)
                except Exception as e:  # noqa: BLE001 — a candidate that fails is a result too
                    print(f"{name:<10} {n_actors:>2} {kib:>5}   failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                finally:
                    for fn_ in cleanup:
                        try:
                            fn_()
                        except Exception:  # noqa: BLE001
                            pass
                    for a in actors:
                        ray.kill(a)
    print("\nratios to classic Ray calls (wall / CPU):")
    base = {(a, k): (w, c) for n, a, k, w, c in rows if n == "ray"}
    for n, a, k, w, c in rows:
        if n != "ray" and (a, k) in base:
            bw, bc = base[(a, k)]
            print(f"  {n:<10} A={a} {k:>3} KiB: {w / bw:5.2f}x wall, {c / bc:5.2f}x CPU")
    ray.shutdown()


if __name__ == "__main__":
    main()
