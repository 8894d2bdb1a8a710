"""Startup at Mixtral scale: progress, time to ready against the disk, memory per process.

Writes (or uses) a Mixtral-shaped checkpoint (`raymoe init-model --preset mixtral-shaped`, 2 layers
≈ 5.6 GB in bfloat16 by default), reads its files once with a plain read (after dropping the page
cache where this process may), then starts `raymoe serve --checkpoint DIR --expert-actors N` as a
subprocess and reports, side by side:

  - progress: when its first line came, and the longest gap between lines, until ready;
  - time to ready (the gRPC health check says SERVING) and the expert actors' own loading time,
    each against the plain read of the checkpoint;
  - per process, resident memory against its share: each expert actor against the bytes of its
    experts, the front replica against its dense weights plus its KV cache.

    python -m bench.bench_startup [--checkpoint DIR | --layers 2] [--expert-actors 4] [--kv-cache-tokens 4096]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


from bench.machine import free_port


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def plain_read_seconds(directory: Path) -> tuple[float, int]:
    files = sorted(directory.glob("*.safetensors"))
    t, n = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 << 20):
                n += len(chunk)
    return time.perf_counter() - t, n


def started_at(pid: int) -> float:
    """When the process started, on time.monotonic()'s clock (Linux: seconds since boot)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def rss_of(pattern: str) -> dict[int, int]:
    """pid → resident bytes of the processes whose command line matches (those of our server)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if re.search(pattern, cmd):
                status = Path(f"/proc/{pid}/status").read_text()
                out[int(pid)] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
        except (OSError, AttributeError):
            continue
    return out


def watch_model_info(client, t0: float, seen: list) -> None:
    """(seconds, what ModelInfo said) every half second while the server starts, until None is appended."""
    from raymoe.protos import generator_pb2 as pb

    while not seen or seen[-1] is not None:
        try:
            info = client.stub.ModelInfo(pb.ModelInfoRequest(), timeout=2)
            read = sum(a.load_bytes_read for a in info.expert_actors)
            total = sum(a.load_total_bytes for a in info.expert_actors)
            seen.append((time.monotonic() - t0, f"state {info.state}, actors {[a.state for a in info.expert_actors]}, "
                                                f"{read / 2**30:.2f} of {total / 2**30:.2f} GB read"))
        except Exception:  # noqa: BLE001 — not deployed yet
            pass
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--expert-actors", type=int, default=4)
    ap.add_argument("--kv-cache-tokens", type=int, default=4096)
    ap.add_argument("--serve-args", default="", help="more `raymoe serve` flags, e.g. '--no-dashboard'")
    args = ap.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    raymoe = [sys.executable, "-m", "raymoe.cli.main"]
    root = Path(__file__).resolve().parents[1]
    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp.name) / "mixtral-shaped"
    if not args.checkpoint:
        print(f"writing a {args.layers}-layer Mixtral-shaped checkpoint to {ckpt} ...", flush=True)
        subprocess.run([*raymoe, "init-model", "--preset", "mixtral-shaped", "--layers", str(args.layers),
                        "--dtype", "bfloat16", "--out", str(ckpt)], check=True, cwd=root, env=env)
    cold = drop_page_cache()
    read_s, nbytes = plain_read_seconds(ckpt)
    print(f"plain read: {nbytes / 2**30:.2f} GB in {read_s:.1f} s ({nbytes / read_s / 2**20:.0f} MB/s, "
          f"{'cold' if cold else 'warm: could not drop the page cache'})", flush=True)
    if cold:
        drop_page_cache()

    port = free_port()
    t0 = time.monotonic()
    server = subprocess.Popen([*raymoe, "serve", "--checkpoint", str(ckpt), "--expert-actors", str(args.expert_actors),
                               "--grpc-port", str(port), "--http-port", str(free_port()),
                               "--kv-cache-tokens", str(args.kv_cache_tokens), *args.serve_args.split()],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stamps, lines, seen = [], [], []

    def read_output() -> None:
        for line in server.stdout:
            if line.startswith("raymoe:"):
                stamps.append(time.monotonic() - t0)
                lines.append(line.rstrip())

    threading.Thread(target=read_output, daemon=True).start()
    try:
        from raymoe.cluster.client import Client
        from raymoe.protos import generator_pb2 as pb

        with Client(f"127.0.0.1:{port}") as client:
            watch = threading.Thread(target=watch_model_info, args=(client, t0, seen), daemon=True)
            watch.start()
            client.wait_ready(1800)
            ready_s = time.monotonic() - t0
            seen.append(None)  # stops the watcher
            watch.join(10)
            info = client.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
        procs = {name: rss_of(pattern) for name, pattern in (
            ("pool host", r"^ray::PoolHost"), ("serve controller", r"^ray::ServeController"),
            ("serve proxy", r"^ray::ProxyActor"), ("expert actor", r"^ray::ExpertActor"),
            ("front replica", r"^ray::ServeReplica"))}
        actor_rss = sorted(procs["expert actor"].values())
        front_rss = sorted(procs["front replica"].values())
        shares = sorted(a.weight_bytes for a in info.expert_actors)
        load_s = None
        for stamp, line in zip(stamps, lines):
            print(f"  [{stamp:5.1f} s] {line[:150]}")
        progress_stamps = [s for s, line in zip(stamps, lines) if any(w in line for w in ("loading", "starting",
                                                                                              "waiting"))]
        loading = [s for s, line in zip(stamps, lines) if "loading experts" in line]
        load_s = (loading[-1] - loading[0] + 2.0) if loading else None  # lines come every 2 s
        gaps = [b - a for a, b in zip([0.0] + progress_stamps, progress_stamps + [ready_s])]
        print("  process start (s after the command):", ", ".join(
            f"{name} {', '.join(f'{started_at(pid) - t0:.1f}' for pid in sorted(pids))}"
            for name, pids in procs.items() if pids))
        print("  expert actors loading (s):", ", ".join(f"{a.load_seconds:.1f}" for a in info.expert_actors))
        answers = [x for x in seen if x is not None]
        for stamp, line in answers[:1] + [a for a in answers[1:] if "LOADING" in a[1]][-1:]:
            print(f"  [{stamp:5.1f} s] ModelInfo: {line}")
        print(f"\nprogress: first line after {progress_stamps[0] if progress_stamps else float('nan'):.1f} s, "
              f"longest gap {max(gaps):.1f} s (target: within 2 s, then at least every 2 s)")
        print(f"time to ready: {ready_s:.1f} s = {ready_s / read_s:.2f}x the plain read ({read_s:.1f} s); "
              f"{len(info.expert_actors)} expert actors" + ("" if load_s is None else
              f"; the experts' loading itself about {load_s:.0f} s = {load_s / read_s:.2f}x"))
        print(f"{'process':<16} {'RSS MB':>8} {'share MB':>9} {'RSS / (1.1 x share + 400 MB)':>30}")
        for rss, share in zip(actor_rss, shares):
            print(f"{'expert actor':<16} {rss / 2**20:>8.0f} {share / 2**20:>9.0f} {rss / (1.1 * share + 400 * 2**20):>30.2f}")
        c = info.config
        dense = (2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * (
            c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
            + c.num_attention_heads * c.head_dim * c.hidden_size + c.num_local_experts * c.hidden_size)) * 2
        kv = 2 * c.num_hidden_layers * info.kv_cache_tokens * c.num_key_value_heads * c.head_dim * 2
        for rss in front_rss:
            print(f"{'front replica':<16} {rss / 2**20:>8.0f} {(dense + kv) / 2**20:>9.0f}   (dense weights "
                  f"{dense / 2**20:.0f} MB + KV cache {kv / 2**20:.0f} MB; no expert weights)")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
