"""The layout of one forward step: which packed tokens belong to which sequence, where their keys live.

A step runs B sequences at once; sequence b brings q_lens[b] new tokens (a whole prompt, a prompt
chunk, or one decode token) on top of cached_lens[b] tokens already in the KV cache. Everything
position-wise (projections, norms, the MoE) runs on the packed [T, D] tokens, with no padding; only
attention sees padded [B, Q] x [B, L] views, built here once per step and shared by every layer.

A step that mixes decoding sequences (one new token each) with prompt chunks gives each kind its
own view (an attention group): in one view every decode token would be padded to the chunk's
length, so 32 decodes beside a 512-token chunk computed 33 x 512 queries instead of 544.
Legend: T = packed new tokens, B = sequences, Q = max new tokens, L = max keys (of a group).
"""

from __future__ import annotations

import dataclasses

import torch

from . import shape_buckets


@dataclasses.dataclass
class AttentionGroup:
    """Sequences whose queries attend as one padded view."""
    q_index: torch.Tensor  # [B, Q] packed index of each query (padding repeats a real one)
    kv_index: torch.Tensor  # [B, L] cache slot (or packed index without a cache) of each key
    mask: torch.Tensor  # [B, 1, Q, L] bool, True where a query may attend a key

    def to(self, device: torch.device) -> "AttentionGroup":
        return AttentionGroup(*(t.to(device, non_blocking=True) for t in (self.q_index, self.kv_index, self.mask)))


@dataclasses.dataclass
class StepLayout:
    positions: torch.Tensor  # [T] absolute position of each packed token
    groups: list[AttentionGroup]  # one per kind of sequence in the step (decoding, prompt chunks)
    unpad_index: torch.Tensor  # [T] row of the groups' flattened [B*Q] outputs, concatenated, for each token
    write_slots: torch.Tensor | None  # [T] cache slot receiving each token's key/value
    last_index: torch.Tensor  # [B] packed index of each sequence's last new token

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device: torch.device) -> "StepLayout":
        """The same layout on `device` (it is built on the CPU: small integer tensors)."""
        if device.type == "cpu":
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return StepLayout(move(self.positions), [g.to(device) for g in self.groups], move(self.unpad_index),
                          move(self.write_slots), move(self.last_index))


def build_layout(q_lens: list[int], cached_lens: list[int], *, block_tables: list[list[int]] | None = None,
                 block_size: int = 0, sliding_window: int | None = None, bucketed: bool = False) -> StepLayout:
    """Layout for a step. With block_tables, keys live in a paged cache (slot = block * size + offset);
    without, keys are this step's own tokens (cached_lens must then be zero).

    bucketed: each group's B, Q and L are rounded up to model/shape_buckets.py's sizes (for bfloat16
    on the CPU, which builds a kernel per shape). Padding sequences repeat the group's first one and
    padding keys are masked, so attention computes the same rows; nothing reads the padding back."""
    if min(q_lens) < 1:
        raise ValueError("every sequence in a step needs at least one new token")
    if block_tables is None and any(cached_lens):
        raise ValueError("cached tokens need block tables")
    qlen = torch.tensor(q_lens, dtype=torch.long)
    offsets = torch.cumsum(qlen, 0) - qlen
    decoding = [s for s, n in enumerate(q_lens) if n == 1]
    chunks = [s for s, n in enumerate(q_lens) if n > 1]
    members = [decoding, chunks] if decoding and chunks else [list(range(len(q_lens)))]
    t = int(qlen.sum())
    positions, unpad = torch.empty(t, dtype=torch.long), torch.empty(t, dtype=torch.long)
    write_slots = None if block_tables is None else torch.empty(t, dtype=torch.long)
    groups, base = [], 0
    for seqs in members:
        n_real = len(seqs)
        if bucketed:  # padding sequences repeat the first: valid indices, never read back
            seqs = seqs + seqs[:1] * (shape_buckets.bucket(len(seqs)) - len(seqs))
        group, qpos, real, slots = _group([q_lens[s] for s in seqs], [cached_lens[s] for s in seqs], offsets[seqs],
                                          None if block_tables is None else [block_tables[s] for s in seqs],
                                          block_size, sliding_window, bucketed)
        b, q = group.q_index.shape
        real[n_real:] = False  # padding sequences
        token = group.q_index[real]  # packed index of each real query
        positions[token] = qpos[real]
        unpad[token] = base + (torch.arange(b)[:, None] * q + torch.arange(q)[None, :])[real]
        if write_slots is not None:
            write_slots[token] = slots[real]
        groups.append(group)
        base += b * q
    return StepLayout(positions=positions, groups=groups, unpad_index=unpad, write_slots=write_slots,
                      last_index=offsets + qlen - 1)


def _group(q_lens: list[int], cached_lens: list[int], offsets: torch.Tensor, block_tables: list[list[int]] | None,
           block_size: int, sliding_window: int | None, bucketed: bool
           ) -> tuple[AttentionGroup, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One group's view, and per [B, Q] query: its position, whether it is real, its cache slot."""
    qlen = torch.tensor(q_lens, dtype=torch.long)
    cached = torch.tensor(cached_lens, dtype=torch.long)
    q, kv_len = int(qlen.max()), int((qlen + cached).max())
    if bucketed:
        q, kv_len = shape_buckets.bucket(q), shape_buckets.bucket(kv_len)
    i = torch.arange(q)[None, :]  # [1, Q]
    real = i < qlen[:, None]  # [B, Q]
    ii = torch.minimum(i, qlen[:, None] - 1)  # padding queries repeat the last real one
    qpos = cached[:, None] + ii  # [B, Q]
    j = torch.arange(kv_len)
    mask = j[None, None, :] <= qpos[:, :, None]  # causal; also excludes keys past each sequence's end
    if sliding_window is not None:
        mask &= j[None, None, :] > qpos[:, :, None] - sliding_window
    if block_tables is None:
        kv_index = offsets[:, None] + torch.minimum(j[None, :], qlen[:, None] - 1)
        slots = None
    else:
        width = max(len(t) for t in block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)  # [B, nblk]
        blk = torch.clamp(j // block_size, max=width - 1)
        kv_index = table[:, blk] * block_size + j % block_size  # [B, L]
        slots = kv_index.gather(1, qpos)
    return AttentionGroup(offsets[:, None] + ii, kv_index, mask[:, None]), qpos, real, slots
