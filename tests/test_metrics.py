"""Metrics after a known workload: scraped from Ray's Prometheus endpoint, the counts add up."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from raymoe.cli.status import imbalance, render
from raymoe.protos import generator_pb2 as pb
from serving_helpers import running_server
from shared_ray import free_port

LONG = [1] + list(range(100, 133))  # 34 tokens: sent twice, the second finds 2 blocks (32 tokens) cached
# (prompt ids, max_tokens)
WORKLOAD = [([1, 5, 9, 14], 6), ([1, 2, 3, 4, 5, 6, 7, 8, 9], 3), ([1, 77], 10), (LONG, 2), (LONG, 2)]
CACHED = 32


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def metered_server(tiny_dir):
    metrics_port = free_port()
    ray_options = dict(_metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 500})
    with running_server(ray_options=ray_options, checkpoint=str(tiny_dir),
                        expert_actors=2, expert_num_cpus=0.5) as client:
        yield client, metrics_port


def test_routed_tokens_add_up(metered_server):
    client, port = metered_server
    for ids, n in WORKLOAD:
        list(client.stream(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=n, ignore_eos=True)))
    with pytest.raises(Exception):
        client.generate(pb.GenerateRequest(prompt="x", temperature=-1))
    change = client.scale_experts(3, timeout=120)  # a placement change, counted by the pool host
    layers, top_k = 2, 2
    # every prompt token (but those found cached) and every generated token but the last goes through every layer
    tokens = sum(len(ids) + n - 1 for ids, n in WORKLOAD) - CACHED
    expected = tokens * top_k * layers
    deadline, routed, samples = time.monotonic() + 40, 0, {}
    while time.monotonic() < deadline:
        samples = scrape(port)
        routed = sum(s.value for s in samples.get("ray_raymoe_routed_tokens", []) if s.name.endswith("_total"))
        statuses = {s.labels["status"]: s.value for s in samples.get("ray_raymoe_requests", [])
                    if s.name.endswith("_total")}
        pairs = sum(s.value for s in samples.get("ray_raymoe_expert_pairs", []) if s.name.endswith("_total"))
        if routed >= expected and pairs >= expected and statuses.get("ok", 0) >= len(WORKLOAD) \
                and statuses.get("invalid_argument", 0) >= 1 and "ray_raymoe_placement_version" in samples \
                and "ray_raymoe_placement_changes" in samples:
            break
        time.sleep(1)
    assert routed == expected
    version = [s.value for s in samples["ray_raymoe_placement_version"]]
    assert version and max(version) == change.version
    copies = [s for s in samples["ray_raymoe_expert_copies"]]
    assert len(copies) == layers * 8 and all(s.value >= 1 for s in copies)
    per_layer = {}
    for s in samples["ray_raymoe_routed_tokens"]:
        if s.name.endswith("_total"):
            per_layer[s.labels["layer"]] = per_layer.get(s.labels["layer"], 0) + s.value
    assert per_layer == {"0": tokens * top_k, "1": tokens * top_k}
    assert statuses["ok"] == len(WORKLOAD) and statuses["invalid_argument"] == 1
    ttft = [s for s in samples["ray_raymoe_time_to_first_token_seconds"] if s.name.endswith("_count")]
    assert sum(s.value for s in ttft) == len(WORKLOAD)
    itl = [s for s in samples["ray_raymoe_inter_token_latency_seconds"] if s.name.endswith("_count")]
    assert sum(s.value for s in itl) == sum(n - 1 for _, n in WORKLOAD)
    # the prefix cache, in tokens as vLLM counts: every prompt looked up, the repeated one's blocks found
    total = {name: sum(s.value for s in samples.get(name, []) if s.name.endswith("_total"))
             for name in ("ray_raymoe_prefix_cache_queries", "ray_raymoe_prefix_cache_hits")}
    assert total == {"ray_raymoe_prefix_cache_queries": sum(len(ids) for ids, _ in WORKLOAD),
                     "ray_raymoe_prefix_cache_hits": CACHED}
    assert [s.value for s in samples["ray_raymoe_prefix_cache_blocks"]] == [2]
    for name in ("ray_raymoe_batch_tokens", "ray_raymoe_queue_depth", "ray_raymoe_running_sequences",
                 "ray_raymoe_kv_cache_used_tokens", "ray_raymoe_step_seconds"):
        assert name in samples, name

    # The same counts reach `raymoe status` through ModelInfo.
    info = client.stub.ModelInfo(pb.ModelInfoRequest())
    assert [sum(r.tokens_per_expert) for r in info.routing] == [tokens * top_k] * layers
    text = render(info)
    assert "max/mean" in text and "ALIVE" in text

    # Every series the Grafana dashboard charts is exported (names as Prometheus shows them).
    dashboard = json.loads((Path(__file__).parent.parent / "k8s" / "grafana-dashboard.json").read_text())
    charted = {re.sub(r"_(total|bucket|sum|count)$", "", name)
               for panel in dashboard["panels"] for t in panel["targets"]
               for name in re.findall(r"ray_raymoe_\w+", t["expr"])}
    assert charted and charted <= set(samples), charted - set(samples)
    assert pairs == expected  # the actors computed every routed (token, expert) pair once


def test_imbalance():
    assert imbalance([5, 5, 5, 5]) == 1.0
    assert imbalance([8, 0, 0, 0]) == 4.0
    assert imbalance([0, 0]) == 0.0
