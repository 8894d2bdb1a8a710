"""Fewer distinct matmul shapes for bfloat16 / float16 on the CPU.

torch's CPU kernels for reduced precision (oneDNN) build a kernel the first time they meet a shape
and keep a bounded number of them. Measured on an AVX-512/AMX Xeon: an expert's SwiGLU of the
`small` preset costs 5.1 ms for a row count it has not seen and 1.4 ms for one it has; an attention
step's score and value matmuls 2.3 ms against 0.8 ms for a new key count. A server meets new row
counts all the time: tokens per step, rows per expert, sequences, queries and keys per sequence,
and their combinations keep missing the cache. Rounding such a count up to one of eight sizes per
power of two (at most 12.5% padding, exact up to 16) leaves 80 sizes up to 4,096, built once. In-process, `small` in bfloat16
with 24 sequences of random lengths in flight: 266 tok/s before, 343 with the buckets alone.
Row counts are bucketed in row_stable.linear and moe._swiglu_padded, attention shapes in step.py.

float32 on the CPU (MKL) and GPUs build nothing per shape: they are left alone. Padding rows are
zeros whose outputs are dropped, so every real row's math is the same (its rounding may differ, as
it does between any two step shapes in bfloat16: docs/prefix-cache.md).
"""

from __future__ import annotations

import torch

EXACT_UP_TO = 16
STEPS_PER_OCTAVE_LOG2 = 3  # 8 sizes per power of two


def applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def bucket(n: int) -> int:
    """n rounded up to the next size in the set: n itself up to 16, else a multiple of 1/8 of its octave."""
    if n <= EXACT_UP_TO:
        return n
    step = 1 << (n.bit_length() - 1 - STEPS_PER_OCTAVE_LOG2)
    return -(-n // step) * step

