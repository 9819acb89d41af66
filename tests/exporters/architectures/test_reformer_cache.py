"""Reformer incremental decoding: the cached path equals the full forward (causal, native rule)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from exporters.architectures.common import layer_caches
from exporters.architectures.lsh import lsh_attention, lsh_attention_cached, lsh_buckets
from exporters.architectures.reformer import ReformerConfig, ReformerModel

C = 4  # chunk length: the lengths below cross chunk boundaries and exceed 4 chunks
CONFIG = ReformerConfig(
    vocab_size=64, d_model=32, n_heads=2, n_layers=2, d_ff=64, chunk_length=C, n_buckets=4,
    n_hashes=2,
)  # fmt: skip
CPU = torch.device("cpu")
ATOL = 1e-5


def build(config: ReformerConfig = CONFIG, seed: int = 0) -> ReformerModel:
    """A model with weights far from the small init, so attention is sharp and buckets vary."""
    torch.manual_seed(seed)
    model = ReformerModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> ReformerModel:
    return build()


def ids_of(b: int, t: int, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, CONFIG.vocab_size, (b, t), generator=gen)


def full_logits(model: ReformerModel, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    with torch.no_grad():
        return model(ids, torch.ones_like(ids) if mask is None else mask)[0]


def cached_logits(
    model: ReformerModel, ids: Tensor, pieces: list[int], mask: Tensor | None = None
) -> Tensor:
    """Feed ``ids`` in consecutive pieces of these sizes on one growing cache."""
    assert sum(pieces) == ids.shape[1]
    mask = torch.ones_like(ids) if mask is None else mask
    past = model.empty_cache(ids.shape[0], torch.float32, CPU)
    outs, start = [], 0
    with torch.no_grad():
        for n in pieces:
            logits, past = model.forward_cached(
                ids[:, start : start + n], mask[:, : start + n], past
            )
            assert past.shape == (2, 2, ids.shape[0], 2, start + n, CONFIG.head_dim)
            outs.append(logits)
            start += n
    return torch.cat(outs, dim=1)


def test_pure_function_equals_the_last_rows_of_lsh_attention() -> None:
    torch.manual_seed(0)
    b, h, r, e, s = 2, 2, 3, 8, 24  # s: 6 chunks
    qk, v = torch.randn(b, h, s, e), torch.randn(b, h, s, e)
    key_mask = torch.ones(b, s, dtype=torch.bool)
    key_mask[1, :5] = False  # left padding
    rotations = torch.randn(h, e, r, 2)
    buckets = lsh_buckets(qk, rotations, (4,)).masked_fill(~key_mask[:, None, None, :], 4)
    full = lsh_attention(qk, v, buckets, key_mask, C, causal=True)
    for t in (1, 3, 11, s):
        got = lsh_attention_cached(qk[:, :, s - t :], qk, v, buckets, key_mask, C, 4)
        real = key_mask[:, None, s - t :, None].expand_as(got)
        torch.testing.assert_close(got[real], full[:, :, s - t :][real], atol=1e-6, rtol=0)


@pytest.mark.parametrize("length", [1, 3, 4, 5, 9, 23])
def test_token_by_token_equals_the_full_forward(model: ReformerModel, length: int) -> None:
    ids = ids_of(1, length)
    got = cached_logits(model, ids, [1] * length)
    torch.testing.assert_close(got, full_logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pieces", [[7, 16], [5, 6, 12], [23], [1, 22]])
def test_chunked_prefill_equals_the_full_forward(model: ReformerModel, pieces: list[int]) -> None:
    ids = ids_of(1, sum(pieces), seed=2)
    got = cached_logits(model, ids, pieces)
    torch.testing.assert_close(got, full_logits(model, ids), atol=ATOL, rtol=0)


def test_left_padded_batch_equals_each_row_alone(model: ReformerModel) -> None:
    ids = ids_of(2, 21, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # row 1: 12 real tokens, left-padded
    ids[1, :9] = 0
    got = cached_logits(model, ids, [10, 1, 1, 1, 8], mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], full_logits(model, ids, mask)[real], atol=ATOL, rtol=0)
    alone = full_logits(model, ids[1:, 9:])
    torch.testing.assert_close(got[1, 9:], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("n", "free", "t"), [(1, 3, 1), (9, 4, 1), (23, 17, 1), (12, 5, 3)])
def test_padding_between_the_past_and_the_new_tokens_is_invisible(
    model: ReformerModel, n: int, free: int, t: int
) -> None:
    """The service's decode buffer: n real tokens, ``free`` masked slots (holding junk), then
    the t new tokens. Positions and bucket ranks count real tokens only, so logits and the new
    entries equal the unpadded sequence's."""
    ids = ids_of(1, n + t, seed=n)
    with torch.no_grad():
        past = model.empty_cache(1, torch.float32, CPU)
        _, present = model.forward_cached(ids[:, :n], torch.ones(1, n, dtype=torch.long), past)
        gen = torch.Generator().manual_seed(n)
        junk = torch.randn(*present.shape[:4], free, present.shape[-1], generator=gen) * 10
        padded = torch.cat([present, junk], dim=4)
        mask = torch.cat([torch.ones(n), torch.zeros(free), torch.ones(t)]).long()[None]
        got, new = model.forward_step(ids[:, n:], mask, layer_caches(padded))
        _, whole = model.forward_cached(ids, torch.ones_like(ids), past)
    assert new.shape == (2, 2, 1, 2, t, CONFIG.head_dim)
    torch.testing.assert_close(got, full_logits(model, ids)[:, n:], atol=ATOL, rtol=0)
    torch.testing.assert_close(new, whole[..., n:, :], atol=ATOL, rtol=0)


