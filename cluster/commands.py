"""What each `raymoe` command does, after parsing; user errors become one-line messages."""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class UserError(Exception):
    """Ends the command with `raymoe: <message>` and exit status 2."""


def run_command(args: argparse.Namespace) -> int:
    from model.config import ConfigError
    from model.tokenizer import TokenizerError
    from model.weights import CheckpointError

    handlers = {"run": cmd_run, "init-model": cmd_init_model}
    try:
        return handlers[args.command](args)
    except (UserError, ConfigError, CheckpointError, TokenizerError, ValueError) as e:
        print(f"raymoe: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def sampling_from_args(args: argparse.Namespace):
    from model.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, logprobs=args.logprobs, ignore_eos=args.ignore_eos)
    params.validate()
    return params


def prompt_from_args(args: argparse.Namespace, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers (got {args.prompt_ids!r})") from None
    if tokenizer is None:
        raise UserError("this checkpoint has no tokenizer.model; pass --prompt-ids instead of --prompt")
    if not args.prompt:
        raise UserError("--prompt is empty")
    return tokenizer.encode(args.prompt)


def load_tokenizer(directory, required: bool):
    from pathlib import Path

    from model.tokenizer import Tokenizer

    if not (Path(directory) / "tokenizer.model").exists() and not required:
        return None
    return Tokenizer(directory)


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from model.completion import complete
    from model.default import default_checkpoint
    from model.engine import Engine
    from model.weights import Checkpoint, load_model

    ckpt = Checkpoint(args.checkpoint or default_checkpoint())
    params = sampling_from_args(args)
    tokenizer = load_tokenizer(ckpt.dir, required=args.prompt is not None)
    prompt = prompt_from_args(args, tokenizer)
    model = load_model(ckpt, dtype=getattr(torch, DTYPES[args.dtype]))
    engine = Engine(model, kv_cache_tokens=len(prompt) + params.max_tokens)
    stream = None if args.json or tokenizer is None else (lambda i, text: print(text, end="", flush=True))
    [result] = complete(engine, tokenizer, [prompt], [params], [args.stop], on_text=stream)
    if args.json:
        print(json.dumps(result.to_json()))
    elif tokenizer is None:
        print(" ".join(map(str, result.token_ids)))
    else:
        print()
    return 0


def cmd_init_model(args: argparse.Namespace) -> int:
    from model.presets import init_checkpoint

    shard = None if args.shard_mb is None else int(args.shard_mb * 2**20)
    out = init_checkpoint(args.preset, args.out, seed=args.seed, new_style_config=not args.old_config,
                          max_shard_bytes=shard)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0
