"""Dense building blocks: RMSNorm, rotary embedding, grouped-query attention over a paged KV cache.

Legend for shape comments: T = packed new tokens of a step, B = sequences in the step,
Q = longest new-token run of a sequence, L = longest key run (cached + new), H = query heads,
Hkv = key/value heads, Dh = head dim, D = hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import row_stable
from .config import ModelConfig
from .step import AttentionGroup, StepLayout


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the scale, as the reference implementation does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables for given positions; computed once per step and shared by all layers."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Frequencies are always float32 (never a parameter, so casting the model cannot round them).
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = positions[:, None].float() * inv_freq.to(positions.device)  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]  # [T, 1, Dh]


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an integer index of any shape into x's first dimension, as one index_select:
    the same values, but on the CPU advanced indexing goes through a generic kernel: a decode step's
    key gather from a [3216, 2, 64] bf16 cache took 50 against 10 µs for [32, 56] rows and 295
    against 61 µs for [128, 80] (2 threads; 8 gathers a step in the `small` preset)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# Steps with at most this many queries per sequence (decode steps, Q = 1) compute attention
# explicitly (two batched matmuls): on a 2-core AVX-512 CPU that took 0.6-1.1× the fused kernel's
# time for Q = 1 (0.6× at 32 sequences of 64 keys, bfloat16 and float32, 8 and 32 heads), whose
# per-row setup dominates there. Prompt chunks take the fused kernel, which never materialises
# [B, H, Q, L]: explicit was 2-8× slower for Q >= 32 (bfloat16 2 x 512 queries over 2,048 keys:
# 113 ms against 9 ms per layer, which made the first steps of a long prompt 3-4× slower).
EXPLICIT_MAX_QUERIES = 16


def gather_heads(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src[index] for keys or values src [slots, Hkv, Dh] (the cache's view of its [Hkv, slots, Dh]
    storage, model/kv_cache.py) and index [B, L] → [Hkv, B, L, Dh], contiguous: one gather per key
    head over rows of one plane. As [B, L, Hkv, Dh] rows, attention needed them transposed to
    [B, Hkv, L, Dh], which its matmuls copied once more."""
    b, keys = index.shape
    return src.transpose(0, 1).index_select(1, index.reshape(-1)).view(src.shape[1], b, keys, src.shape[2])


def gathered_attention(q: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor, q_index: torch.Tensor,
                       kv_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of the queries q[q_index] ([B, Q] rows of q [T, H, Dh]) over the cache's
    keys and values k_src/v_src[kv_index] ([B, L] rows), mask [B, 1, Q, L] → [B*Q, H*Dh]; batched
    key head first, [Hkv·B], so the gathered keys and values are the matmuls' operands as they are.
    `small` in bfloat16, 16 sequences decoding, step time: 700 keys 24.0 → 20.5 ms, 2,000 keys
    35.0 → 29.1 ms (with the cache's head-major layout)."""
    b, nq = q_index.shape
    keys, (h, dh), hkv = kv_index.shape[1], q.shape[1:], k_src.shape[1]
    g = h // hkv
    qh = take_rows(q, q_index).view(b, nq, hkv, g, dh).permute(2, 0, 3, 1, 4).reshape(hkv * b, g * nq, dh)
    kh = gather_heads(k_src, kv_index).view(hkv * b, keys, dh)
    vh = gather_heads(v_src, kv_index).view(hkv * b, keys, dh)
    scores = torch.bmm(qh, kh.transpose(1, 2)) * dh ** -0.5  # [Hkv·B, G·Q, L]
    scores = scores.view(hkv, b, g, nq, keys).masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(hkv * b, g * nq, keys)
    out = torch.bmm(probs, vh).view(hkv, b, g, nq, dh)
    return out.permute(1, 3, 0, 2, 4).reshape(b * nq, h * dh)  # [B, Q, Hkv, G, Dh]: head = kv head · G + g


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.split = (q, kv, kv)
        # q, k and v projections fused into one matmul (loaded from the three HF tensors).
        self.wqkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=False)
        self.wo = nn.Linear(q, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, layout: StepLayout, rope: tuple[torch.Tensor, torch.Tensor],
                kv_store: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = row_stable.linear(x, self.wqkv.weight).split(self.split, dim=-1)
        q = apply_rotary(q.view(t, self.n_heads, self.head_dim), *rope)  # [T, H, Dh]
        k = apply_rotary(k.view(t, self.n_kv, self.head_dim), *rope)  # [T, Hkv, Dh]
        v = v.view(t, self.n_kv, self.head_dim)
        if kv_store is None:  # no cache (training, full recompute): keys are this step's tokens
            k_src, v_src = k, v
        else:  # write this step's keys into their cache slots, read every key from the cache
            k_src, v_src = kv_store
            k_src.index_copy_(0, layout.write_slots, k)
            v_src.index_copy_(0, layout.write_slots, v)
        outs = [self._attend(q, k_src, v_src, group) for group in layout.groups]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return row_stable.linear(take_rows(out, layout.unpad_index), self.wo.weight)  # [T, D]

    def _attend(self, q: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        """One attention group's output, flattened [B*Q, H*Dh]."""
        if group.q_index.shape[1] <= EXPLICIT_MAX_QUERIES and not row_stable.applies(q):
            return gathered_attention(q, k_src, v_src, group.q_index, group.kv_index, group.mask)
        qb = take_rows(q, group.q_index).transpose(1, 2)  # [B, H, Q, Dh]
        kb = gather_heads(k_src, group.kv_index).transpose(0, 1)  # [B, Hkv, L, Dh]
        vb = gather_heads(v_src, group.kv_index).transpose(0, 1)
        if row_stable.applies(qb):  # float32 prompt steps: every row independent of the step's shape
            out = row_stable.grouped_attention(qb, kb, vb, group.mask)
        else:  # prompt chunks: the fused kernel never materialises [B, H, Q, L]
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=group.mask, enable_gqa=self.n_kv != self.n_heads)
        return out.transpose(1, 2).reshape(-1, self.n_heads * self.head_dim)