def test_decoding_into_a_buffer_with_free_slots_equals_full_recompute(model: ReformerModel) -> None:
    """Token by token the way the engine decodes: the cache keeps a fixed number of slots, real
    tokens left-aligned, each new entry written at the row's length."""
    ids = ids_of(1, 20, seed=6)
    prompt, capacity = 5, 24
    with torch.no_grad():
        buffer = torch.zeros(2, 2, 1, 2, capacity, CONFIG.head_dim)
        logits, new = model.forward_step(
            ids[:, :prompt],
            torch.ones(1, prompt, dtype=torch.long),
            layer_caches(buffer[..., :0, :]),
        )
        buffer[..., :prompt, :] = new
        outs = [logits]
        for n in range(prompt, ids.shape[1]):
            mask = torch.cat([torch.arange(capacity) < n, torch.ones(1, dtype=torch.bool)])
            logits, new = model.forward_step(
                ids[:, n : n + 1], mask.long()[None], layer_caches(buffer)
            )
            buffer[..., n : n + 1, :] = new
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full_logits(model, ids), atol=ATOL, rtol=0)


def test_greedy_generation_through_the_cache_equals_full_recompute(model: ReformerModel) -> None:
    prompt, steps = ids_of(1, 5, seed=4), 32
    recomputed = prompt
    for _ in range(steps):
        nxt = full_logits(model, recomputed)[:, -1].argmax(-1, keepdim=True)
        recomputed = torch.cat([recomputed, nxt], dim=1)

    with torch.no_grad():
        past = model.empty_cache(1, torch.float32, CPU)
        logits, past = model.forward_cached(prompt, torch.ones_like(prompt), past)
        tokens = [int(logits[0, -1].argmax())]
        for _ in range(steps - 1):
            step = torch.tensor([[tokens[-1]]])
            mask = torch.ones(1, past.shape[-2] + 1, dtype=torch.long)
            logits, past = model.forward_cached(step, mask, past)
            tokens.append(int(logits[0, -1].argmax()))
    assert tokens == recomputed[0, 5:].tolist()
    assert len(set(tokens)) > 1  # the loop really depended on the logits


@pytest.mark.parametrize(
    "change",
    [{"hf_compatible": True}, {"causal": False}, {"attn_layers": ("lsh", "local")}],
    ids=["hf_compatible", "bidirectional", "local_layers"],
)
def test_configs_without_an_exact_cache_are_refused(change: dict[str, object]) -> None:
    config = dataclasses.replace(CONFIG, **change)
    assert not ReformerModel.supports_kv_cache(config)
    model = ReformerModel(config).eval()
    ids = ids_of(1, 4)
    with pytest.raises(ValueError, match="forward_cached needs a causal model"):
        model.empty_cache(1, torch.float32, CPU)
    past = torch.zeros(2, 2, 1, 2, 0, CONFIG.head_dim)
    with pytest.raises(ValueError, match="forward_cached needs a causal model"):
        model.forward_cached(ids, torch.ones_like(ids), past)
    assert ReformerModel.supports_kv_cache(CONFIG)
