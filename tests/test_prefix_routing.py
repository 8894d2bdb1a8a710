"""Cache-aware routing across two front replicas (on by default), over real Serve and gRPC on
loopback: requests sharing a prefix run on the replica that holds it — whichever replica's door
they enter — while other streams (some of them forwarded) run and a bad request is refused; and
`raymoe status` shows each replica's hit rate. Slow: a server of its own."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from raymoe.cli.status import render
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_dir):
    with running_server("raymoe-test-prefix-routing", checkpoint=str(tiny_dir), replicas=2, replica_num_cpus=0.5,
                        stream_interval_ms=0) as client:  # prefix routing is on by default
        yield client


def background_streams(server, prefixes: list[list[int]], results: list) -> list[threading.Thread]:
    """Streams of 60 tokens, one per prefix (a new tail each): half of them enter the door that does
    not hold their prefix and are forwarded; each must deliver every token."""
    def run(i: int, prefix: list[int]) -> None:
        request = pb.GenerateRequest(prompt_token_ids=prefix + [30 + i, 40 + i], max_tokens=60, ignore_eos=True)
        results.append(sum(len(c.token_ids) for c in server.stream(request, timeout=120)))

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prefixes)]
    for t in threads:
        t.start()
    return threads


def wait_for_reports(server, blocks: int) -> None:
    deadline = time.monotonic() + 30
    while True:  # the holders report their blocks (Serve's routing stats, every second)
        info = server.model_info()
        if len(info.replica_prefix_caches) == 2 and sum(c.cached_blocks for c in info.replica_prefix_caches) >= blocks:
            break
        assert time.monotonic() < deadline, info.replica_prefix_caches
        time.sleep(0.5)
    time.sleep(2.0)  # the controller pushes the reports to the doors' routers


def test_requests_sharing_a_prefix_find_the_replica_that_holds_it(server):
    """Once prompts have been answered, every request sharing their first blocks runs where they
    are cached (cluster/prefix_router.py), with 8 other streams running meanwhile."""
    prefixes = [[1] + [(11 * i + 7 * k) % 400 + 5 for i in range(63)] for k in range(3)]  # 64 tokens each
    for p in prefixes:
        first = server.generate(pb.GenerateRequest(prompt_token_ids=p, max_tokens=3, ignore_eos=True))
        assert first.usage.cached_prompt_tokens == 0
    wait_for_reports(server, 3 * 3)
    streamed: list[int] = []
    threads = background_streams(server, [prefixes[k % 3][:48] for k in range(8)], streamed)
    with pytest.raises(grpc.RpcError) as bad:  # refused at the door, the streams unharmed
        server.generate(pb.GenerateRequest(prompt_token_ids=[1, 10 ** 9], max_tokens=3), retries=0)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for i in range(8):
        prefix = prefixes[i % 3]
        again = server.generate(pb.GenerateRequest(prompt_token_ids=prefix[:48] + [7 + i, 9], max_tokens=3,
                                                   ignore_eos=True))
        assert again.usage.cached_prompt_tokens == 48, i
    for t in threads:
        t.join(timeout=150)
    assert streamed == [60] * 8
    text = render(server.model_info())
    assert text.count("hit rate") == 2, text
