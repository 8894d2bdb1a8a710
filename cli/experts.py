"""`raymoe experts [show|scale|rebalance]`: a server's expert placement, and live changes to it."""

from __future__ import annotations

import argparse
import json
import sys



def render_placement(p) -> str:
    lines = [f"placement v{p.version}: {len(p.actors)} expert actors, predicted max/mean load "
             f"{p.imbalance:.2f} for the load measured so far",
             "", f"{'id':>3} {'actor':<30} {'state':<12} {'node':<14} {'device':<7} {'slots':>5} {'load':>6} "
                 f"{'pairs':>10} {'weights':>9} {'quant':<12}  experts per layer"]
    for a in p.actors:
        held = {tuple(le.experts) for le in a.layers}
        experts = (f"all layers: {_ids(next(iter(held)))}" if len(held) == 1 else
                   "; ".join(f"{le.layer}: {_ids(le.experts)}" for le in a.layers))
        lines.append(f"{a.id:>3} {a.name[:30]:<30} {a.state:<12} {a.node_id[:12]:<14} {a.device or '-':<7} "
                     f"{a.slots:>5} {100 * a.load:>5.1f}% {a.pairs:>10} {a.weight_bytes / 2**20:>7.1f}MB "
                     f"{a.quantization or '-':<12}  {experts}")
    replicated = [(c.layer, e, n) for c in p.copies for e, n in enumerate(c.copies) if n > 1]
    lines.append("")
    lines.append("copies    " + (", ".join(f"layer {layer} expert {e}: {n}" for layer, e, n in replicated[:16])
                                 + (" …" if len(replicated) > 16 else "") if replicated else "one of every expert"))
    if p.history:
        lines.append("")
        lines.append("history")
        lines.extend("  " + render_change(h) for h in p.history)
    return "\n".join(lines)


def render_change(c) -> str:
    if c.version == c.from_version:
        return f"{c.kind}: nothing worth moving (placement stays v{c.version})"
    text = (f"v{c.from_version} → v{c.version} {c.kind}: {c.moves} copies loaded, {c.retired} dropped"
            + (f", actors started {list(c.started)}" if c.started else "")
            + (f", stopped {list(c.stopped)}" if c.stopped else "") + f", {c.seconds:.2f} s")
    if c.imbalance_before:
        text += f"; predicted max/mean load {c.imbalance_before:.2f} → {c.imbalance_after:.2f}"
    return text


def _ids(ids) -> str:
    from raymoe.actors.plan import ranges

    return f"[{ranges(list(ids))}]"


def cmd_experts(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from raymoe.cluster.client import Client

    if args.action == "scale" and (args.actors is None or args.actors < 1):
        print("raymoe: experts scale needs --actors N (at least 1)", file=sys.stderr)
        return 2
    if args.action != "scale" and args.actors is not None:
        print("raymoe: --actors goes with `experts scale`", file=sys.stderr)
        return 2
    with Client(args.target, api_key=args.api_key, app=args.app_name) as client:
        try:
            if args.action == "show":
                reply = client.placement(timeout=args.timeout)
            elif args.action == "scale":
                reply = client.scale_experts(args.actors, timeout=args.timeout)
            else:
                reply = client.rebalance_experts(timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"raymoe: {args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        data = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        for a in data.get("actors", []):  # proto3 JSON writes 64-bit integers as strings
            a["pairs"], a["weight_bytes"] = int(a["pairs"]), int(a["weight_bytes"])
        print(json.dumps(data))
    else:
        print(render_placement(reply) if args.action == "show" else render_change(reply))
    return 0
