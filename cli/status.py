"""`raymoe status`: the expert actors and routing balance of a running server, for a terminal."""

from __future__ import annotations

import argparse
import sys


def imbalance(tokens_per_expert: list[int]) -> float:
    """max / mean tokens per expert (1.0 = perfectly even; 0 when nothing was routed)."""
    total = sum(tokens_per_expert)
    return max(tokens_per_expert) * len(tokens_per_expert) / total if total else 0.0


def render(info) -> str:
    c = info.config
    lines = [f"model     {info.model}",
             f"shape     {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_local_experts} experts "
             f"top-{c.num_experts_per_tok}, {c.num_attention_heads}/{c.num_key_value_heads} heads, {c.dtype}"
             + (f", experts {info.quantization}" if info.quantization else ""),
             f"replica   running {info.load.running}/{info.max_running}, waiting {info.load.waiting}, "
             f"KV cache {info.load.kv_cache_used_tokens}/{info.kv_cache_tokens} tokens"]
    caches = list(info.replica_prefix_caches) or ([info.prefix_cache] if info.HasField("prefix_cache") else [])
    for c in caches:
        rate = f"{c.hit_tokens / c.query_tokens:.1%}" if c.query_tokens else "-"
        state = "" if c.enabled else " (off)"
        lines.append(f"prefix    replica {c.replica[:12]:<12} hit rate {rate:>6} ({c.hit_tokens}/{c.query_tokens} "
                     f"prompt tokens){state}, {c.cached_blocks} cached blocks, {c.evictions} evictions")
    if info.state == "LOADING":
        read = sum(a.load_bytes_read for a in info.expert_actors)
        total = sum(a.load_total_bytes for a in info.expert_actors)
        secs = max((a.load_seconds for a in info.expert_actors), default=0.0)
        lines.append(f"state     LOADING: expert actors read {read / 2**30:.2f} of {total / 2**30:.2f} GB "
                     f"({read / max(1, total):.0%}, {read / max(secs, 1e-9) / 2**20:.0f} MB/s); requests wait")
    elif info.state == "FAILED":
        lines.append(f"state     FAILED: {info.load_error}")
    if info.expert_actors:
        lines.append("")
        lines.append(f"{'expert actor':<28} {'state':<12} {'node':<14} {'device':<7} {'weights':>9} {'tokens':>10}")
        for a in info.expert_actors:
            state = a.state
            if state == "LOADING":
                state = f"LOADING {a.load_bytes_read / max(1, a.load_total_bytes):.0%}"
            lines.append(f"{a.name:<28} {state:<12} {a.node_id[:12]:<14} {a.device or '-':<7} "
                         f"{a.weight_bytes / 2**20:>7.1f}MB {a.tokens_processed:>10}")
        calls = info.expert_calls
        if calls.layer_calls:
            wall, compute = 1e3 * calls.wall_seconds / calls.layer_calls, 1e3 * calls.slowest_compute_seconds / calls.layer_calls
            lines.append(f"layer calls ({calls.transport}): {calls.layer_calls}, {wall:.2f} ms each from dispatch to "
                         f"combine, of which {compute:.2f} ms the slowest actor's compute ({wall - compute:.2f} ms "
                         f"transport and front)")
    else:
        lines.append("experts   inside the front replica (no expert actors)")
    if info.routing:
        lines.append("")
        lines.append(f"{'layer':>5} {'routed':>9} {'max/mean':>9}  tokens per expert")
        for r in info.routing:
            counts = list(r.tokens_per_expert)
            lines.append(f"{r.layer:>5} {sum(counts):>9} {imbalance(counts):>9.2f}  {' '.join(map(str, counts))}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from raymoe.cluster.client import Client

    with Client(args.target, api_key=args.api_key, app=args.app_name) as client:
        try:
            info = client.model_info(timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"raymoe: {args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(render(info))
    return 0
