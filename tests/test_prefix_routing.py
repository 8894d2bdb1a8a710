"""Cache-aware routing across two front replicas (experimental, --prefix-routing), over real Serve
and gRPC on loopback: requests sharing a prefix run on the replica that holds it, and `raymoe
status` shows each replica's hit rate. Slow: a server of its own."""

from __future__ import annotations

import time

import pytest

from raymoe.cli.status import render
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_dir):
    with running_server(checkpoint=str(tiny_dir), replicas=2, replica_num_cpus=0.5,
                        prefix_routing=True) as client:
        yield client


def test_requests_sharing_a_prefix_find_the_replica_that_holds_it(server):
    """Once a prompt has been answered, every request sharing its first blocks — whichever
    replica's door it enters — runs where they are cached (cluster/prefix_router.py)."""
    prefix = [1] + [(11 * i) % 400 + 5 for i in range(63)]  # 64 tokens: 3 blocks of 16 reusable (+ the last)
    first = server.generate(pb.GenerateRequest(prompt_token_ids=prefix, max_tokens=3, ignore_eos=True))
    assert first.usage.cached_prompt_tokens == 0
    deadline = time.monotonic() + 30
    while True:  # the holder reports its blocks (Serve's routing stats, every second)
        info = server.model_info()
        if len(info.replica_prefix_caches) == 2 and max(c.cached_blocks for c in info.replica_prefix_caches) >= 3:
            break
        assert time.monotonic() < deadline, info.replica_prefix_caches
        time.sleep(0.5)
    time.sleep(2.0)  # the controller pushes the report to the doors' routers
    for i in range(8):
        again = server.generate(pb.GenerateRequest(prompt_token_ids=prefix[:48] + [7 + i, 9], max_tokens=3,
                                                   ignore_eos=True))
        assert again.usage.cached_prompt_tokens == 48, i
    text = render(server.model_info())
    assert text.count("hit rate") == 2, text
