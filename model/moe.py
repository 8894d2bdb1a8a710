"""Sparse MoE: router → dispatch → experts → combine, with the experts behind one seam.

The MoE block calls `experts(x, weights, idx)` and nothing else. `LocalExperts` (all experts in
this process) is the reference; remote implementations (actors/) must give the same numbers.
Legend: T = tokens, D = hidden, F = expert intermediate size, E = experts, K = experts per token.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import row_stable, shape_buckets
from .config import ModelConfig
from .quant import Int8Stack, swiglu_grouped_int8


class Experts(Protocol):
    """The seam: weighted sum over each token's routed experts."""

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights [T, K] (float32, rows sum to 1), idx [T, K] expert ids → [T, D]."""
        ...


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G(x) = Softmax(TopK(x·Wg)): softmax in float32, keep the top k, renormalise (as HF does)."""
    probs = torch.softmax(row_stable.linear(x, gate_weight).float(), dim=-1)  # [T, E]
    weights, idx = torch.topk(probs, top_k, dim=-1)  # [T, K]
    return weights / weights.sum(dim=-1, keepdim=True), idx


def sort_by_expert(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Order of the flattened (token, slot) pairs grouped by expert, and each expert's count."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, counts


def swiglu_grouped(xs: torch.Tensor, counts: list[int], w13: torch.Tensor | Int8Stack,
                   w2: torch.Tensor | Int8Stack) -> torch.Tensor:
    """Rows of xs [N, D] grouped by expert (counts[e] rows for expert e) → SwiGLU outputs [N, D].

    One matmul per expert over all of its rows: w13 [E, 2F, D] holds w1 (gate) and w3 (up)
    stacked, w2 [E, D, F] projects down. The loop is over experts, never over tokens. Int8 stacks
    (model/quant.py) take the int8 kernels.
    """
    if isinstance(w13, Int8Stack):
        return swiglu_grouped_int8(xs, counts, w13, w2)
    # (float32 on the CPU keeps to the loop: one row-stable matmul per expert, model/row_stable.py)
    if (len(counts) > 1 and min(counts) > 0 and max(counts) * len(counts) <= 2 * sum(counts)
            and not row_stable.applies(xs)):
        return _swiglu_padded(xs, counts, w13, w2)
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = xs[start:start + n]
            gate, up = row_stable.linear(rows, w13[e]).chunk(2, dim=-1)
            out[start:start + n] = row_stable.linear(F.silu(gate) * up, w2[e])
            start += n
    return out


def _swiglu_padded(xs: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Every expert has rows and none has more than twice its share (large decode batches): pad to
    [E, C, D] and run two batched matmuls, which stream each expert's weights once with less
    per-call overhead than E separate ones. Same math as the loop; padding rows are dropped.

    The products are taken weights-first, W · xᵀ ([E, out, C]), with the weights in their stored
    [out, in] layout: `bmm(x, w.transpose(1, 2))` gets a transposed view of every expert's weights,
    which the CPU kernels handle 1.3–2× slower (bf16, 8 experts of the `small` preset, 2 threads:
    44 rows each 5.04 against 2.51 ms, 128 rows 7.03 against 4.82; 2 experts 0.96 against 0.74)."""
    e, c = len(counts), max(counts)
    if shape_buckets.applies(xs):
        c = shape_buckets.bucket(c)
    # each row's place in [E·C]: expert e's rows fill slots [e·C, e·C + counts[e]) (built in numpy
    # from the counts, a list: torch's repeat_interleave over a tensor of sizes cost more than the rest)
    sizes = np.asarray(counts)
    place = np.arange(xs.shape[0]) + np.repeat(np.arange(e) * c - (np.cumsum(sizes) - sizes), sizes)
    place = torch.from_numpy(place).to(xs.device)
    padded = xs.new_zeros(e * c, xs.shape[1]).index_copy_(0, place, xs).view(e, c, -1)
    gate, up = torch.bmm(w13, padded.transpose(1, 2)).chunk(2, dim=1)  # [E, F, C] each
    out = torch.bmm(w2, F.silu(gate) * up)  # [E, D, C]
    return out.transpose(1, 2).reshape(e * c, -1).index_select(0, place)  # back to rows


def combine(out_rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, num_tokens: int,
            top_k: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs (rows in `order`): un-permute, then sum its K rows.

    A plain gather + sum instead of a scatter-add (index_add_ was the slowest op of a CPU decode step).
    """
    w = weights.reshape(-1)[order]  # float32: the product is rounded once, as in the reference
    weighted = (out_rows * w[:, None]).to(out_rows.dtype)
    unsorted = torch.empty_like(weighted)
    unsorted[order] = weighted  # [T*K, D] back in (token, slot) order
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1)


class LocalExperts(nn.Module):
    """All of a layer's experts in this process: the reference implementation of the seam."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return local_forward(x, weights, idx, self.num_experts, self.w13, self.w2)


def local_forward(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, num_experts: int,
                  w13: torch.Tensor | Int8Stack, w2: torch.Tensor | Int8Stack) -> torch.Tensor:
    top_k = idx.shape[1]
    order, counts = sort_by_expert(idx, num_experts)
    out_rows = swiglu_grouped(x.index_select(0, order // top_k), counts, w13, w2)  # [T*K, D]
    return combine(out_rows, order, weights, x.shape[0], top_k)


class Int8LocalExperts(nn.Module):
    """All of a layer's experts in this process as int8 with per-output-channel scales
    (`experts_int8`): buffers, so that `.to(device)` moves them and no optimizer sees them."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, scale_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("w13_q", torch.empty(num_experts, 2 * intermediate, hidden, dtype=torch.int8))
        self.register_buffer("w13_scale", torch.empty(num_experts, 2 * intermediate, dtype=scale_dtype))
        self.register_buffer("w2_q", torch.empty(num_experts, hidden, intermediate, dtype=torch.int8))
        self.register_buffer("w2_scale", torch.empty(num_experts, hidden, dtype=scale_dtype))

    @property
    def w13(self) -> Int8Stack:
        return Int8Stack(self.w13_q, self.w13_scale)

    @property
    def w2(self) -> Int8Stack:
        return Int8Stack(self.w2_q, self.w2_scale)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return local_forward(x, weights, idx, self.num_experts, self.w13, self.w2)


RouteObserver = Callable[[int, torch.Tensor], None]  # (layer, idx [T, K]) — e.g. metrics, never math


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: Experts | None, layer: int = 0) -> None:
        super().__init__()
        self.top_k, self.layer = cfg.num_experts_per_tok, layer
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = experts  # set later when the experts live elsewhere
        self.observer: RouteObserver | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.start(x).result()

    def start(self, x: torch.Tensor) -> "PendingExperts":
        """Route and start the experts; `.result()` gives [T, D]. Experts with a split API (remote
        ones: `dispatch(x, weights, idx) -> pending`) run meanwhile; others compute right here."""
        weights, idx = route(x, self.gate.weight, self.top_k)
        if self.observer is not None:
            self.observer(self.layer, idx)
        if self.experts is None:
            raise RuntimeError("this model was built without experts; attach an Experts implementation")
        dispatch = getattr(self.experts, "dispatch", None)
        return dispatch(x, weights, idx) if dispatch is not None else Done(self.experts(x, weights, idx))


class PendingExperts(Protocol):
    def result(self) -> torch.Tensor: ...


class Done:
    """An expert result computed synchronously, behind the same `.result()` as a remote one."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out

    def result(self) -> torch.Tensor:
        return self.out
