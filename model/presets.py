"""Named model shapes and randomly initialised checkpoints (`raymoe init-model`).

`tiny` loads in well under a second and is what tests use; `small` (≈95M parameters, hidden 512,
8 experts, top-2, 4 layers) is for benchmarks; `mixtral-shaped` has Mixtral-8x7B's shapes (hidden
4096, FFN 14336, 32/8 heads, 8 experts, 32k vocabulary) with 2 layers by default (5.6 GB in
bfloat16; `layers=` sets more), for measuring loading, memory and GPUs at scale. Weights are N(0, 0.02) from a seed, norms are one,
and the tokenizer is trained with sentencepiece on text the project generates (model/synthetic.py).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig
from .export import save_checkpoint
from .synthetic import corpus
from .tokenizer import train_tokenizer
from .transformer import Mixtral

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=2048),
    "small": ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=4096),
    "mixtral-shaped": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                  num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                  num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6),
}


CHUNK_ELEMENTS = 1 << 26  # larger parameters are drawn in pieces (tiny, small and demo stay as drawn whole)


def random_model(cfg: ModelConfig, seed: int, std: float = 0.02, *, scale_outputs: bool = False,
                 dtype: torch.dtype = torch.float32) -> Mixtral:
    """N(0, std) weights, norms one, for inference. scale_outputs divides the std of the residual
    output projections (attention out, expert down) by sqrt(2 · layers), the usual init for training.
    The weights are drawn in float32 and stored in `dtype`, one tensor at a time (a large model is
    never held in float32 whole)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Mixtral(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    if cfg.tie_word_embeddings:  # materialising from meta unties shared parameters
        model.lm_head.weight = model.embed_tokens.weight
    out_std = std / math.sqrt(2 * cfg.num_hidden_layers) if scale_outputs else std
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = out_std if name.endswith(("attn.wo.weight", "experts.w2")) else std
                if p.numel() <= CHUNK_ELEMENTS:
                    p.copy_(torch.randn(p.shape, generator=g) * s)
                else:  # a Mixtral-sized tensor: draw it row block by row block
                    for rows in p.split(max(1, CHUNK_ELEMENTS // max(1, p[0].numel()))):
                        rows.copy_(torch.randn(rows.shape, generator=g) * s)
    return model.eval().requires_grad_(False)


def skew_router(model: Mixtral, factor: float, hot: int = 2) -> Mixtral:
    """Make every layer's router prefer experts 0..hot-1: their gate rows are scaled by `factor`, so
    their logits spread wider and win the top-k far more often than 1 in E (a skewed load, as real
    routers show, for the rebalancing benchmark)."""
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.weight[:hot] *= factor
    return model


def init_checkpoint(preset: str, out_dir: str | Path, *, seed: int = 0, new_style_config: bool = True,
                    max_shard_bytes: int | None = None, dtype: torch.dtype = torch.float32,
                    layers: int | None = None, router_skew: float = 1.0) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset] if layers is None else dataclasses.replace(PRESETS[preset], num_hidden_layers=layers)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(corpus(seed, 4000), Path(tmp) / "tokenizer.model", cfg.vocab_size)
        if tok.vocab_size > cfg.vocab_size:  # the embedding table may be padded, never short
            raise RuntimeError(f"tokenizer training gave {tok.vocab_size} pieces, more than {cfg.vocab_size}")
        model = random_model(cfg, seed, dtype=dtype)
        if router_skew != 1.0:
            skew_router(model, router_skew)
        return save_checkpoint(model, out_dir, tokenizer=tok.path,
                               new_style_config=new_style_config, max_shard_bytes=max_shard_bytes, dtype=dtype)
