"""The prefix cache on synthetic entries: chained block keys, whole-block and mid-block matches,
catching up on entries computed meanwhile, references, LRU eviction within the byte bound."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine import prefix_cache as pc
from service.engine.kv_cache import CacheShape
from service.engine.prefix_cache import Chain, PrefixCache, block_key

SHAPE = CacheShape(n_layers=2, n_heads=3, head_dim=4)
B = 4


def entries(prompt: list[int]) -> np.ndarray:
    """(L, 2, 1, h, n, e) entries that identify their token and everything before it (like a
    causal model's): slot j holds a running sum of the prompt's ids weighted by position."""
    ids = np.asarray(prompt, np.float64)
    fingerprint = np.cumsum(ids * (1 + np.arange(len(ids)))).astype(np.float32)
    return np.broadcast_to(
        fingerprint[None, None, None, None, :, None], (2, 2, 1, 3, len(ids), 4)
    ).copy()


def cached(cache: PrefixCache, prompt: list[int]) -> Chain:
    """Insert a fully computed prompt, as a finished prefill would; its chain stays held."""
    chain = Chain()
    cache.insert(chain, prompt, entries(prompt))
    return chain


def reused(cache: PrefixCache, prompt: list[int]) -> int:
    """Tokens of ``prompt`` a new sequence would reuse (all but its last at most); the lookup's
    references are dropped again, as when that sequence ends."""
    chain = Chain()
    n = int(cache.extend(chain, prompt, 0, len(prompt) - 1).shape[4])
    cache.release(chain)
    return n


def big_cache() -> PrefixCache:
    return PrefixCache(SHAPE, B, capacity_bytes=1000 * B * SHAPE.bytes_per_token)


def test_whole_blocks_are_reused_and_their_entries_are_the_prompts_own() -> None:
    cache = big_cache()
    doc = list(range(10, 22))  # 12 tokens: 3 blocks
    cache.release(cached(cache, doc))
    assert len(cache) == 3 and cache.nbytes == 3 * B * SHAPE.bytes_per_token
    prompt = [*doc, 7, 8, 9]
    chain = Chain()
    found = cache.extend(chain, prompt, done=0, limit=len(prompt) - 1)
    assert found.shape[4] == 12 and len(chain.blocks) == 3
    np.testing.assert_array_equal(found, entries(prompt)[..., :12, :])
    assert all(block.refs == 1 for block in chain.blocks)


def test_a_match_ending_mid_block_copies_the_shared_part_of_the_block() -> None:
    cache = big_cache()
    cache.release(cached(cache, [1, 2, 3, 4, 5, 6, 7, 8]))
    cache.release(cached(cache, [1, 2, 3, 4, 5, 6, 9, 9]))
    prompt = [1, 2, 3, 4, 5, 6, 7, 0, 0, 0]  # diverges at token 7, inside block 1
    chain = Chain()
    found = cache.extend(chain, prompt, done=0, limit=len(prompt) - 1)
    assert found.shape[4] == 7  # block 0 whole, then 3 of block 1 (the [5, 6, 7, 8] one)
    np.testing.assert_array_equal(found, entries(prompt)[..., :7, :])
    assert len(chain.blocks) == 1  # the partial block is copied, not held


def test_an_entirely_cached_prompt_leaves_its_last_token_to_compute() -> None:
    cache = big_cache()
    prompt = list(range(30, 38))  # exactly 2 blocks
    cache.release(cached(cache, prompt))
    chain = Chain()
    found = cache.extend(chain, prompt, done=0, limit=len(prompt) - 1)
    assert found.shape[4] == 7  # block 0 whole, 3 tokens of block 1: the last one is computed
    np.testing.assert_array_equal(found, entries(prompt)[..., :7, :])


def test_keys_chain_so_a_block_matches_only_after_the_same_prefix() -> None:
    cache = big_cache()
    cache.release(cached(cache, [1, 1, 1, 1, 5, 6, 7, 8]))
    assert block_key(pc.ROOT_KEY, [5, 6, 7, 8]) != block_key(
        block_key(pc.ROOT_KEY, [1] * 4), [5, 6, 7, 8]
    )
    # Same second block, different first block: nothing matches (its entries depend on both).
    found = cache.extend(Chain(), [2, 2, 2, 2, 5, 6, 7, 8, 0], done=0, limit=8)
    assert found.shape[4] == 0


def test_a_hash_collision_is_a_miss_never_wrong_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pc, "block_key", lambda parent, tokens: b"same")
    cache = big_cache()
    cache.release(cached(cache, [1, 2, 3, 4]))
    assert cache.extend(Chain(), [5, 6, 7, 8, 9], done=0, limit=4).shape[4] == 0
    chain = cached(cache, [5, 6, 7, 8])  # the colliding key is not overwritten either
    assert chain.blocks == [] and len(cache) == 1
    np.testing.assert_array_equal(
        cache.extend(Chain(), [1, 2, 3, 4, 0], 0, 4), entries([1, 2, 3, 4])
    )


def test_catching_up_returns_only_the_entries_after_what_was_computed() -> None:
    """A prefill at done=6 (its chain: 1 block) finds blocks another sequence inserted since."""
    cache = big_cache()
    prompt = list(range(50, 63))  # 13 tokens
    cache.release(cached(cache, prompt[:12]))
    chain = Chain()
    chain_own = cache.extend(chain, prompt, done=0, limit=4)  # it had taken block 0 earlier
    assert chain_own.shape[4] == 4
    found = cache.extend(chain, prompt, done=6, limit=len(prompt) - 1)
    assert found.shape[4] == 6 and len(chain.blocks) == 3  # tokens 6..11
    np.testing.assert_array_equal(found, entries(prompt)[..., 6:12, :])
    with pytest.raises(ValueError, match="more than"):
        cache.extend(chain, prompt, done=8, limit=12)


def test_eviction_is_lru_within_the_bound_and_spares_held_blocks_and_trunks() -> None:
    cache = PrefixCache(SHAPE, B, capacity_bytes=3 * B * SHAPE.bytes_per_token)
    held = cached(cache, [1] * 8)  # 2 blocks, still held by a running sequence
    cache.release(cached(cache, [2] * 4))
    cache.release(cached(cache, [3] * 4))  # full: evicts [2]*4 (the only unheld block)
    assert len(cache) == 3 and cache.evictions == 1
    assert reused(cache, [2] * 4 + [0]) == 0
    assert reused(cache, [3] * 4 + [0]) == 4
    # Only held blocks and one free one: a 2-block prompt gets its first block only.
    chain = cached(cache, [4] * 8)
    assert len(chain.blocks) == 1 and cache.nbytes <= cache.capacity_bytes
    cache.release(chain)
    cache.release(held)
    assert cache.evictions == 2  # [3]*4 made room for [4]*4

    # Now nothing is held; [1]*4 (the trunk) has a child [1]*4 (a leaf). Each new block evicts
    # the least recently used block without children: the leaf before its trunk.
    def held_tokens() -> list[int]:
        return sorted(block.tokens[0] for block in cache._blocks.values())

    assert held_tokens() == [1, 1, 4]
    cache.release(cached(cache, [5] * 4))
    assert held_tokens() == [1, 1, 5]  # [4]*4, least recently used
    cache.release(cached(cache, [6] * 4))
    assert held_tokens() == [1, 5, 6]  # the leaf, not the trunk it hangs from
    assert reused(cache, [1] * 9) == 4  # the trunk is still reachable, now most recently used
    for fill in (7, 8, 9):
        cache.release(cached(cache, [fill] * 4))
    assert held_tokens() == [7, 8, 9] and cache.nbytes == cache.capacity_bytes


def test_nothing_is_stored_when_a_block_does_not_fit() -> None:
    cache = PrefixCache(SHAPE, B, capacity_bytes=B * SHAPE.bytes_per_token - 1)
    assert cached(cache, [1] * 8).blocks == [] and cache.nbytes == 0
