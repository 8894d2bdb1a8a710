"""`raymoe` command line: argument parsing only; each command's work lives in its own module.

Errors a user can fix (bad checkpoint, bad flag value) end the command with a one-line message
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from raymoe.actors import EXPERT_DEVICES, TRANSPORTS
from raymoe.model.config import DTYPE_CHOICES, QUANTIZATIONS, SERVED_DTYPES

from .commands import run_command
from .serve_flags import add_serve_args, settings_from_args


def _add_sampling(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the checkpoint's tokenizer, BOS first)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,415,2936")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens at most (default: as a request that sets none, within the context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--logprobs", type=int, default=0, help="also report the top-N alternatives per token")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weights and activations (default auto: the checkpoint's own, config.json torch_dtype)")


def _add_quantization(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help="experts_int8: the experts' weights as int8 per output channel, quantized as they load "
                        "(half the memory; implied by a checkpoint written by `raymoe quantize`)")


def _add_expert_device(p) -> None:
    p.add_argument("--expert-transport", choices=TRANSPORTS, default="direct",
                   help="how layer calls reach the expert actors: direct sockets (default) or Ray actor calls "
                        "through the object store")
    p.add_argument("--expert-device", choices=EXPERT_DEVICES, default="auto",
                   help="where expert actors compute: auto = one GPU each when the cluster has GPUs at start, "
                        "else a CPU share; gpu without GPUs is an error")


def _add_api_key(p) -> None:
    p.add_argument("--api-key", default=None, help="the server's API key (default: $RAYMOE_API_KEY)")
    p.add_argument("--app-name", default=None,
                   help="the server's Serve application, where several share the Ray cluster (raymoe serve --app-name)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description="Serve Mixtral-style MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate in this process (or with experts on Ray actors)")
    run.add_argument("--checkpoint", help="Hugging Face Mixtral directory (default: the demo model)")
    _add_dtype(run)
    _add_quantization(run)
    _add_sampling(run)
    remote = run.add_argument_group("remote experts (Ray actors)")
    remote.add_argument("--expert-actors", type=int, default=None, metavar="N",
                        help="run the experts on N Ray actors (a local Ray instance unless --address)")
    remote.add_argument("--expert-replicas", type=int, default=1, metavar="R",
                        help="copies of each expert, on different actors; their tokens are split")
    remote.add_argument("--actor-cpus", type=float, default=None,
                        help="CPUs per expert actor without GPUs (default: the free CPUs but one, shared)")
    remote.add_argument("--expert-timeout", type=float, default=60.0,
                        help="seconds to wait for an expert layer before failing (covers actor restarts)")
    remote.add_argument("--address", help="join this Ray cluster (e.g. auto or HOST:6379) instead of starting one")
    _add_expert_device(remote)

    srv = sub.add_parser("serve", help="serve the model (gRPC and OpenAI-compatible HTTP) on Ray")
    add_serve_args(srv)

    gen = sub.add_parser("generate", help="send a request to a running server (gRPC client)")
    gen.add_argument("--target", default="127.0.0.1:9000", help="HOST:PORT of the server")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument("--wait-ready", type=float, default=0, help="first wait up to N s for the server")
    gen.add_argument("--direct", action="store_true",
                     help="send the request straight to the front replicas' own gRPC ports (a server started "
                          "with --direct-ingress), found through --target, round robin: no proxy hop")
    _add_api_key(gen)
    gen.add_argument("--retries", type=int, default=5,
                     help="resume a stream broken by the server's side (replica lost, connection dropped) up to "
                          "N times, within --timeout; 0 = never")
    _add_sampling(gen)
    guided = gen.add_mutually_exclusive_group()
    guided.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid against this JSON schema file")
    guided.add_argument("--regex", help="the output matches this regular expression")
    guided.add_argument("--choice", action="append", help="the output is exactly one of these strings (repeatable)")

    st = sub.add_parser("status", help="expert actors, their health and load, and routing balance of a server")
    st.add_argument("--target", default="127.0.0.1:9000", help="HOST:PORT of the server")
    st.add_argument("--timeout", type=float, default=30.0)
    _add_api_key(st)

    ex = sub.add_parser("experts", help="where a server's experts run, and live changes to it (scale, rebalance)")
    ex.add_argument("action", nargs="?", choices=["show", "scale", "rebalance"], default="show",
                    help="show (default): the placement, its version and history; scale: grow or shrink the expert "
                         "actors to --actors N; rebalance: apply the plan for the load measured since the last one")
    ex.add_argument("--target", default="127.0.0.1:9000", help="HOST:PORT of the server")
    ex.add_argument("--actors", type=int, default=None, metavar="N", help="with scale: the number of expert actors")
    ex.add_argument("--json", action="store_true", help="print one JSON object")
    ex.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    _add_api_key(ex)

    init = sub.add_parser("init-model", help="write a random checkpoint of a named shape")
    init.add_argument("--preset", choices=["tiny", "small", "mixtral-shaped"], default="tiny",
                      help="tiny (tests), small (benchmarks), mixtral-shaped (Mixtral-8x7B's shapes; 2 layers "
                           "= 5.6 GB in bfloat16)")
    init.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--old-config", action="store_true", help="write rope_theta at the top level")
    init.add_argument("--shard-mb", type=float, default=None, help="split weights into shards of this size")
    init.add_argument("--dtype", choices=SERVED_DTYPES, default="float32",
                      help="stored weight type (config.json torch_dtype; what --dtype auto serves in)")
    init.add_argument("--router-skew", type=float, default=1.0, metavar="S",
                      help="scale the router rows of experts 0 and 1 by S, so that every layer prefers them "
                           "(a skewed expert load, e.g. for bench/bench_rebalance.py); 1 = as drawn")

    qz = sub.add_parser("quantize", help="write a checkpoint with int8 experts (loads without re-quantizing)")
    qz.add_argument("--checkpoint", required=True, help="Hugging Face Mixtral directory to read")
    qz.add_argument("--out", required=True, help="new directory: compressed-tensors int8 (pack-quantized) experts")

    train = sub.add_parser("train-demo", help="train the demo model (a tiny Mixtral that adds numbers)")
    train.add_argument("--out", required=True, help="checkpoint directory to write")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (default: as the shipped model)")
    train.add_argument("--batch-size", type=int, default=None, help="problems per step")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--log-every", type=int, default=None, help="print progress every N steps")
    train.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="stored weight type")
    train.add_argument("--eval-n", type=int, default=500, help="held-out problems scored at the end (0: skip)")

    ev = sub.add_parser("eval-demo", help="exact-match accuracy of the demo model on held-out additions")
    ev.add_argument("--checkpoint", help="checkpoint directory (default: the demo model)")
    ev.add_argument("--n", type=int, default=500, help="number of held-out problems")
    ev.add_argument("--seed", type=int, default=None, help="seed of the held-out problem stream")
    ev.add_argument("--batch-size", type=int, default=64, help="prompts generated together")
    _add_quantization(ev)
    where = ev.add_mutually_exclusive_group()
    where.add_argument("--target", help="score a running server at HOST:PORT instead (gRPC)")
    _add_api_key(ev)
    where.add_argument("--expert-actors", type=int, default=None, metavar="N",
                       help="run the experts on N Ray actors (a local Ray instance unless --address)")
    ev.add_argument("--address", help="with --expert-actors: join this Ray cluster")
    ev.add_argument("--actor-cpus", type=float, default=None, help="CPUs per expert actor without GPUs")
    _add_expert_device(ev)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "serve":  # check the settings, then say so at once, before the heavy imports
            try:
                settings_from_args(args)
            except ValueError as e:
                print(f"raymoe: {e}", file=sys.stderr)
                return 2
            print("raymoe: starting the server", file=sys.stderr, flush=True)
        return run_command(args)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling (e.g. during the imports)
        return 130


def exit_process(code: int) -> None:
    """End `python -m raymoe.cli.main` with `code`.

    CPython 3.11 ends a `-m` run by SIGINT at exit, whatever the module returned, once a
    KeyboardInterrupt has been raised inside an exec() or eval() of a string (a namedtuple or a
    dataclass being built, a type hint evaluated: Ray Serve does these while it deploys), even one
    caught and handled since: a Ctrl-C (or SIGTERM) that `serve` handled read as death by signal
    (-2, not 130 or 143). Each exec() of a string first clears that flag (pythonrun.c), so one that
    raises nothing, just before exiting, leaves the status ours; atexit handlers still run."""
    exec("pass")  # noqa: S102 — clears CPython's "unhandled KeyboardInterrupt" flag, see above
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
