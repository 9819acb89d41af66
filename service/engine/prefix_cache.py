"""Automatic prefix caching for ``kv_cache`` decoders: completed prompt tokens' KV entries, kept
in fixed-size token blocks and reused by later prompts that start the same way.

Shape legend as in kv_cache.py: L layers, h heads, B tokens per block, e head width.

Why reuse is exact. Both kv_cache architectures (ALiBi, causal native Reformer) give token j
cache entries that are a function of tokens 0..j alone: attention is causal and positions come
from the mask (``cumsum(mask) - 1``), which for a prompt's real tokens is 0..j whatever request
the prompt belongs to (kv_cache.py). So the entries another request computed for the same first
r tokens are the entries this request would compute for them; only the order of float
operations can differ, exactly as it already does between two chunkings of one prompt
(docs/decisions.md, "Prefix caching").

Blocks. A block holds the entries (L, 2, 1, h, B, e) of B consecutive prompt tokens starting at
a multiple of B. Its key is a chained hash: blake2b(parent key ‖ its B token ids), the parent
being the block before it (the root's key is empty), so a key names the block's tokens and
everything before them. Lookups also compare the block's own tokens and parent, so a hash
collision could only cost a miss, never wrong entries. Only whole blocks are stored; a match
that ends inside a block (two prompts that diverge mid-block) copies the first r entries of the
cached block whose tokens share the longest common prefix with the request's, since those r
entries depend only on those r tokens (and everything before).

Ownership. A sequence holds a reference on every block of its chain (the blocks it matched and
the blocks it inserted) until it ends; a referenced block is never evicted. Entries are copied
into the sequence's own cache (the graph takes one contiguous past per sequence), so the
cache's bytes are beside the KV budget, not shared with it (``settings.prefix_cache_bytes``).
Eviction is least-recently-used among blocks nobody references and that have no children:
releasing a chain touches it leaf first, root last, so a document's first blocks outlive its
branches, and a block is never evicted from under a cached child (which could then never be
reached).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.engine.kv_cache import CacheShape

ROOT_KEY = b""


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The chained hash of a block: its parent's key and its own token ids."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(np.asarray(tokens, dtype="<i8").tobytes())
    return digest.digest()


class Children:
    """The cached blocks that follow one block (or start a prompt), sorted by their tokens: the
    one sharing the longest common prefix with any token list is next to where that list would
    sort, so a partial match costs O(log n) however many prompts branch at this block."""

    def __init__(self) -> None:
        self._sorted: list[tuple[tuple[int, ...], bytes]] = []
        self._blocks: dict[bytes, Block] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def add(self, block: Block) -> None:
        bisect.insort(self._sorted, (block.tokens, block.key))
        self._blocks[block.key] = block

    def remove(self, block: Block) -> None:
        i = bisect.bisect_left(self._sorted, (block.tokens, block.key))
        del self._sorted[i]
        del self._blocks[block.key]

    def longest_match(self, tokens: Sequence[int]) -> tuple[Block | None, int]:
        """The child whose tokens share the longest common prefix r with ``tokens``, and r."""
        wanted = tuple(tokens)
        i = bisect.bisect_left(self._sorted, (wanted,))
        best, best_r = None, 0
        for j in (i - 1, i):
            if 0 <= j < len(self._sorted):
                r = common_prefix(self._sorted[j][0], wanted)
                if r > best_r:
                    best, best_r = self._blocks[self._sorted[j][1]], r
        return best, best_r


@dataclass(eq=False)
class Block:
    key: bytes
    parent: Block | None  # the block before it; None for a prompt's first block
    tokens: tuple[int, ...]  # its B token ids
    kv: np.ndarray  # (L, 2, 1, h, B, e), owned: a copy, never a view of a sequence's cache
    refs: int = 0  # chains of running sequences that hold it
    children: Children = field(default_factory=Children)


@dataclass
class Chain:
    """The blocks one sequence holds, in prompt order: they cover its prompt's first
    ``len(blocks) * block_tokens`` tokens."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.blocks[-1].key if self.blocks else ROOT_KEY


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Token blocks of earlier prompts' KV entries, bounded to ``capacity_bytes``."""

    def __init__(self, shape: CacheShape, block_tokens: int, capacity_bytes: int) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.shape = shape
        self.block_tokens = block_tokens
        self.block_bytes = block_tokens * shape.bytes_per_token
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self._roots = Children()  # first blocks of prompts
        self.evictions = 0  # blocks evicted since creation

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def nbytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    # ------------------------------------------------------------------ lookups

    def extend(self, chain: Chain, prompt: Sequence[int], done: int, limit: int) -> np.ndarray:
        """The cached entries of ``prompt[done:end]`` for the largest ``end <= limit`` the cache
        holds, (L, 2, 1, h, end - done, e) (possibly 0 tokens), for a sequence whose own cache
        holds ``prompt[:done]`` and whose ``chain`` covers at most that. Whole blocks found are
        added to the chain (referenced); a match that ends mid-block copies the partial block's
        entries without referencing it (the copy is the sequence's own)."""
        B = self.block_tokens
        pos = len(chain.blocks) * B
        if pos > done:
            raise ValueError(f"chain covers {pos} tokens, more than the {done} computed")
        pieces: list[np.ndarray] = []
        while pos + B <= limit:
            block = self._child(chain, prompt[pos : pos + B])
            if block is None:
                break
            self._hold(chain, block)
            if pos + B > done:
                pieces.append(block.kv[:, :, :, :, max(0, done - pos) :])
            pos += B
        end = max(pos, done)
        wanted = prompt[pos : min(pos + B, limit)]
        if pos + len(wanted) > end:  # the block after the chain may still match in part
            partial, r = self._best_partial(chain, wanted)
            if partial is not None and pos + r > end:
                pieces.append(partial.kv[:, :, :, :, end - pos : r])
                end = pos + r
        if not pieces:
            return self.shape.empty(1)
        return np.concatenate(pieces, axis=4)

    def _children(self, chain: Chain) -> Children:
        return chain.blocks[-1].children if chain.blocks else self._roots

    def _child(self, chain: Chain, tokens: Sequence[int]) -> Block | None:
        """The cached block after ``chain`` holding exactly ``tokens``, if any."""
        block = self._blocks.get(block_key(chain.key, tokens))
        parent = chain.blocks[-1] if chain.blocks else None
        if block is None or block.parent is not parent or block.tokens != tuple(tokens):
            return None  # absent (or a hash collision: a miss, never wrong entries)
        return block

    def _best_partial(self, chain: Chain, tokens: Sequence[int]) -> tuple[Block | None, int]:
        """The child of ``chain`` sharing the longest common prefix with ``tokens``."""
        best, best_r = self._children(chain).longest_match(tokens)
        if best is not None:
            self._blocks.move_to_end(best.key)
        return best, best_r

    # ------------------------------------------------------------------ inserts and release

    def insert(self, chain: Chain, prompt: Sequence[int], cache: np.ndarray) -> None:
        """Add the whole blocks of ``prompt[:n]`` that ``cache`` (L, 2, 1, h, n, e), the
        sequence's own entries for them, holds beyond its chain; the chain takes them. A block
        another sequence inserted meanwhile is shared, not duplicated. Stops where the cache is
        full of referenced blocks (the rest of the prompt stays uncached)."""
        B = self.block_tokens
        n = int(cache.shape[4])
        pos = len(chain.blocks) * B
        while pos + B <= n:
            tokens = tuple(int(t) for t in prompt[pos : pos + B])
            block = self._child(chain, tokens)
            if block is None:
                key = block_key(chain.key, tokens)
                if key in self._blocks or not self._make_room():
                    return  # a colliding key, or no evictable room: stop the chain here
                parent = chain.blocks[-1] if chain.blocks else None
                kv = np.array(cache[:, :, :, :, pos : pos + B])  # a copy, contiguous
                block = Block(key, parent, tokens, kv)
                self._blocks[key] = block
                self._children(chain).add(block)
            self._hold(chain, block)
            pos += B

    def _hold(self, chain: Chain, block: Block) -> None:
        block.refs += 1
        chain.blocks.append(block)
        # Referenced blocks cannot be evicted: at the recent end, the eviction scan, which starts
        # from the least recently used, does not walk past them.
        self._blocks.move_to_end(block.key)

    def release(self, chain: Chain) -> None:
        """The sequence ended: drop its references, and mark its blocks recently used, leaf
        first and root last, so eviction takes branches before the trunk they hang from."""
        for block in reversed(chain.blocks):
            block.refs -= 1
            if block.key in self._blocks:
                self._blocks.move_to_end(block.key)
        chain.blocks = []

    def _make_room(self) -> bool:
        """Evict until one more block fits; False if only referenced blocks are left."""
        while self.nbytes + self.block_bytes > self.capacity_bytes:
            victim = next(
                (b for b in self._blocks.values() if b.refs == 0 and not b.children), None
            )
            if victim is None:
                return False
            del self._blocks[victim.key]
            siblings = victim.parent.children if victim.parent is not None else self._roots
            siblings.remove(victim)
            self.evictions += 1
        return True
