"""Paged KV cache: fixed-size blocks of token slots, handed to sequences as they grow.

Memory is bounded by the number of blocks chosen at construction, not by the number of
sequences times the context length. A sequence holds blocks only for tokens it has (prompt and
output so far); the engine asks for more as it grows and preempts someone when none are left.

Block 0 is the null block: never handed out, always zero. Block tables of a step are padded with
it, so padding never reads a live or stale block. Every block is zeroed when it is handed out, so
a non-finite key or value a failed sequence left behind can never reach another sequence (masked
keys still enter attention's matmul, where 0 × NaN would be NaN).
"""

from __future__ import annotations

import torch

from .config import ModelConfig

NULL_BLOCK = 0


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_tokens: int, *, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        self.num_blocks = max(1, -(-num_tokens // block_size))  # usable blocks (the null block is extra)
        self.layers, self.kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        # [layers, k|v, blocks (+ null), block_size, Hkv, Dh]: one tensor, so zeroing blocks is one op
        self._data = torch.zeros(self.layers, 2, self.num_blocks + 1, block_size, self.kv_heads, self.head_dim,
                                 dtype=dtype, device=device)
        slots = (self.num_blocks + 1) * block_size
        self._views = [(self._data[i, 0].view(slots, self.kv_heads, self.head_dim),
                        self._data[i, 1].view(slots, self.kv_heads, self.head_dim)) for i in range(self.layers)]
        self._free = list(range(self.num_blocks, NULL_BLOCK, -1))  # pop() hands out low blocks first
        self._tables: dict[object, list[int]] = {}
        self.bytes_per_block = 2 * self.layers * block_size * self.kv_heads * self.head_dim * self._data.element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing_blocks(self, seq_id: object, num_tokens: int) -> int:
        """Blocks the sequence still needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def allocate(self, seq_id: object, num_tokens: int) -> bool:
        """Grow the sequence's table to hold `num_tokens`; False (and nothing taken) if too few are free."""
        need = self.missing_blocks(seq_id, num_tokens)
        if need > len(self._free):
            return False
        if need:
            new = [self._free.pop() for _ in range(need)]
            self._data[:, :, new] = 0
            self._tables.setdefault(seq_id, []).extend(new)
        else:
            self._tables.setdefault(seq_id, [])
        return True

    def release(self, seq_id: object) -> None:
        self._free.extend(reversed(self._tables.pop(seq_id, [])))

    def holds(self, seq_id: object) -> bool:
        return seq_id in self._tables

    def table(self, seq_id: object) -> list[int]:
        return self._tables[seq_id]

    def store(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's keys and values as [slots, Hkv, Dh]; slot = block * block_size + offset."""
        return self._views[layer]

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.bytes_per_block
