"""Shatter: partition functions, the partitioned attention against slow references, the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from exporters.architectures import shatter as shatter_module
from exporters.architectures.shatter import (
    ShatterAttention,
    ShatterConfig,
    ShatterEncoder,
    shatter_attention,
    shatter_attention_blocked,
    shatter_partitions,
)

TINY = ShatterConfig(vocab_size=48, d_model=16, n_layers=2, d_ff=32, n_parts=4, max_distance=64)


def make_model(config: ShatterConfig = TINY, seed: int = 0) -> ShatterEncoder:
    torch.manual_seed(seed)
    return ShatterEncoder(config).eval()


def random_ids(b: int, t: int, vocab: int = TINY.vocab_size, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def wide_offsets() -> torch.Tensor:
    """Every offset in −300..300 plus a log-spaced sample out to ±10^5, both signs."""
    far = torch.logspace(0, 5, 200).round().long()
    return torch.cat([torch.arange(-300, 301), far, -far])


# ---------------------------------------------------------------- partitions


@pytest.mark.parametrize("n_parts", [1, 2, 3, 4, 7])
def test_partitions_are_a_partition_of_unity(n_parts: int) -> None:
    pi = shatter_partitions(wide_offsets(), n_parts, max_distance=512, width=0.5)
    assert pi.shape == (wide_offsets().numel(), n_parts)
    assert pi.min() >= 0
    torch.testing.assert_close(pi.sum(-1), torch.ones(len(pi)), atol=1e-6, rtol=0)


def test_single_partition_is_identically_one() -> None:
    pi = shatter_partitions(wide_offsets(), 1)
    assert torch.equal(pi, torch.ones_like(pi))


def test_partitions_are_signed_mirrored_and_saturate() -> None:
    r = torch.arange(1, 301)
    pi_right, pi_left = shatter_partitions(r, 4, 64), shatter_partitions(-r, 4, 64)
    # Mirror images: π_p(−r) = π_{P−1−p}(r), yet left and right differ, so order is visible.
    torch.testing.assert_close(pi_left, pi_right.flip(-1), atol=1e-6, rtol=0)
    assert (pi_left - pi_right).abs().amax(-1).min() > 0.1
    # Beyond max_distance everything falls into the outermost part, smoothly and for any |r|.
    far = shatter_partitions(torch.tensor([10**4, 10**7, -(10**7)]), 4, 64)
    assert far[0, -1] > 0.99 and far[1, -1] > 0.999 and far[2, 0] > 0.999
    assert torch.isfinite(far).all()


@pytest.mark.parametrize("length", [1, 5, 33, 2048])
def test_model_partition_grid_matches_direct_evaluation(length: int) -> None:
    """The gathered (t, t, p) table equals π evaluated at every j − i, at long lengths too."""
    model = make_model()
    grid = model.relative_partitions(torch.zeros(1, length, dtype=torch.long))
    pos = torch.arange(length)
    direct = shatter_partitions(pos[None, :] - pos[:, None], 4, 64, TINY.partition_width)
    assert grid.shape == (length, length, 4)
    torch.testing.assert_close(grid, direct, atol=0, rtol=0)


# ---------------------------------------------------------------- attention math


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    partitions: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Slow float64 reference: out_i = Σ_j a_ij Σ_p π_p(i, j) v_pj with masked softmax."""
    q, k, v, partitions = (x.double() for x in (q, k, v, partitions))
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (b, t, s)
    scores = scores.masked_fill(~key_mask.bool()[:, None, :], float("-inf"))
    attn = scores.softmax(-1)
    return torch.einsum("bts,tsp,bpse->bte", attn, partitions, v).float()


