"""`raymoe serve --direct-ingress`: each front replica also serves on ports of its own (Ray Serve's
direct ingress), beside the proxy. On a private Ray instance of its own, as a user runs it: the
banner names the replica's ports; the same request gives the same tokens through the replica's
port as through the proxy (and `raymoe generate --direct` finds that port through the proxy's
ModelInfo); the API key and the request checks hold there too, while a stream runs
through that port and is unaffected; streams spread over two replicas' ports by `Client.direct`
outlive one replica killed under them; and Ctrl-C stops it in seconds (Serve's 30 s hold for load
balancers is off on a private instance)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from bench.machine import commands_below, free_port
from raymoe.cluster.client import Client
from raymoe.protos import generator_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
KEY = "direct-ingress-test-key"

pytestmark = pytest.mark.slow


def _post(url: str, body: dict, key: str | None) -> tuple[int, dict]:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _streams_outlive_a_replica_killed_under_them(server_pid: int, replicas: Client, proxy: Client) -> None:
    """Streams spread over both replicas' ports; one replica is killed (by its id, found below the
    server's process) while they run: every stream ends whole, each token once, as without the kill."""
    long = pb.GenerateRequest(prompt="1+1=", max_tokens=400, ignore_eos=True)
    want = list(proxy.generate(long).token_ids)
    got: list[list[int]] = [[] for _ in range(6)]
    runs = [threading.Thread(target=lambda g=g: g.extend(t for c in replicas.stream(long) for t in c.token_ids))
            for g in got]
    for run in runs:
        run.start()
    deadline = time.monotonic() + 60
    while sum(map(len, got)) < 6 * 20 and time.monotonic() < deadline:  # each has begun, none has ended
        time.sleep(0.01)
    victim = next(pid for pid, cmd in commands_below(server_pid).items() if "ServeReplica:raymoe" in cmd)
    os.kill(victim, signal.SIGKILL)
    for run in runs:
        run.join(120)
    assert all(g == want for g in got), [len(g) for g in got]


def test_a_replicas_own_port_answers_as_the_proxy_does_and_stops_quickly(capsys):
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAYMOE_API_KEY": KEY}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "raymoe.cli.main", "serve", "--direct-ingress", "--replicas", "2",
                             "--replica-cpus", "0.5", "--no-dashboard", "--grpc-port", str(grpc_port),
                             "--http-port", str(http_port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        banner, deadline = [], time.monotonic() + 240
        for line in proc.stdout:
            banner.append(line)
            if line.strip().startswith("HTTP http") or "no replica serves" in line or time.monotonic() > deadline:
                break
        text = "".join(banner)
        direct = re.search(r"direct +gRPC ([0-9.]+:\d+), ([0-9.]+:\d+) ", text)
        http = re.search(r"^ +HTTP (http://[0-9.]+:\d+)/v1, ", text, re.M)
        assert direct and http, text
        ports = sorted(direct.groups())
        assert f"127.0.0.1:{grpc_port}" not in ports and len(set(ports)) == 2

        request = pb.GenerateRequest(prompt="123+456=", max_tokens=8)
        with Client(f"127.0.0.1:{grpc_port}", api_key=KEY) as proxy, Client(direct.group(1), api_key=KEY) as own:
            own.wait_ready(60)
            assert list(own.generate(request).token_ids) == list(proxy.generate(request).token_ids)
            # the proxy's ModelInfo names the replica's port, and `raymoe generate --direct` finds it there
            assert sorted(proxy.model_info(timeout=30).direct_grpc_targets) == ports
            from raymoe.cli.main import main

            capsys.readouterr()
            args = ["generate", "--target", f"127.0.0.1:{grpc_port}", "--api-key", KEY, "--prompt", "123+456=",
                    "--max-tokens", "8", "--json"]
            assert main(args + ["--direct"]) == 0
            via_direct = json.loads(capsys.readouterr().out)
            assert main(args) == 0
            assert via_direct["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]
            with Client.direct(f"127.0.0.1:{grpc_port}", api_key=KEY) as replicas:  # round robin over their ports
                assert sorted(replicas.target.split(",")) == ports
                assert all(list(replicas.generate(request).token_ids) == via_direct["token_ids"] for _ in range(4))

            # a long stream through the replica's own port, while bad calls reach the same port
            long = pb.GenerateRequest(prompt="1+1=", max_tokens=200, ignore_eos=True)
            got: list[int] = []
            streaming = threading.Thread(target=lambda: got.extend(t for c in own.stream(long) for t in c.token_ids))
            streaming.start()
            with Client(direct.group(1), api_key="wrong") as stranger, pytest.raises(grpc.RpcError) as denied:
                stranger.generate(request, retries=0)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as invalid:
                own.generate(pb.GenerateRequest(prompt="1+1=", top_p=2.0), retries=0)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status, _ = _post(f"{http.group(1)}/v1/completions", {"prompt": "123+456=", "max_tokens": 8}, None)
            assert status == 401
            status, body = _post(f"{http.group(1)}/v1/completions", {"prompt": "123+456=", "max_tokens": 8}, KEY)
            _, via_proxy = _post(f"http://127.0.0.1:{http_port}/v1/completions",
                                 {"prompt": "123+456=", "max_tokens": 8}, KEY)
            assert status == 200 and body["choices"][0]["text"] == via_proxy["choices"][0]["text"]
            streaming.join(120)
            assert len(got) == 200
            with Client.direct(f"127.0.0.1:{grpc_port}", api_key=KEY) as replicas:  # last: it kills one
                _streams_outlive_a_replica_killed_under_them(proc.pid, replicas, proxy)

        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert time.monotonic() - sent < 25  # Serve's default would hold the replica open 30 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
