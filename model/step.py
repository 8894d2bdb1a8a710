"""The layout of one forward step: which packed tokens belong to which sequence, where their keys live.

A step runs B sequences at once; sequence b brings q_lens[b] new tokens (a whole prompt, a prompt
chunk, or one decode token) on top of cached_lens[b] tokens already in the KV cache. Everything
position-wise (projections, norms, the MoE) runs on the packed [T, D] tokens, with no padding; only
attention sees a padded [B, Q] x [B, L] view, built here once per step and shared by every layer.
Legend: T = packed new tokens, B = sequences, Q = max new tokens, L = max keys.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class StepLayout:
    positions: torch.Tensor  # [T] absolute position of each packed token
    q_index: torch.Tensor  # [B, Q] packed index of each query (padding repeats a real one)
    kv_index: torch.Tensor  # [B, L] cache slot (or packed index without a cache) of each key
    mask: torch.Tensor  # [B, 1, Q, L] bool, True where a query may attend a key
    unpad_index: torch.Tensor  # [T] row of the flattened [B*Q] attention output for each token
    write_slots: torch.Tensor | None  # [T] cache slot receiving each token's key/value
    last_index: torch.Tensor  # [B] packed index of each sequence's last new token

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device: torch.device) -> "StepLayout":
        """The same layout on `device` (it is built on the CPU: small integer tensors)."""
        if device.type == "cpu":
            return self
        return StepLayout(**{f.name: None if getattr(self, f.name) is None else
                             getattr(self, f.name).to(device, non_blocking=True) for f in dataclasses.fields(self)})


def build_layout(q_lens: list[int], cached_lens: list[int], *, block_tables: list[list[int]] | None = None,
                 block_size: int = 0, sliding_window: int | None = None) -> StepLayout:
    """Layout for a step. With block_tables, keys live in a paged cache (slot = block * size + offset);
    without, keys are this step's own tokens (cached_lens must then be zero)."""
    qlen = torch.tensor(q_lens, dtype=torch.long)
    cached = torch.tensor(cached_lens, dtype=torch.long)
    if int(qlen.min()) < 1:
        raise ValueError("every sequence in a step needs at least one new token")
    b, q, kv_len = len(q_lens), int(qlen.max()), int((qlen + cached).max())
    offsets = torch.cumsum(qlen, 0) - qlen
    i = torch.arange(q)[None, :]  # [1, Q]
    real = i < qlen[:, None]  # [B, Q]
    ii = torch.minimum(i, qlen[:, None] - 1)  # padding queries repeat the last real one
    qpos = cached[:, None] + ii  # [B, Q]
    j = torch.arange(kv_len)
    mask = j[None, None, :] <= qpos[:, :, None]  # causal; also excludes keys past each sequence's end
    if sliding_window is not None:
        mask &= j[None, None, :] > qpos[:, :, None] - sliding_window
    if block_tables is None:
        if int(cached.max()) != 0:
            raise ValueError("cached tokens need block tables")
        kv_index = offsets[:, None] + torch.minimum(j[None, :], qlen[:, None] - 1)
        write_slots = None
    else:
        width = max(len(t) for t in block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)  # [B, nblk]
        blk = torch.clamp(j // block_size, max=width - 1)
        kv_index = table[:, blk] * block_size + j % block_size  # [B, L]
        write_slots = kv_index.gather(1, qpos)[real]
    return StepLayout(
        positions=qpos[real],
        q_index=offsets[:, None] + ii,
        kv_index=kv_index,
        mask=mask[:, None],
        unpad_index=(torch.arange(b)[:, None] * q + i)[real],
        write_slots=write_slots,
        last_index=offsets + qlen - 1,
    )
