"""What a front replica loads: the checkpoint's dense part, its experts (local or remote), the engine."""

from __future__ import annotations

from typing import Any

import torch

from model.default import default_checkpoint
from model.engine import Engine
from model.tokenizer import Tokenizer
from model.weights import Checkpoint, load_model

from .engine_loop import EngineLoop
from .metrics import ServingMetrics
from .settings import ServeSettings


def build_engine_loop(s: ServeSettings) -> tuple[EngineLoop, dict[str, Any]]:
    torch.set_num_threads(max(1, int(s.replica_num_cpus)))  # the replica's CPU share, not the host's cores
    ckpt = Checkpoint(s.checkpoint or default_checkpoint())
    tokenizer = Tokenizer(ckpt.dir) if (ckpt.dir / "tokenizer.model").exists() else None
    factory, actors = None, (lambda: [])
    pool_config = s.pool_config()
    if pool_config is not None:
        from actors.pool_host import shared_pool
        from actors.remote_experts import remote_experts_factory

        pool = shared_pool(str(ckpt.dir.resolve()), pool_config)
        factory, actors = remote_experts_factory(pool), (lambda: actor_infos(pool))
    model = load_model(ckpt, dtype=getattr(torch, s.dtype), experts_factory=factory)
    engine = Engine(model, kv_cache_tokens=s.kv_cache_tokens, max_batch_tokens=s.max_batch_tokens,
                    max_running=s.max_running, micro_batches=s.effective_micro_batches)
    metrics = ServingMetrics(model.cfg.num_hidden_layers, model.cfg.num_local_experts)
    loop = EngineLoop(engine, tokenizer, max_queue=s.max_queue, metrics=metrics)
    return loop, {"checkpoint": str(ckpt.dir), "actors": actors}


def actor_infos(pool) -> list[dict[str, Any]]:
    """Each expert actor as ModelInfo reports it; an actor that does not answer is UNREACHABLE."""
    import ray

    out = []
    for spec, actor in zip(pool.placement.actors, pool.actors):
        info = {"name": spec.name, "experts": list(spec.experts), "layers": list(spec.layers), "state": "UNREACHABLE"}
        try:
            st = ray.get(actor.stats.remote(), timeout=5)
            info.update(state="ALIVE", node_id=st["node_id"],
                        weight_bytes=st["weight_bytes"], tokens_processed=st["tokens"], device=st["device"])
        except Exception:  # noqa: BLE001 — dead, restarting or hung: report, never fail ModelInfo
            pass
        out.append(info)
    return out