def attention_inputs(b: int, t: int, e: int, p: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(t)
    q, k = torch.randn(b, t, e, generator=g), torch.randn(b, t, e, generator=g)
    v = torch.randn(b, p, t, e, generator=g)
    pos = torch.arange(t)
    partitions = shatter_partitions(pos[None, :] - pos[:, None], p, 16)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - t // 3 :] = 0  # first row right-padded by a third
    return q, k, v, partitions, mask


@pytest.mark.parametrize("length", [1, 5, 33, 128])
@pytest.mark.parametrize("n_parts", [1, 3])
def test_attention_matches_naive_reference(length: int, n_parts: int) -> None:
    q, k, v, partitions, mask = attention_inputs(2, length, 8, n_parts)
    out = shatter_attention(q, k, v, partitions, mask)
    assert out.shape == (2, length, 8)
    torch.testing.assert_close(out, naive_attention(q, k, v, partitions, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [1, 5, 33, 300])
@pytest.mark.parametrize("block", [3, 16, 64])
def test_blocked_attention_matches_naive_reference(length: int, block: int) -> None:
    q, k, v, partitions, mask = attention_inputs(2, length, 8, 3)
    offsets = torch.arange(1 - length, length)
    table = shatter_partitions(offsets, 3, 16).T  # (p, 2t − 1)
    out = shatter_attention_blocked(q, k, v, table, mask, block)
    assert out.shape == (2, length, 8)
    # Non-causal, right padding in row 0: every query row is real and checked.
    torch.testing.assert_close(out, naive_attention(q, k, v, partitions, mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, shatter_attention(q, k, v, partitions, mask), atol=1e-5, rtol=0)


def test_blocked_attention_never_builds_an_n_by_n_map(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = []

    def recording(*args: torch.Tensor | None) -> torch.Tensor:
        shapes.append(tuple(args[3].shape))  # type: ignore[union-attr]
        return shatter_attention(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(shatter_module, "shatter_attention", recording)
    q, k, v, _, mask = attention_inputs(1, 100, 8, 3)
    shatter_attention_blocked(q, k, v, shatter_partitions(torch.arange(-99, 100), 3).T, mask, 32)
    assert shapes == [(32, 100, 3), (32, 100, 3), (32, 100, 3), (4, 100, 3)]


@pytest.mark.parametrize("length", [9, 70])
def test_blocked_model_equals_unblocked_model(length: int) -> None:
    unblocked = make_model(dataclasses.replace(TINY, attention_block=0))
    blocked = make_model(dataclasses.replace(TINY, attention_block=8))
    blocked.load_state_dict(unblocked.state_dict())
    ids = random_ids(2, length)
    mask = torch.ones_like(ids)
    mask[1, length - length // 3 :] = 0  # right padding
    with torch.no_grad():
        want, got = unblocked(ids, mask), blocked(ids, mask)
    real = mask.bool()
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g[real], w[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [1, 5, 33])
def test_one_part_is_plain_single_head_attention(length: int) -> None:
    q, k, v, partitions, mask = attention_inputs(2, length, 8, 1)
    out = shatter_attention(q, k, v, partitions, mask)
    bias = torch.zeros(2, 1, length).masked_fill(~mask.bool()[:, None, :], float("-inf"))
    ref = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5 + bias, -1) @ v[:, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_one_part_layer_equals_torch_multihead_attention_with_one_head() -> None:
    config = dataclasses.replace(TINY, n_parts=1)
    torch.manual_seed(0)
    layer = ShatterAttention(config).eval()
    mha = nn.MultiheadAttention(config.d_model, num_heads=1, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(
            torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
        )
        mha.in_proj_bias.copy_(torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))
        mha.out_proj.weight.copy_(layer.out_proj.weight)
        mha.out_proj.bias.copy_(layer.out_proj.bias)
    x = torch.randn(2, 9, config.d_model)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    with torch.no_grad():
        out = layer(x, torch.ones(9, 9, 1), mask)
        ref, _ = mha(x, x, x, key_padding_mask=~mask.bool(), need_weights=False)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- model


def test_forward_contract_shapes_and_normalised_hidden() -> None:
    model = make_model()
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        logits, hidden = model(ids, mask)
    assert logits.shape == (2, 12, TINY.vocab_size) and hidden.shape == (2, 12, TINY.d_model)
    assert torch.isfinite(logits).all() and torch.isfinite(hidden).all()  # padding too
    # The final LayerNorm (unit weight, zero bias at init) leaves each position standardised.
    torch.testing.assert_close(hidden.mean(-1), torch.zeros(2, 12), atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [1, 5, 33])
def test_appended_padding_leaves_real_tokens_unchanged(length: int) -> None:
    model = make_model()
    ids = random_ids(1, length)
    padded = torch.cat([ids, torch.zeros(1, 11, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, length), torch.zeros(1, 11)], dim=1).long()
    with torch.no_grad():
        alone_logits, alone_hidden = model(ids, torch.ones_like(ids))
        logits, hidden = model(padded, mask)
    torch.testing.assert_close(logits[:, :length], alone_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[:, :length], alone_hidden, atol=1e-5, rtol=0)


def test_batch_of_different_lengths_equals_each_row_alone() -> None:
    model = make_model()
    long_row, short_row = random_ids(1, 33, seed=2), random_ids(1, 5, seed=3)
    ids = torch.zeros(2, 33, dtype=torch.long)
    mask = torch.zeros(2, 33, dtype=torch.long)
    ids[0], mask[0] = long_row[0], 1
    ids[1, :5], mask[1, :5] = short_row[0], 1
    with torch.no_grad():
        logits, _ = model(ids, mask)
        long_alone, _ = model(long_row, torch.ones_like(long_row))
        short_alone, _ = model(short_row, torch.ones_like(short_row))
    torch.testing.assert_close(logits[0], long_alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, :5], short_alone[0], atol=1e-5, rtol=0)


def swap_outputs(config: ShatterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states for a sequence and for it with tokens 2 and 6 swapped (swapped back)."""
    model = make_model(config)
    ids = random_ids(1, 10)
    swapped = ids.clone()
    swapped[0, [2, 6]] = ids[0, [6, 2]]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        _, hidden = model(ids, mask)
        _, hidden_swapped = model(swapped, mask)
    hidden_swapped[0, [2, 6]] = hidden_swapped[0, [6, 2]].clone()  # undo the permutation
    return hidden, hidden_swapped


def test_partitions_make_the_model_order_aware() -> None:
    hidden, hidden_swapped = swap_outputs(TINY)
    # Every position, including ones not swapped, sees the change through relative offsets.
    assert (hidden - hidden_swapped).abs().amax(-1).min() > 1e-3


def test_one_part_model_has_no_position_information() -> None:
    """The control for the test above: P = 1 is permutation-equivariant, a bag of words."""
    hidden, hidden_swapped = swap_outputs(dataclasses.replace(TINY, n_parts=1))
    torch.testing.assert_close(hidden, hidden_swapped, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- config


def test_config_properties_and_frozen() -> None:
    assert TINY.task == "encode"
    assert TINY.max_positions is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.n_parts = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("d_model", -1),
        ("n_layers", 0),
        ("d_ff", 0),
        ("n_parts", 0),
        ("max_distance", 0),
        ("partition_width", 0.0),
        ("partition_width", float("nan")),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("attention_block", -1),
    ],
)
def test_config_rejects_invalid_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        ShatterConfig(**{field: value})
