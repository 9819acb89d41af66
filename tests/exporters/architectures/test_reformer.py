"""Reformer: LSH attention against slow references, reversibility, padding, causality, config."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from exporters.architectures.common import sinusoidal_positions
from exporters.architectures.lsh import SELF_SCORE, lsh_attention, lsh_buckets
from exporters.architectures.reformer import (
    SINUSOID_SCALE,
    ReformerConfig,
    ReformerModel,
    ReversibleBlock,
)

TINY = ReformerConfig(
    vocab_size=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, chunk_length=4, n_buckets=4
)
MASKED = torch.finfo(torch.float32).min / 2


def build(config: ReformerConfig = TINY, seed: int = 0) -> ReformerModel:
    torch.manual_seed(seed)
    return ReformerModel(config).eval()


def random_ids(b: int, t: int, seed: int = 1) -> Tensor:
    return torch.randint(4, TINY.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def masked_attention(qk: Tensor, v: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
    """Shared-QK softmax attention over an explicit (b, h, t, t) visibility, self-mask included.

    Returns out (b, h, t, e) and the rows' logsumexp (b, h, t).
    """
    t, e = qk.shape[-2:]
    scores = qk @ F.normalize(qk, dim=-1).transpose(-1, -2) * e**-0.5  # (b, h, t, t)
    scores = scores.masked_fill(torch.eye(t, dtype=torch.bool), SELF_SCORE)
    scores = scores.masked_fill(~visible, MASKED)
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def full_visibility(key_mask: Tensor, h: int, causal: bool) -> Tensor:
    """(b, t) -> (b, h, t, t): every real key, or every real key not in the future."""
    t = key_mask.shape[1]
    visible = key_mask[:, None, None, :].expand(-1, h, t, -1)
    return visible & torch.ones(t, t, dtype=torch.bool).tril() if causal else visible


def reference_lsh(
    qk: Tensor, v: Tensor, buckets: Tensor, key_mask: Tensor, c: int, causal: bool
) -> Tensor:
    """The chunking rules of lsh_attention's docstring, written as plain loops over (i, j)."""
    b, h, r, t = buckets.shape
    outs, lses = [], []
    for rnd in range(r):
        visible = torch.zeros(b, h, t, t, dtype=torch.bool)
        for bi in range(b):
            for hi in range(h):
                bucket = buckets[bi, hi, rnd].tolist()
                order = sorted(range(t), key=lambda j, bucket=bucket: (bucket[j], j))
                slot = {j: s for s, j in enumerate(order)}
                for i in range(t):
                    for j in range(t):
                        si, sj = slot[i], slot[j]
                        if causal:
                            ok = j <= i and bucket[j] == bucket[i] and si - sj <= c
                        else:
                            ok = si // c - 1 <= sj // c <= si // c
                        visible[bi, hi, i, j] = ok and bool(key_mask[bi, j])
        out, lse = masked_attention(qk, v, visible)
        outs.append(out)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), dim=0)  # (r, b, h, t)
    return (torch.stack(outs) * weights[..., None]).sum(0)  # (b, h, t, e)


def qkv_inputs(t: int, pad: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    qk, v = torch.randn(2, 2, 2, t, 8, generator=g)  # (b, h, t, e) each
    key_mask = torch.ones(2, t, dtype=torch.bool)
    key_mask[1, t - pad :] = False
    return qk, v, key_mask


@pytest.mark.parametrize("causal", [False, True])
def test_single_chunk_single_bucket_equals_full_attention(causal: bool) -> None:
    t = 12
    qk, v, key_mask = qkv_inputs(t, pad=3)
    buckets = torch.zeros(2, 2, 3, t, dtype=torch.long)  # 3 rounds, everything in bucket 0
    out = lsh_attention(qk, v, buckets, key_mask, chunk_length=t, causal=causal)
    expected, _ = masked_attention(qk, v, full_visibility(key_mask, 2, causal))
    real = key_mask[:, None, :, None].expand_as(out)  # outputs at padding are unspecified
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=0)


def test_single_chunk_bidirectional_ignores_buckets() -> None:
    t = 12
    qk, v, key_mask = qkv_inputs(t, pad=0)
    buckets = torch.randint(0, 4, (2, 2, 2, t), generator=torch.Generator().manual_seed(3))
    out = lsh_attention(qk, v, buckets, key_mask, chunk_length=t, causal=False)
    expected, _ = masked_attention(qk, v, full_visibility(key_mask, 2, causal=False))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_lsh_attention_matches_loop_reference(causal: bool) -> None:
    t, c = 24, 4
    qk, v, key_mask = qkv_inputs(t, pad=5)
    buckets = torch.randint(0, 4, (2, 2, 2, t), generator=torch.Generator().manual_seed(4))
    buckets = buckets.masked_fill(~key_mask[:, None, None, :], 4)  # padding sorts last
    out = lsh_attention(qk, v, buckets, key_mask, chunk_length=c, causal=causal)
    expected = reference_lsh(qk, v, buckets, key_mask, c, causal)
    real = key_mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=0)


