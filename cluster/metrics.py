"""Serving metrics through `ray.util.metrics` (Prometheus on every node; the dashboard's Grafana panels).

Names as Prometheus shows them gain Ray's `ray_` prefix (and `_total` for counters), e.g.
`ray_raymoe_routed_tokens_total{layer="3",expert="5"}`. k8s/grafana-dashboard.json charts them.
Routing is counted on the engine thread into a small [layers, experts] tensor and flushed to the
counter about once a second, so the per-layer hot path only does one bincount.
"""

from __future__ import annotations

import threading
import time

import torch
from ray.util.metrics import Counter, Gauge, Histogram

from raymoe.actors.metrics import LATENCY_BUCKETS

SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


class ServingMetrics:
    def __init__(self, num_layers: int, num_experts: int, flush_every_s: float = 1.0) -> None:
        self.routed = Counter("raymoe_routed_tokens", "Tokens routed to each expert (one per token and top-k slot)",
                              tag_keys=("layer", "expert"))
        self.requests = Counter("raymoe_requests", "Finished requests by final status", tag_keys=("status",))
        self.batch_tokens = Histogram("raymoe_batch_tokens", "Tokens per engine step", boundaries=SIZE_BUCKETS)
        self.batch_sequences = Histogram("raymoe_batch_sequences", "Sequences per engine step",
                                         boundaries=SIZE_BUCKETS)
        self.step_seconds = Histogram("raymoe_step_seconds", "Wall time of one engine step",
                                      boundaries=LATENCY_BUCKETS)
        self.queue_depth = Gauge("raymoe_queue_depth", "Requests waiting for admission")
        self.running = Gauge("raymoe_running_sequences", "Sequences in the running batch")
        self.kv_used = Gauge("raymoe_kv_cache_used_tokens", "KV cache slots held by sequences")
        self.kv_capacity = Gauge("raymoe_kv_cache_capacity_tokens", "KV cache slots in all")
        self.preemptions = Counter("raymoe_preemptions", "Running sequences preempted (memory freed, recomputed "
                                   "later) because the KV cache ran out")
        self._preemptions = 0
        # Per tenant name (never per key: a key in a label would be in every scrape and dashboard)
        self.tenant_requests = Counter("raymoe_tenant_requests", "Requests per tenant: all (requests) and those "
                                       "refused by its quota (refused)", tag_keys=("tenant", "outcome"))
        self.tenant_tokens = Counter("raymoe_tenant_tokens", "Tokens generated per tenant", tag_keys=("tenant",))
        # The prefix cache, with vLLM's meanings: queries and hits count tokens looked up (and found)
        # when sequences start; hits / queries is the hit rate.
        self.prefix_queries = Counter("raymoe_prefix_cache_queries", "Prefix cache: tokens looked up when "
                                      "sequences start")
        self.prefix_hits = Counter("raymoe_prefix_cache_hits", "Prefix cache: tokens looked up and found cached")
        self.prefix_evictions = Counter("raymoe_prefix_cache_evictions", "Prefix cache: cached blocks reused "
                                        "for other content")
        self.prefix_blocks = Gauge("raymoe_prefix_cache_blocks", "Prefix cache: KV blocks holding reusable "
                                   "prefixes (held by sequences or not)")
        self._prefix_counts = [0, 0, 0]  # queries, hits, evictions already counted
        self.ttft = Histogram("raymoe_time_to_first_token_seconds", "Request arrival to its first token",
                              boundaries=LATENCY_BUCKETS)
        self.itl = Histogram("raymoe_inter_token_latency_seconds", "Time between a stream's tokens",
                             boundaries=LATENCY_BUCKETS)
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.long)  # cumulative, for ModelInfo
        self._flushed = torch.zeros_like(self.counts)
        self._lock = threading.Lock()
        self._flush_every, self._last_flush = flush_every_s, time.monotonic()

    def observe_route(self, layer: int, idx: torch.Tensor) -> None:
        """The model's route observer: called on the engine thread for every MoE layer."""
        self.counts[layer] += torch.bincount(idx.reshape(-1), minlength=self.counts.shape[1])

    def observe_step(self, num_sequences: int, num_tokens: int, seconds: float, waiting: int, running: int,
                     kv_used: int, kv_capacity: int, preemptions: int = 0) -> None:
        if num_tokens:
            self.batch_tokens.observe(num_tokens)
            self.batch_sequences.observe(num_sequences)
            self.step_seconds.observe(seconds)
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.kv_used.set(kv_used)
        self.kv_capacity.set(kv_capacity)
        if preemptions > self._preemptions:
            self.preemptions.inc(preemptions - self._preemptions)
            self._preemptions = preemptions
        if time.monotonic() - self._last_flush >= self._flush_every:
            self.flush()

    def observe_prefix_cache(self, queries: int, hits: int, evictions: int, cached_blocks: int) -> None:
        """Totals since the replica started; the counters grow by the difference."""
        for i, (counter, total) in enumerate(((self.prefix_queries, queries), (self.prefix_hits, hits),
                                              (self.prefix_evictions, evictions))):
            if total > self._prefix_counts[i]:
                counter.inc(total - self._prefix_counts[i])
                self._prefix_counts[i] = total
        self.prefix_blocks.set(cached_blocks)

    def flush(self) -> None:
        with self._lock:
            delta = self.counts - self._flushed
            self._flushed += delta
            self._last_flush = time.monotonic()
        for layer, expert in torch.nonzero(delta).tolist():
            self.routed.inc(int(delta[layer, expert]), tags={"layer": str(layer), "expert": str(expert)})
