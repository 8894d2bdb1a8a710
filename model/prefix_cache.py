"""Automatic prefix caching: the KV cache's blocks, shared by content and kept after use.

A full block (block_size tokens whose keys and values are all computed) is named by a hash chained
over (its parent block's hash, its token ids), the first block's hash also over a salt — as vLLM
does: equal hashes mean an equal token prefix under the same salt, so a sequence whose first blocks
hash the same may use those blocks instead of computing them. The salt keeps callers apart (the API
key's identity, and a request's own `cache_salt`): one caller can never reuse, and so never time,
another's prompt.

BlockPool keeps every block's state; each block is in exactly one of three places:
  free       never used, or dropped: nothing to reuse (handed out first)
  cached     full, hashed, held by no sequence: reusable, evictable (least recently released first)
  held       in the tables of one or more sequences (reference counted); full ones may be hashed
so free + cached + held == capacity always (tests check it). Cached blocks count as free for
admission: a block is evicted only when a sequence needs a block and no free one is left, so
caching never makes a request wait that would run without it.
"""

from __future__ import annotations

import collections
import hashlib
import struct

BlockHash = bytes


def salt_bytes(*parts: str | bytes | None) -> bytes:
    """One salt from several parts (API key identity, a request's cache_salt); b"" when all empty.
    Each part is length-prefixed, so ("ab", "c") and ("a", "bc") differ."""
    out = b""
    for p in parts:
        raw = p.encode() if isinstance(p, str) else (p or b"")
        out += struct.pack("<I", len(raw)) + raw
    return out if any(parts) else b""


def extend_hashes(hashes: list[BlockHash], tokens: list[int], block_size: int, salt: bytes) -> None:
    """Append the hashes of the full blocks of `tokens` not yet in `hashes` (the chain so far)."""
    for i in range(len(hashes), len(tokens) // block_size):
        h = hashlib.blake2b(digest_size=16)
        h.update(hashes[-1] if hashes else b"root" + salt)
        h.update(struct.pack(f"<{block_size}i", *tokens[i * block_size:(i + 1) * block_size]))
        hashes.append(h.digest())


class BlockPool:
    """Reference counts, the hash → block map and the LRU of cached blocks (block 0, the null block,
    is never handed out). `enabled=False`: no block is ever cached (released blocks are free)."""

    def __init__(self, num_blocks: int, enabled: bool = True) -> None:
        self.num_blocks, self.enabled = num_blocks, enabled
        self._free = list(range(num_blocks, 0, -1))  # pop() hands out low blocks first
        self._refs = [0] * (num_blocks + 1)
        self._hash_of: dict[int, BlockHash] = {}  # block → its hash, for cached and held full blocks
        self._by_hash: dict[BlockHash, int] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached blocks, oldest first
        self.evictions = 0  # cached blocks reused for other content, since start
        self.queries_tokens = 0  # tokens looked up at admission (vLLM's prefix_cache_queries)
        self.hits_tokens = 0  # of which found cached (vLLM's prefix_cache_hits)

    # --- counts ---

    @property
    def num_free(self) -> int:
        """Blocks a sequence may take: never used ones and cached ones no sequence holds."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached_unheld(self) -> int:
        return len(self._lru)

    @property
    def num_held(self) -> int:
        return self.num_blocks - len(self._free) - len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks with a hash: reusable now (held or not)."""
        return len(self._by_hash)

    def cached_hashes(self, limit: int) -> list[BlockHash]:
        """The hashes of up to `limit` cached blocks, the most recently named ones."""
        hashes = list(self._by_hash)  # one C-level copy: safe against the engine thread's changes
        return hashes[-limit:]

    def counts(self) -> tuple[int, int, int]:
        """(free, cached but unheld, held): they sum to the capacity."""
        return len(self._free), len(self._lru), self.num_held

    # --- lookup and taking ---

    def match(self, hashes: list[BlockHash], max_blocks: int) -> list[int]:
        """The blocks of the longest cached prefix of `hashes` (at most max_blocks), not yet taken."""
        out = []
        if self.enabled:
            for h in hashes[:max_blocks]:
                block = self._by_hash.get(h)
                if block is None:
                    break
                out.append(block)
        return out

    def num_held_of(self, blocks: list[int]) -> int:
        return sum(1 for b in blocks if self._refs[b] > 0)

    def take_cached(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1

    def take_new(self, n: int) -> list[int]:
        """n blocks with nothing to reuse (the caller zeroes them); evicts cached ones when no free
        block is left. The caller checked num_free."""
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._lru.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def commit(self, block: int, h: BlockHash) -> None:
        """`block` (held, full, computed) now has content `h`: later sequences may reuse it. When
        another block already has that content (computed side by side), this one stays unnamed."""
        if self.enabled and block not in self._hash_of and h not in self._by_hash:
            self._hash_of[block] = h
            self._by_hash[h] = block

    def release(self, blocks: list[int], keep: bool = True) -> None:
        """Drop one reference to each block. Unheld hashed blocks stay cached (the last block of a
        sequence released first, so it is evicted first), unless keep=False (their content may be
        bad: a failed sequence's): then they are dropped from the cache."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            if keep and b in self._hash_of:
                self._lru[b] = None
            else:
                h = self._hash_of.pop(b, None)
                if h is not None:
                    del self._by_hash[h]
                self._free.append(b)
