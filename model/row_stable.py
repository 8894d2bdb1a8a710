"""Row-stable float32 math on the CPU: a token's numbers do not depend on what else is in its step.

Why: a prefix-cache hit computes only the tail of a prompt, in a smaller step than the miss that
computes it whole, and the cached keys came from yet another step (a different prompt of another
length). For the hit to give the miss's logprobs bit for bit, every row of every op must come out
the same whatever the number of rows, keys or sequences in the call. Measured on this torch/MKL
(tests/test_row_stable.py checks it on the machine the tests run on):

* a matmul's row is the same for any row count M >= 12, but not for M < 12 (MKL takes other
  kernels for small M: 1-3 rows with one thread, 1-11 with two). So float32 matmuls of fewer than
  MIN_ROWS rows are computed on MIN_ROWS rows, zero-padded.
* a matmul reduces its K axis in blocks whose split depends on K (beyond ~100), so attention's
  probs @ values — K = the number of keys, which differs between a hit's step and a miss's — is
  summed over fixed KEY_CHUNK-key slices, one matmul each, added in order. A slice past a query's
  position adds exact zeros.
* the score matmul's columns and softmax's row differ for fewer than 8-12 keys, so keys are padded
  to a multiple of KEY_CHUNK (masked: exp(-inf) = 0).

Only float32 on the CPU takes these paths, and only in steps that compute prompt tokens: that is
where a hit and a miss differ (the hit's tail, the keys it reuses). Steps that only decode (every
sequence feeds back its last sampled token) run inside `fast_kernels()` (the engine decides), so
decoding — the bulk of a stream — keeps the fastest kernels; a hit and a miss decode in the same
shapes anyway. bfloat16 and other devices always keep the fastest kernels, whose rounding depends on
the step's shape (docs/prefix-cache.md).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn.functional as F

from . import shape_buckets

MIN_ROWS = 16  # matmuls with at least 12 rows give every row the same bits (16: a margin)
KEY_CHUNK = 64  # keys per slice of the attention sum; also what key runs are padded to
SCORES_MAX = 1 << 24  # score elements per call: longer prompts are computed in query chunks


_state = threading.local()  # the engine steps on its own thread; expert actors never set it


def applies(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not getattr(_state, "fast", False)


@contextlib.contextmanager
def fast_kernels(enabled: bool = True) -> Iterator[None]:
    """Within: this thread's matmuls take the fastest kernels (rows may depend on the step's shape)."""
    before = getattr(_state, "fast", False)
    _state.fast = enabled
    try:
        yield
    finally:
        _state.fast = before


def pad_rows(x: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """x with zero rows appended along `dim` up to `rows` (unchanged if it has enough)."""
    missing = rows - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x [M, K]; in float32 on the CPU every row as a >= MIN_ROWS-row call gives
    it; in bfloat16/float16 on the CPU computed on a bucketed row count (model/shape_buckets.py), and
    for a few rows of bfloat16 weights-first (see _weights_first)."""
    m = x.shape[0]
    if applies(x):
        rows = max(m, MIN_ROWS)
    elif shape_buckets.applies(x):
        rows = shape_buckets.bucket(m)
        if 0 < rows <= WEIGHTS_FIRST_MAX_ROWS and x.dtype == torch.bfloat16 and weight.numel() >= WEIGHTS_FIRST_MIN_ELEMENTS:
            return _weights_first(x, weight, max(rows, 2))
    else:
        rows = m
    if rows == m:
        return F.linear(x, weight)
    return F.linear(pad_rows(x, rows, 0), weight)[:m]


# Up to this many rows, a bfloat16 CPU matmul is taken weights-first (float16 is not: its kernels
# are slower that way, e.g. [3584, 512] with one row 0.38 against 1.11 ms, 8 rows 0.70 against 0.82).
WEIGHTS_FIRST_MAX_ROWS = 32
# ... and only for weights large enough for their streaming to matter: a small one, such as a
# router's [experts, hidden], costs more weights-first (padding, the transposes) than it saves. One
# row of a [8, 512] router: 33 against 2.1 µs (F.linear's GEMV); [512, 512] is about even with two
# threads (39 against 36 µs) and ahead with one (39 against 46).
WEIGHTS_FIRST_MIN_ELEMENTS = 1 << 18


def _weights_first(x: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """x · Wᵀ for a few rows of x, computed as (W · xᵀ)ᵀ on `rows` (>= 2) zero-padded rows.

    With few rows the product is memory-bound: the weights stream once. The CPU kernels stream
    them faster with W as the left operand in its stored [out, in] layout than as a transposed right
    operand, and a 1-row product (a GEMV) is far slower than a 2-row one. Measured, bfloat16, 2 threads
    (ms, F.linear against this): Mixtral-8x7B's w2 [4096, 14336], 1 row 19.1 → 5.0, 8 rows
    6.1 → 4.9; its w1 [14336, 4096], 8 rows 5.9 → 4.8; the `small` preset's w13 [3584, 512] with
    one thread, 1 row 0.61 → 0.44, 8 rows 0.66 → 0.43. Same math; the rounding of a row may differ
    as it does between any two step shapes."""
    m = x.shape[0]
    return torch.mm(weight, pad_rows(x, rows, 0).T)[:, :m].T.contiguous()


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention (q [B, H, Q, Dh], k/v [B, Hkv, L, Dh], mask [B, 1, Q, L]
    → [B, H, Q, Dh]), with each query row's bits independent of Q, L and B (see the module doc)."""
    b, h, nq, dh = q.shape
    hkv, keys = k.shape[1], k.shape[2]
    g = h // hkv
    padded_keys = -(-keys // KEY_CHUNK) * KEY_CHUNK
    k, v = pad_rows(k, padded_keys, 2), pad_rows(v, padded_keys, 2)
    mask = pad_rows(mask, padded_keys, 3)  # False: padding keys are never attended
    kt = k.transpose(-1, -2)
    per_call = max(1, SCORES_MAX // (b * h * padded_keys))  # queries per call
    outs = []
    for start in range(0, nq, per_call):
        n = min(per_call, nq - start)
        rows = g * n
        qs = pad_rows(q[:, :, start:start + n].reshape(b, hkv, rows, dh), MIN_ROWS, 2)
        scores = (torch.matmul(qs, kt) * dh ** -0.5)[:, :, :rows]
        scores = scores.reshape(b, hkv, g, n, -1).masked_fill(~mask[:, :, None, start:start + n], float("-inf"))
        probs = pad_rows(torch.softmax(scores, dim=-1).view(b, hkv, rows, -1), MIN_ROWS, 2)
        out = torch.matmul(probs[..., :KEY_CHUNK], v[:, :, :KEY_CHUNK])
        for c in range(KEY_CHUNK, padded_keys, KEY_CHUNK):
            out = out + torch.matmul(probs[..., c:c + KEY_CHUNK], v[:, :, c:c + KEY_CHUNK])
        outs.append(out[:, :, :rows].reshape(b, h, n, dh))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
