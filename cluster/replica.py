"""What a front replica loads: the checkpoint's dense part, its experts (local or remote), the engine."""

from __future__ import annotations

from typing import Any, Callable

import torch

from model.default import default_checkpoint
from model.engine import Engine
from model.tokenizer import Tokenizer
from model.weights import Checkpoint, load_model

from .engine_loop import EngineLoop
from .settings import ServeSettings


def build_engine_loop(s: ServeSettings) -> tuple[EngineLoop, dict[str, Any]]:
    ckpt = Checkpoint(s.checkpoint or default_checkpoint())
    tokenizer = Tokenizer(ckpt.dir) if (ckpt.dir / "tokenizer.model").exists() else None
    factory, actors = None, _no_actors
    model = load_model(ckpt, dtype=getattr(torch, s.dtype), experts_factory=factory)
    engine = Engine(model, kv_cache_tokens=s.kv_cache_tokens, max_batch_tokens=s.max_batch_tokens,
                    max_running=s.max_running)
    return EngineLoop(engine, tokenizer, max_queue=s.max_queue), {"checkpoint": str(ckpt.dir), "actors": actors}


def _no_actors() -> list[dict[str, Any]]:
    return []


ActorsInfo = Callable[[], list[dict[str, Any]]]
