"""The Mixtral decoder: embeddings, N × (attention + sparse MoE), final norm, lm_head.

Plain math over packed tokens; the step layout (model/step.py) says how tokens group into
sequences and where their keys live. The model never knows where its experts run.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import row_stable
from .config import ModelConfig
from .kv_cache import PagedKVCache
from .layers import Attention, RMSNorm, Rotary
from .moe import Experts, LocalExperts, MoEBlock, RouteObserver
from .step import StepLayout

ExpertsFactory = Callable[[int], Experts | None]  # layer index → that layer's experts


def local_experts_factory(cfg: ModelConfig) -> ExpertsFactory:
    return lambda layer: LocalExperts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: Experts | None, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = MoEBlock(cfg, experts, layer)

    def forward(self, x: torch.Tensor, layout: StepLayout, rope: tuple[torch.Tensor, torch.Tensor],
                kv_store: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h = self.attend(x, layout, rope, kv_store)
        return h + self.moe(self.post_attention_layernorm(h))

    def attend(self, x: torch.Tensor, layout: StepLayout, rope: tuple[torch.Tensor, torch.Tensor],
               kv_store: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The attention half (with its residual); the MoE half is `moe.start(post_attention_layernorm(h))`."""
        return x + self.attn(self.input_layernorm(x), layout, rope, kv_store)


class Mixtral(nn.Module):
    def __init__(self, cfg: ModelConfig, experts_factory: ExpertsFactory | None = None) -> None:
        """experts_factory=None builds all experts locally; a factory returning None leaves them unset."""
        super().__init__()
        self.cfg = cfg
        factory = experts_factory or local_experts_factory(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, factory(i), i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, tokens: torch.Tensor, layout: StepLayout, cache: PagedKVCache | None = None) -> torch.Tensor:
        """tokens [T] packed → final hidden states [T, D] (after the last norm)."""
        x = self.embed_tokens(tokens)
        rope = self.rotary(layout.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, layout, rope, None if cache is None else cache.store(i))
        return self.norm(x)

    def forward_micro(self, parts: list[tuple[torch.Tensor, StepLayout]], cache: PagedKVCache | None = None
                      ) -> list[torch.Tensor]:
        """Several micro-batches, pipelined layer by layer: while one part's experts run (on expert
        actors), the next part's attention runs here. Same math as `forward` on each part alone.

        Order for parts A, B: attend A0 → start A0's experts → attend B0 → start B0 → finish A0 →
        attend A1 (B0's experts still running) → start A1 → finish B0 → attend B1 → ...
        """
        xs = [self.embed_tokens(tokens) for tokens, _ in parts]
        ropes = [self.rotary(layout.positions, x.dtype) for x, (_, layout) in zip(xs, parts)]
        hs: list[torch.Tensor | None] = [None] * len(parts)
        pending: list = [None] * len(parts)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.store(i)
            for j, (_, layout) in enumerate(parts):
                if pending[j] is not None:  # finish part j's previous layer
                    xs[j] = hs[j] + pending[j].result()
                hs[j] = layer.attend(xs[j], layout, ropes[j], kv)
                pending[j] = layer.moe.start(layer.post_attention_layernorm(hs[j]))
        return [self.norm(h + p.result()) for h, p in zip(hs, pending)]

    def set_route_observer(self, observer: RouteObserver | None) -> None:
        """Call `observer(layer, idx)` with every MoE layer's routing decisions (for metrics)."""
        for layer in self.layers:
            layer.moe.observer = observer

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return row_stable.linear(hidden, self.lm_head.weight).float()
