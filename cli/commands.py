"""What each `raymoe` command does, after parsing; user errors become one-line messages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .errors import UserError


def run_command(args: argparse.Namespace) -> int:
    from raymoe.model.config import ConfigError
    from raymoe.model.tokenizer import TokenizerError
    from raymoe.model.weights import CheckpointError

    from .serve import cmd_generate, cmd_serve
    from .experts import cmd_experts
    from .status import cmd_status

    handlers = {"run": cmd_run, "init-model": cmd_init_model, "serve": cmd_serve, "generate": cmd_generate,
                "train-demo": cmd_train_demo, "quantize": cmd_quantize, "eval-demo": cmd_eval_demo, "status": cmd_status,
                "experts": cmd_experts}
    try:
        return handlers[args.command](args)
    except (UserError, ConfigError, CheckpointError, TokenizerError, ValueError) as e:
        print(f"raymoe: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be written or read (2); a server that did not answer in time (1)
        print(f"raymoe: {e}", file=sys.stderr)
        return 1 if isinstance(e, TimeoutError) else 2
    except KeyboardInterrupt:
        return 130


def sampling_from_args(args: argparse.Namespace, room: int):
    """The sampling flags; without --max-tokens, the default of a request that sets none (`room`:
    the tokens the context leaves after the prompt)."""
    from raymoe.model.sampling import SamplingParams, default_max_tokens

    max_tokens = default_max_tokens(room) if args.max_tokens is None else args.max_tokens
    params = SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p,
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
    from raymoe.model.tokenizer import Tokenizer

    if not (Path(directory) / "tokenizer.model").exists() and not required:
        return None
    return Tokenizer(directory)


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from raymoe.model.completion import complete
    from raymoe.model.config import resolve_dtype
    from raymoe.model.default import default_checkpoint
    from raymoe.model.engine import Engine
    from raymoe.model.weights import Checkpoint, load_model

    ckpt = Checkpoint(args.checkpoint or default_checkpoint())
    args.dtype = resolve_dtype(args.dtype, ckpt.config, "cpu")  # the expert actors load in the same dtype
    tokenizer = load_tokenizer(ckpt.dir, required=args.prompt is not None)
    prompt = prompt_from_args(args, tokenizer)
    params = sampling_from_args(args, room=ckpt.config.max_position_embeddings - len(prompt))
    from .ray_session import experts_factory_from_args

    from raymoe.model.progress import LoadProgress, progress_line

    from .progress import Ticker

    with experts_factory_from_args(args, ckpt.dir) as factory:  # None: every expert in this process
        loading = LoadProgress(0, what="dense part" if factory else "weights")
        with Ticker(lambda: None if loading.state == "READY" or not loading.total_bytes else
                    f"raymoe: loading {loading.what}: {progress_line([loading.snapshot()])}"):
            model = load_model(ckpt, dtype=getattr(torch, args.dtype), experts_factory=factory, progress=loading,
                               quantization=args.quantization)
        if factory is not None:
            factory.wait_loaded()  # the expert actors loaded meanwhile
        # Sized for this one request, but never past the context: an oversized request is then
        # refused by Engine.check with its message instead of allocating a huge cache.
        engine = Engine(model, kv_cache_tokens=min(len(prompt) + params.max_tokens, ckpt.config.max_position_embeddings))
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
    import torch

    from raymoe.model.presets import init_checkpoint

    shard = None if args.shard_mb is None else int(args.shard_mb * 2**20)
    if args.layers is not None and args.layers < 1:
        raise UserError(f"--layers must be at least 1 (got {args.layers})")
    if not args.router_skew > 0:
        raise UserError(f"--router-skew must be positive (got {args.router_skew})")
    out = init_checkpoint(args.preset, args.out, seed=args.seed, new_style_config=not args.old_config,
                          max_shard_bytes=shard, dtype=getattr(torch, args.dtype), layers=args.layers,
                          router_skew=args.router_skew)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    import torch

    from raymoe.model.demo import TrainConfig, evaluate, train_demo

    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "threads", "log_every")
                 if getattr(args, k) is not None}
    for k, v in overrides.items():
        if v <= 0:
            raise UserError(f"--{k.replace('_', '-')} must be positive (got {v})")
    tc = dataclasses.replace(TrainConfig(seed=args.seed), **overrides)
    result = train_demo(args.out, tc, dtype=getattr(torch, args.dtype),
                        log=lambda line: print(line, flush=True))
    print(f"trained {result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss:.4f}; "
          f"wrote {args.out}", flush=True)
    if args.eval_n > 0:
        print_eval(evaluate(args.out, n=args.eval_n))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from raymoe.model.progress import progress_line
    from raymoe.model.quantize_checkpoint import quantize_checkpoint

    from .progress import Ticker

    seen: list = []
    with Ticker(lambda: f"raymoe: quantizing: {progress_line([seen[-1].snapshot()])}" if seen else None):
        out = quantize_checkpoint(args.checkpoint, args.out, on_progress=seen.append)
    print(f"wrote {out}: experts int8 per output channel (compressed-tensors pack-quantized); "
          f"serve it as it is (--quantization experts_int8 is implied)")
    return 0


def cmd_eval_demo(args: argparse.Namespace) -> int:
    from raymoe.model.default import default_checkpoint
    from raymoe.model.demo import EVAL_SEED, evaluate

    if args.n < 1 or args.batch_size < 1:
        raise UserError("--n and --batch-size must be positive")
    checkpoint = args.checkpoint or default_checkpoint()
    seed = EVAL_SEED if args.seed is None else args.seed
    if args.target:
        from .demo_eval import server_generate

        generate = server_generate(args.target, api_key=args.api_key, app=args.app_name)
        print_eval(evaluate(checkpoint, n=args.n, seed=seed, generate=generate))
    elif args.expert_actors is not None:
        from .demo_eval import remote_experts_generate

        with remote_experts_generate(checkpoint, args, batch_size=args.batch_size) as generate:
            print_eval(evaluate(checkpoint, n=args.n, seed=seed, generate=generate))
    else:
        print_eval(evaluate(checkpoint, n=args.n, seed=seed, batch_size=args.batch_size, quantization=args.quantization))
    return 0


def print_eval(result) -> None:
    for prompt, expected, got in result.errors[:5]:
        print(f"  wrong: {prompt}{got.strip()!r} (expected {expected})")
    print(f"accuracy {result.accuracy:.1%} ({result.correct}/{result.n} held-out problems, exact match) "
          f"in {result.seconds:.1f}s")
