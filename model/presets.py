"""Named model shapes and randomly initialised checkpoints (`raymoe init-model`).

`tiny` loads in well under a second and is what tests use; `small` (≈95M parameters, hidden 512,
8 experts, top-2, 4 layers) is for benchmarks. Weights are N(0, 0.02) from a seed, norms are one,
and the tokenizer is trained with sentencepiece on text the project generates (model/synthetic.py).
"""

from __future__ import annotations

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
}


def random_model(cfg: ModelConfig, seed: int, std: float = 0.02, *, scale_outputs: bool = False) -> Mixtral:
    """N(0, std) weights, norms one, for inference. scale_outputs divides the std of the residual
    output projections (attention out, expert down) by sqrt(2 · layers), the usual init for training."""
    g = torch.Generator().manual_seed(seed)
    model = Mixtral(cfg)
    out_std = std / math.sqrt(2 * cfg.num_hidden_layers) if scale_outputs else std
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = out_std if name.endswith(("attn.wo.weight", "experts.w2")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)
    return model.eval().requires_grad_(False)


def init_checkpoint(preset: str, out_dir: str | Path, *, seed: int = 0, new_style_config: bool = True,
                    max_shard_bytes: int | None = None, dtype: torch.dtype = torch.float32) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(corpus(seed, 4000), Path(tmp) / "tokenizer.model", cfg.vocab_size)
        if tok.vocab_size > cfg.vocab_size:  # the embedding table may be padded, never short
            raise RuntimeError(f"tokenizer training gave {tok.vocab_size} pieces, more than {cfg.vocab_size}")
        return save_checkpoint(random_model(cfg, seed), out_dir, tokenizer=tok.path,
                               new_style_config=new_style_config, max_shard_bytes=max_shard_bytes, dtype=dtype)
