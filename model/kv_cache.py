"""Paged KV cache: fixed-size blocks of token slots, handed to sequences as they grow.

Memory is bounded by the number of blocks chosen at construction, not by the number of
sequences times the context length. A sequence holds blocks only for tokens it has (prompt and
output so far); the engine asks for more as it grows and preempts someone when none are left.

Block 0 is the null block: never handed out, always zero. Block tables of a step are padded with
it, so padding never reads a live or stale block. Every block is zeroed when it is handed out, so
a non-finite key or value a failed sequence left behind can never reach another sequence (masked
keys still enter attention's matmul, where 0 × NaN would be NaN).

With prefix caching (model/prefix_cache.py) full blocks are also named by their content and shared:
a sequence starts with the blocks of its longest cached prefix (`allocate_prefix`), blocks whose
keys are computed are named (`commit`), and a released block stays cached until a block is needed.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .prefix_cache import BlockHash, BlockPool

NULL_BLOCK = 0


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_tokens: int, *, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = max(1, -(-num_tokens // block_size))  # usable blocks (the null block is extra)
        self.layers, self.kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        # [layers, k|v, Hkv, blocks (+ null), block_size, Dh]: one tensor, so zeroing blocks is one op;
        # key head first, so that a step's gather of one head's keys reads rows of one [slots, Dh]
        # plane (model/layers.py gathered_attention)
        self._data = torch.zeros(self.layers, 2, self.kv_heads, self.num_blocks + 1, block_size, self.head_dim,
                                 dtype=dtype, device=device)
        slots = (self.num_blocks + 1) * block_size
        self._views = [tuple(self._data[i, j].view(self.kv_heads, slots, self.head_dim).transpose(0, 1) for j in (0, 1))
                       for i in range(self.layers)]
        self.pool = BlockPool(self.num_blocks, enabled=prefix_caching)
        self._tables: dict[object, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def prefix_caching(self) -> bool:
        return self.pool.enabled

    @property
    def free_blocks(self) -> int:
        """Blocks a sequence may take (cached blocks no sequence holds count: they are evicted on demand)."""
        return self.pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing_blocks(self, seq_id: object, num_tokens: int) -> int:
        """Blocks the sequence still needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def allocate(self, seq_id: object, num_tokens: int) -> bool:
        """Grow the sequence's table to hold `num_tokens`; False (and nothing taken) if too few are free."""
        need = self.missing_blocks(seq_id, num_tokens)
        if need > self.pool.num_free:
            return False
        if need:
            new = self.pool.take_new(need)
            self._data[:, :, :, new] = 0
            self._tables.setdefault(seq_id, []).extend(new)
        else:
            self._tables.setdefault(seq_id, [])
        return True

    def _prefix(self, hashes: list[BlockHash], num_tokens: int) -> list[int]:
        return self.pool.match(hashes, (num_tokens - 1) // self.block_size)

    def admission_blocks(self, hashes: list[BlockHash], num_tokens: int) -> int:
        """Of free_blocks, how many a new sequence of `num_tokens` takes when it may start from the
        cached blocks of `hashes` (those other sequences hold cost nothing: never more than without
        the cache)."""
        return self.blocks_for(num_tokens) - self.pool.num_held_of(self._prefix(hashes, num_tokens))

    def allocate_prefix(self, seq_id: object, hashes: list[BlockHash], num_tokens: int, query_tokens: int) -> int:
        """Start a sequence: the longest cached prefix of `hashes` (the caller leaves out the block of
        its last token, whose logits it needs), then new blocks up to `num_tokens`. Returns the tokens
        found cached; query_tokens (its tokens) counts towards the hit rate. The caller checked
        admission_blocks."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        cached = self._prefix(hashes, num_tokens)
        self.pool.take_cached(cached)
        self.pool.queries_tokens += query_tokens
        self.pool.hits_tokens += len(cached) * self.block_size
        self._tables[seq_id] = list(cached)
        if not self.allocate(seq_id, num_tokens):  # cannot happen after admission_blocks; undo anyway
            self.release(seq_id)
            raise MemoryError(f"no room for sequence {seq_id!r}")
        return len(cached) * self.block_size

    def commit(self, seq_id: object, hashes: list[BlockHash], num_computed: int) -> None:
        """Name the sequence's full blocks whose keys are all computed (its first num_computed tokens)."""
        table = self._tables[seq_id]
        for i in range(min(num_computed // self.block_size, len(hashes))):
            self.pool.commit(table[i], hashes[i])

    def release(self, seq_id: object, keep_cached: bool = True) -> None:
        """The sequence's blocks go back; its named ones stay cached unless keep_cached=False (a failed
        sequence: its keys may hold non-finite values)."""
        self.pool.release(self._tables.pop(seq_id, []), keep=keep_cached)

    def holds(self, seq_id: object) -> bool:
        return seq_id in self._tables

    def table(self, seq_id: object) -> list[int]:
        return self._tables[seq_id]

    def store(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's keys and values as [slots, Hkv, Dh] (views of the [Hkv, slots, Dh] storage);
        slot = block * block_size + offset."""
        return self._views[layer]

    @property
    def used_blocks(self) -> int:
        """Blocks held by sequences (cached blocks nobody holds are not used: they are free to take)."""
        return self.pool.num_held