def test_query_alone_attends_to_itself() -> None:
    # Causal, one bucket: position 0 has no earlier key, so it must copy its own value.
    qk, v, key_mask = qkv_inputs(8, pad=0)
    buckets = torch.zeros(2, 2, 1, 8, dtype=torch.long)
    out = lsh_attention(qk, v, buckets, key_mask, chunk_length=4, causal=True)
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :], atol=1e-6, rtol=0)


def test_lsh_buckets_range_and_angular_symmetry() -> None:
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(2, 3, 50, 8, generator=g)  # (b, h, t, e)
    rotations = torch.randn(3, 8, 2, 3, generator=g)  # (h, e, r, n_buckets / 2)
    buckets = lsh_buckets(vecs, rotations, (6,))
    assert buckets.shape == (2, 3, 2, 50) and buckets.dtype == torch.long
    assert int(buckets.min()) >= 0 and int(buckets.max()) < 6
    # Angular: a positive scale keeps the bucket, negation moves it half-way round.
    assert torch.equal(lsh_buckets(3.5 * vecs, rotations, (6,)), buckets)
    assert torch.equal(lsh_buckets(-vecs, rotations, (6,)), (buckets + 3) % 6)


def test_factorised_buckets_are_the_mixed_radix_of_per_factor_hashes() -> None:
    """Factors (4, 6): the first 2 rotation columns hash into 4, the next 3 into 6, and the
    bucket is b0 + 4·b1, every one of the 24 reachable; one factor is plain hashing."""
    g = torch.Generator().manual_seed(1)
    vecs = torch.randn(1, 2, 400, 8, generator=g)  # (b, h, t, e)
    rotations = torch.randn(2, 8, 3, 5, generator=g)  # (h, e, r, (4 + 6) / 2)
    got = lsh_buckets(vecs, rotations, (4, 6))
    first = lsh_buckets(vecs, rotations[..., :2], (4,))
    second = lsh_buckets(vecs, rotations[..., 2:], (6,))
    assert torch.equal(got, first + 4 * second)
    assert set(got.unique().tolist()) == set(range(24))
    # the same by hand for one vector: argmax over [xR, -xR] per factor
    rotated = vecs[0, 0, 0] @ rotations[0, :, 0]  # (5,)
    b0 = int(torch.cat([rotated[:2], -rotated[:2]]).argmax())
    b1 = int(torch.cat([rotated[2:], -rotated[2:]]).argmax())
    assert int(got[0, 0, 0, 0]) == b0 + 4 * b1


def test_deterministic_across_calls_and_instances() -> None:
    ids = random_ids(2, 19)
    mask = torch.ones_like(ids)
    first = build(seed=0)
    second = build(seed=99)  # different weights, but the rotations come from hash_seed
    for a, b in zip(first.blocks, second.blocks, strict=True):
        assert torch.equal(a.attn.rotations, b.attn.rotations)
    assert not torch.equal(first.blocks[0].attn.rotations, first.blocks[1].attn.rotations)
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        logits, hidden = first(ids, mask)
        assert torch.equal(first(ids, mask)[0], logits)
        assert torch.equal(second(ids, mask)[1], hidden)
    other_seed = build(dataclasses.replace(TINY, hash_seed=1), seed=0)
    assert not torch.equal(other_seed.blocks[0].attn.rotations, first.blocks[0].attn.rotations)


def test_causal_future_tokens_never_change_the_past() -> None:
    model = build()
    ids = random_ids(1, 33)  # not a multiple of the chunk length
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base = model(ids, mask)[0]
        for p in (1, 6, 15, 24, 32):
            for token in (4, 17, 31):
                changed = ids.clone()
                changed[0, p] = token
                logits = model(changed, mask)[0]
                torch.testing.assert_close(logits[:, :p], base[:, :p], atol=1e-6, rtol=0)


def test_bidirectional_sees_the_future() -> None:
    # The counterpart of the causal test: here a late token must reach early positions.
    model = build(dataclasses.replace(TINY, causal=False))
    ids = random_ids(1, 16)
    changed = ids.clone()
    changed[0, 15] = 4 if int(ids[0, 15]) != 4 else 5
    with torch.no_grad():
        diff = model(changed, torch.ones_like(ids))[0] - model(ids, torch.ones_like(ids))[0]
    assert diff[:, :15].abs().max() > 1e-6


