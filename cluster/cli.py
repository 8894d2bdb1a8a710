"""`raymoe` command line: argument parsing only; each command's work lives in its own module.

Errors a user can fix (bad checkpoint, bad flag value) end the command with a one-line message
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


def _add_sampling(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the checkpoint's tokenizer, BOS first)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,415,2936")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--logprobs", type=int, default=0, help="also report the top-N alternatives per token")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description="Serve Mixtral-style MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate in this process (or with experts on Ray actors)")
    run.add_argument("--checkpoint", help="Hugging Face Mixtral directory (default: the demo model)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    _add_sampling(run)

    init = sub.add_parser("init-model", help="write a random checkpoint of a named shape")
    init.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--old-config", action="store_true", help="write rope_theta at the top level")
    init.add_argument("--shard-mb", type=float, default=None, help="split weights into shards of this size")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .commands import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
