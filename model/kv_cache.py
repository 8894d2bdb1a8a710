"""Paged KV cache: fixed-size blocks of token slots, handed to sequences and returned when they end.

Memory is bounded by the number of blocks chosen at construction, not by the number of
sequences times the context length. A sequence reserves every block it can need (prompt +
max_tokens) when it is admitted, so a running sequence never waits for memory.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class CacheFull(RuntimeError):
    pass


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_tokens: int, *, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        self.num_blocks = max(1, -(-num_tokens // block_size))
        shape = (self.num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)  # [slots, Hkv, Dh]
        self._k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self._v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._tables: dict[object, list[int]] = {}
        self.bytes_per_block = 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim \
            * torch.finfo(dtype).bits // 8

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def reserve(self, seq_id: object, num_tokens: int) -> None:
        need = self.blocks_for(num_tokens)
        if need > len(self._free):
            raise CacheFull(f"KV cache full: need {need} blocks, {len(self._free)} free")
        self._tables[seq_id] = [self._free.pop() for _ in range(need)]

    def release(self, seq_id: object) -> None:
        self._free.extend(reversed(self._tables.pop(seq_id, [])))

    def table(self, seq_id: object) -> list[int]:
        return self._tables[seq_id]

    def store(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k[layer], self._v[layer]

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.bytes_per_block