def test_reversible_block_formula_and_inverse() -> None:
    torch.manual_seed(0)
    block = ReversibleBlock(TINY, layer=0).eval()
    x1, x2 = torch.randn(2, 2, 12, TINY.d_model)  # (b, t, d) each
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, 9:] = False
    with torch.no_grad():
        y1, y2 = block(x1, x2, key_mask)
        torch.testing.assert_close(y1, x1 + block.attn(x2, key_mask), atol=1e-6, rtol=0)
        torch.testing.assert_close(y2, x2 + block.ff(y1), atol=1e-6, rtol=0)
        r1, r2 = block.inverse(y1, y2, key_mask)
    torch.testing.assert_close(r1, x1, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2, x2, atol=1e-5, rtol=0)


def test_model_is_duplicated_streams_then_mean() -> None:
    model = build()
    ids = random_ids(1, 8)  # a multiple of the chunk length: no internal padding
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits, hidden = model(ids, mask)
        x = model.embed(ids) + SINUSOID_SCALE * sinusoidal_positions(8, TINY.d_model)  # (b, t, d)
        x1, x2 = x, x
        for block in model.blocks:
            x1, x2 = block(x1, x2, mask.bool())
        expected = model.norm((x1 + x2) / 2)
    torch.testing.assert_close(hidden, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, model.head(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", [1, 5, 13])
def test_lengths_not_a_multiple_of_chunk_length(t: int) -> None:
    logits, hidden = build()(random_ids(2, t), torch.ones(2, t, dtype=torch.long))
    assert logits.shape == (2, t, TINY.vocab_size) and hidden.shape == (2, t, TINY.d_model)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_real_tokens(causal: bool, side: str) -> None:
    # Equal (to rounding), not just close: padding hashes into its own last bucket, chunk 0 does
    # not wrap around and positions count real tokens, so real tokens are chunked identically.
    model = build(dataclasses.replace(TINY, causal=causal))
    ids = random_ids(1, 11)
    n_pad = 14  # enough to add whole chunks, so a wrong padding rule would show
    pad_ids = torch.zeros(1, n_pad, dtype=torch.long)
    pad_mask = torch.zeros(1, n_pad, dtype=torch.long)
    one = torch.ones(1, 11, dtype=torch.long)
    if side == "right":
        padded_ids, padded_mask = torch.cat([ids, pad_ids], 1), torch.cat([one, pad_mask], 1)
        real_slice = slice(0, 11)
    else:
        padded_ids, padded_mask = torch.cat([pad_ids, ids], 1), torch.cat([pad_mask, one], 1)
        real_slice = slice(n_pad, None)
    with torch.no_grad():
        alone = model(ids, one)[0]
        padded = model(padded_ids, padded_mask)[0]
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, real_slice], alone, atol=1e-6, rtol=0)


def test_chunked_feed_forward_matches_unchunked() -> None:
    # Exporters build the model with ff_chunk_size=0; the same weights must give the same output.
    chunked = build(dataclasses.replace(TINY, ff_chunk_size=3))
    whole = ReformerModel(TINY).eval()
    whole.load_state_dict(chunked.state_dict())
    ids = random_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(
            chunked(ids, torch.ones_like(ids))[0],
            whole(ids, torch.ones_like(ids))[0],
            atol=1e-6,
            rtol=0,
        )


def test_trace_at_one_length_runs_at_others() -> None:
    model = build()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated but still supported
        traced = torch.jit.trace(model, (random_ids(2, 8), torch.ones(2, 8, dtype=torch.long)))
        for t in (3, 17):
            ids, mask = random_ids(1, t), torch.ones(1, t, dtype=torch.long)
            torch.testing.assert_close(traced(ids, mask)[0], model(ids, mask)[0], atol=1e-6, rtol=0)


def test_task_and_length_limit() -> None:
    assert TINY.task == "generate" and TINY.max_positions is None
    assert dataclasses.replace(TINY, causal=False).task == "encode"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"n_buckets": 5}, "n_buckets"),
        ({"n_buckets": 0}, "n_buckets"),
        ({"n_heads": 3}, "n_heads"),
        ({"chunk_length": 0}, "chunk_length"),
        ({"n_hashes": 0}, "n_hashes"),
        ({"ff_chunk_size": -1}, "ff_chunk_size"),
        ({"hash_seed": -1}, "hash_seed"),
        ({"vocab_size": 3}, "vocab_size"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ],
)
def test_config_validation(override: dict[str, int | float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **override)
