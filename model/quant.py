"""Int8 weight-only experts (`experts_int8`, vLLM's name): w1, w3 and w2 as int8 with one scale per
output channel (symmetric: w ≈ q · scale, q in [-127, 127]); activations stay in the model dtype.

Decode streams every routed expert's weights from memory once per step, so half the bytes is both
half the memory and, where the matmul is memory-bound, up to twice the speed. On CPU the grouped
SwiGLU runs `torch._weight_int8pack_mm` (int8 weights, per-channel scales, bf16/fp16/fp32
activations), measured fastest of the CPU options (docs/quantization.md); elsewhere (GPU) each
expert's weights are dequantized for its matmul, which works on any device.

Quantizing happens tensor by tensor as a checkpoint is read (model/weights.py), in row chunks, so
loading never holds more than one expert tensor in the checkpoint's dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .config import check_quantization  # noqa: F401 — callers import it from here too

QUANT_CHUNK_ROWS = 1024  # rows quantized at once: bounds the float32 temporary to 1024 × D


class Int8Stack:
    """Weights of several experts [E, N, K] as int8 `q` with scales [E, N] (one per output row).

    Behaves like the float stack it replaces where the expert actor and LocalExperts touch one:
    indexing picks experts, `.to(device)` moves, `nbytes` counts the stored bytes."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        if q.dtype != torch.int8 or q.shape[:-1] != scale.shape:
            raise ValueError(f"int8 weights {tuple(q.shape)} {q.dtype} need one scale per row (got {tuple(scale.shape)})")
        self.q, self.scale = q, scale

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def __getitem__(self, i) -> "Int8Stack":
        return Int8Stack(self.q[i], self.scale[i])

    def to(self, device) -> "Int8Stack":
        return Int8Stack(self.q.to(device), self.scale.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weights these int8 values stand for (the reference the int8 kernels are tested against)."""
        return (self.q.to(torch.float32) * self.scale.to(torch.float32)[..., None]).to(dtype)


def weight_nbytes(w: torch.Tensor | Int8Stack) -> int:
    return w.nbytes if isinstance(w, Int8Stack) else w.numel() * w.element_size()


def stack_experts(parts: Sequence[torch.Tensor | Int8Stack]) -> torch.Tensor | Int8Stack:
    """torch.stack for float or int8 expert weights (one expert each)."""
    if parts and isinstance(parts[0], Int8Stack):
        return Int8Stack(torch.stack([p.q for p in parts]), torch.stack([p.scale for p in parts]))
    return torch.stack(list(parts))


def quantize_rows_into(w: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """Quantize w [N, K] per row into q_out [N, K] int8 and scale_out [N] (its dtype: the serving one).

    The scale is rounded to scale_out's dtype before dividing, so q · scale (what the kernels
    compute) is the nearest int8 grid point under the scale actually stored."""
    for start in range(0, w.shape[0], QUANT_CHUNK_ROWS):
        rows = w[start:start + QUANT_CHUNK_ROWS].to(torch.float32, copy=True)  # the one temporary, worked in place
        low, high = torch.aminmax(rows, dim=1)
        scale = (torch.maximum(-low, high) / 127.0).clamp_min(torch.finfo(torch.float32).tiny).to(scale_out.dtype)
        q_out[start:start + rows.shape[0]] = rows.div_(scale.to(torch.float32)[:, None]).round_().clamp_(-127, 127)
        scale_out[start:start + rows.shape[0]] = scale


def quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> Int8Stack:
    """w [..., N, K] → Int8Stack (used by tests and small models; loading quantizes in place)."""
    flat = w.reshape(-1, w.shape[-1])
    q = torch.empty(flat.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(flat.shape[0], dtype=scale_dtype, device=w.device)
    quantize_rows_into(flat, q, scale)
    return Int8Stack(q.view(w.shape), scale.view(w.shape[:-1]))


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] · (q [N, K] · scale [N])ᵀ → [M, N] in x's dtype.

    CPU: torch._weight_int8pack_mm reads the int8 weights directly (it wants the scales in x's dtype).
    Other devices: dequantize this one expert's weights for the matmul (a temporary of one expert)."""
    if scale.dtype != x.dtype:
        scale = scale.to(x.dtype)
    if x.device.type == "cpu":
        return torch._weight_int8pack_mm(x.contiguous(), q, scale)
    return F.linear(x, q.to(x.dtype)) * scale


def swiglu_grouped_int8(xs: torch.Tensor, counts: list[int], w13: Int8Stack, w2: Int8Stack) -> torch.Tensor:
    """swiglu_grouped (model/moe.py) over int8 experts: one int8 matmul per expert and projection,
    over all rows routed to it; the loop is over experts, never over tokens."""
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = xs[start:start + n]
            gate, up = int8_linear(rows, w13.q[e], w13.scale[e]).chunk(2, dim=-1)
            out[start:start + n] = int8_linear(F.silu(gate) * up, w2.q[e], w2.scale[e])
            start += n
    return out
