"""ALiBi decoder: slopes and bias against the paper, causality, KV-cache parity, extrapolation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from exporters.architectures import alibi as alibi_module
from exporters.architectures.alibi import (
    AlibiConfig,
    AlibiLM,
    alibi_attention,
    alibi_attention_blocked,
    alibi_bias,
    alibi_slopes,
    block_positions,
)
from exporters.architectures.common import init_weights, layer_caches

# 6 heads (not a power of two) so the interleaved slopes are exercised end to end.
CONFIG = AlibiConfig(vocab_size=40, d_model=24, n_heads=6, n_layers=2, d_ff=48, trained_context=8)
ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> AlibiLM:
    torch.manual_seed(0)
    m = AlibiLM(CONFIG).eval()
    # Larger weights than the 0.02 training init: peaked attention, so a wrong bias, mask or
    # cache offset moves the logits well above the tolerance.
    init_weights(m, std=0.3)
    return m


def random_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, CONFIG.vocab_size, (b, t), generator=g)


def decode_in_chunks(
    model: AlibiLM, ids: torch.Tensor, mask: torch.Tensor, sizes: list[int]
) -> torch.Tensor:
    """Feed ids through forward_cached chunk by chunk; returns the concatenated logits."""
    assert sum(sizes) == ids.shape[1]
    past = model.empty_cache(ids.shape[0], torch.float32, ids.device)
    logits, start = [], 0
    for n in sizes:
        end = start + n
        out, past = model.forward_cached(ids[:, start:end], mask[:, :end], past)
        assert past.shape == (
            CONFIG.n_layers,
            2,
            ids.shape[0],
            CONFIG.n_heads,
            end,
            CONFIG.head_dim,
        )
        logits.append(out)
        start = end
    return torch.cat(logits, dim=1)


# --- pure functions ----------------------------------------------------------------------------


def test_slopes_8_heads_are_powers_of_one_half() -> None:
    expected = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    torch.testing.assert_close(alibi_slopes(8), torch.tensor(expected), rtol=0, atol=0)


def test_slopes_12_heads_follow_the_paper_interleaving() -> None:
    # 8-head slopes, then 16-head slopes 2^-0.5, 2^-1, 2^-1.5, ... taken at even indices: the
    # first 12 - 8 = 4 of 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    expected = [
        *(0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625),
        0.7071067811865476,  # 2^-0.5
        0.3535533905932738,  # 2^-1.5
        0.1767766952966369,  # 2^-2.5
        0.08838834764831845,  # 2^-3.5
    ]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected), rtol=1e-7, atol=0)


def test_slopes_6_heads() -> None:
    # 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then 8-head slopes at even indices: 2^-1, 2^-3.
    expected = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected), rtol=0, atol=0)


def test_bias_is_minus_slope_times_distance() -> None:
    slopes = alibi_slopes(4)
    q_pos, k_pos = torch.arange(3, 7), torch.arange(7)
    bias = alibi_bias(slopes, q_pos, k_pos)
    assert bias.shape == (4, 4, 7)
    for h in range(4):
        for i in range(4):
            for j in range(7):
                want = -slopes[h].item() * (q_pos[i].item() - k_pos[j].item())
                assert bias[h, i, j].item() == pytest.approx(want, abs=1e-6)
    # Per-row positions give a per-row bias; an offset shared by i and j changes nothing.
    rows = alibi_bias(slopes, torch.stack([q_pos, q_pos + 100]), torch.stack([k_pos, k_pos + 100]))
    assert rows.shape == (2, 4, 4, 7)
    torch.testing.assert_close(rows[0], bias)
    torch.testing.assert_close(rows[1], bias)


def test_attention_with_zero_bias_is_causal_sdpa_on_the_last_queries() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g) for _ in range(3))  # (b, h, s, e)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ones = torch.ones(2, 6, dtype=torch.int64)
    # Queries are the last t of the s keys: the same rows of full causal attention.
    out = alibi_attention(q[:, :, 4:], k, v, torch.zeros(3, 2, 6), ones)
    torch.testing.assert_close(out, ref[:, :, 4:], atol=1e-6, rtol=0)
    # A padded key is ignored: equal to attention over the remaining keys.
    mask = ones.clone()
    mask[:, 1] = 0
    keep = [0, 2, 3, 4, 5]
    out = alibi_attention(q[:, :, 5:], k, v, torch.zeros(3, 1, 6), mask)
    ref = F.scaled_dot_product_attention(q[:, :, 5:], k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def naive_alibi_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Float64 reference with the full (b, h, t, s) bias: queries are the last t of s slots,
    positions count real tokens, padded and future keys are masked. Rows of padded queries
    (unspecified by the model contract) are zero."""
    t, s = q.shape[-2], k.shape[-2]
    positions = mask.cumsum(-1) - 1  # (b, s)
    bias = alibi_bias(slopes.double(), positions[:, s - t :], positions)  # (b, h, t, s)
    slot = torch.arange(s)
    visible = (slot[None, :] <= slot[s - t :, None]) & mask.bool()[:, None, :]  # (b, t, s)
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)
    return (probs @ v.double()).float()


def blocked_inputs(
    b: int, h: int, t: int, past: int, e: int = 8, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, e, generator=g) * 2  # peaked scores: a wrong mask shows
    k, v = (torch.randn(b, h, past + t, e, generator=g) for _ in range(2))
    mask = torch.ones(b, past + t, dtype=torch.int64)
    if b > 1:
        mask[1, : (past + t) // 3] = 0  # second row left-padded by a third of the slots
        if past > 2:
            mask[1, past - 2] = 0  # and a free slot inside its cache
    return q, k, v, mask


@pytest.mark.parametrize("t", [1, 7, 64, 300])
@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("block", [3, 16, 64])
def test_blocked_attention_matches_the_naive_reference(t: int, past: int, block: int) -> None:
    slopes = alibi_slopes(6)
    q, k, v, mask = blocked_inputs(2, 6, t, past, seed=t + past)
    positions = block_positions(slopes, mask, t)
    out = alibi_attention_blocked(
        q, k[..., :past, :], v[..., :past, :], k[..., past:, :], v[..., past:, :], positions, block
    )
    assert out.shape == q.shape
    assert out.isfinite().all()
    real = mask[:, None, past:, None].bool()  # (b, 1, t, 1): padded query rows are unspecified
    reference = naive_alibi_attention(q, k, v, slopes, mask)
    torch.testing.assert_close(out * real, reference * real, atol=ATOL, rtol=0)
    # ... and the unblocked function, the one exported graphs hold, within fp32 rounding.
    positions_all = mask.cumsum(-1) - 1
    unblocked = alibi_attention(
        q, k, v, alibi_bias(slopes, positions_all[:, past:], positions_all), mask
    )
    torch.testing.assert_close(out * real, unblocked * real, atol=ATOL, rtol=0)


@pytest.mark.parametrize("t", [7, 64, 300])
@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("block", [3, 16, 64])
def test_unpadded_blocks_read_one_shared_mask_with_the_same_numbers(
    t: int, past: int, block: int
) -> None:
    slopes = alibi_slopes(6)
    q, k, v, mask = blocked_inputs(1, 6, t, past, seed=t + past)  # one row: nothing padded
    shared = block_positions(slopes, mask, t, block)
    assert shared.toeplitz is not None
    assert shared.toeplitz.shape == (6, block, past + t + block)  # O(h · block · s)
    split = (q, k[..., :past, :], v[..., :past, :], k[..., past:, :], v[..., past:, :])
    out = alibi_attention_blocked(*split, shared, block)
    reference = naive_alibi_attention(q, k, v, slopes, mask)
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    # ... the per-block masks (what a padded batch builds) and the split path of bf16 models.
    per_block = alibi_attention_blocked(*split, block_positions(slopes, mask, t), block)
    torch.testing.assert_close(out, per_block, atol=1e-6, rtol=0)
    double = alibi_attention_blocked(*(x.double() for x in split), shared, block)
    torch.testing.assert_close(out, double.float(), atol=ATOL, rtol=0)
    # Its block/key slices are exactly alibi_bias, with future keys at the lowest float.
    positions = mask.cumsum(-1) - 1
    bias = alibi_bias(slopes, positions[:, past:], positions)[0]  # (h, t, s)
    start = t - min(block, t)
    view = shared.toeplitz[:, : t - start, t - start : t - start + past + t]  # (h, B, s)
    future = torch.arange(past + t)[None, :] > torch.arange(past + start, past + t)[:, None]
    torch.testing.assert_close(view[:, ~future], bias[:, start:][:, ~future], atol=0, rtol=0)
    assert (view[:, future] == torch.finfo(torch.float32).min).all()


def test_blocked_attention_never_builds_a_bias_longer_than_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shapes: list[tuple[int, ...]] = []

    def recording_bias(*args: torch.Tensor) -> torch.Tensor:
        out = alibi_bias(*args)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(alibi_module, "alibi_bias", recording_bias)
    slopes = alibi_slopes(4)
    q, k, v, mask = blocked_inputs(1, 4, 200, 0)
    positions = block_positions(slopes, mask, 200)
    empty = k[..., :0, :]
    alibi_attention_blocked(q, empty, empty, k, v, positions, 32)
    assert shapes and max(shape[-2] for shape in shapes) == 32  # query rows per bias: the block
    assert max(shape[-1] for shape in shapes) == 200  # keys: causal, at most all of them


# --- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [9, 40, 129])
@pytest.mark.parametrize("padded", [True, False])
def test_blocked_model_equals_unblocked_model_with_padding_and_a_past(
    model: AlibiLM, length: int, padded: bool
) -> None:
    blocked = AlibiLM(dataclasses.replace(CONFIG, attention_block=8)).eval()
    unblocked = AlibiLM(dataclasses.replace(CONFIG, attention_block=0)).eval()
    blocked.load_state_dict(model.state_dict())
    unblocked.load_state_dict(model.state_dict())
    ids = random_ids(2, length)
    mask = torch.ones_like(ids)
    if padded:  # else every block reads the shared Toeplitz mask
        mask[1, : length // 2] = 0  # left padding
    with torch.no_grad():
        want_logits, want_hidden = unblocked(ids, mask)
        got_logits, got_hidden = blocked(ids, mask)
        real = mask.bool()  # outputs at padding are unspecified (common.py)
        torch.testing.assert_close(got_logits[real], want_logits[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(got_hidden[real], want_hidden[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(blocked.hidden_states(ids, mask), got_hidden, atol=0, rtol=0)
        # A long chunk on top of a cache (chunked prefill): blocked queries over past + new keys.
        half = length // 2
        _, past = unblocked.forward_cached(
            ids[:, :half], mask[:, :half], unblocked.empty_cache(2, torch.float32, ids.device)
        )
        want, _ = unblocked.forward_cached(ids[:, half:], mask, past)
        got, _ = blocked.forward_cached(ids[:, half:], mask, past)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_forward_shapes_and_contract(model: AlibiLM) -> None:
    ids = random_ids(2, 5)
    logits, hidden = model(ids, torch.ones_like(ids))
    assert logits.shape == (2, 5, CONFIG.vocab_size)
    assert hidden.shape == (2, 5, CONFIG.d_model)
    assert CONFIG.task == "generate" and CONFIG.max_positions is None
    assert model.empty_cache(3, torch.float32, torch.device("cpu")).shape == (
        2,
        2,
        3,
        6,
        0,
        CONFIG.head_dim,
    )


def test_future_tokens_never_change_earlier_logits(model: AlibiLM) -> None:
    ids = random_ids(1, 10)
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1 - 4) % (CONFIG.vocab_size - 4) + 4
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, _ = model(ids, mask)
        b, _ = model(changed, mask)
    assert torch.equal(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3  # the change does reach later positions


@pytest.mark.parametrize("sizes", [[4, 1, 1, 1, 1], [1] * 8, [3, 2, 3], [5, 3]])
def test_cached_decoding_matches_full_forward(model: AlibiLM, sizes: list[int]) -> None:
    ids = random_ids(1, 8)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full, _ = model(ids, mask)
        cached = decode_in_chunks(model, ids, mask, sizes)
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sizes", [[8], [5, 1, 1, 1], [3, 3, 2]])
def test_left_padded_batch_matches_each_row_alone(model: AlibiLM, sizes: list[int]) -> None:
    long, short = random_ids(1, 8, seed=2), random_ids(1, 5, seed=3)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.int64), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        alone_long, _ = model(long, torch.ones_like(long))
        alone_short, _ = model(short, torch.ones_like(short))
        batched = decode_in_chunks(model, ids, mask, sizes)
    torch.testing.assert_close(batched[0], alone_long[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1, 3:], alone_short[0], atol=ATOL, rtol=0)


def test_padding_inside_the_cache_does_not_shift_distances(model: AlibiLM) -> None:
    # A row that joined a chunk with fewer tokens than its neighbour carries pads mid-cache.
    ids = random_ids(1, 6, seed=4)
    with torch.no_grad():
        alone, _ = model(ids, torch.ones_like(ids))
        past = model.empty_cache(1, torch.float32, ids.device)
        first, past = model.forward_cached(ids[:, :3], torch.ones(1, 3, dtype=torch.int64), past)
        chunk = torch.cat([torch.zeros(1, 2, dtype=torch.int64), ids[:, 3:]], 1)
        mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])
        second, _ = model.forward_cached(chunk, mask, past)
    torch.testing.assert_close(torch.cat([first, second[:, 2:]], 1), alone, atol=ATOL, rtol=0)


def scatter_past(present: torch.Tensor, real: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(L, 2, 1, h, n, e) -> (L, 2, 1, h, P, e) with the n entries at the slots where ``real``
    (P,) is True and random junk elsewhere: junk must not matter if padding is never attended."""
    past = torch.randn(*present.shape[:4], real.numel(), present.shape[-1], generator=gen) * 50
    past[..., real, :] = present
    return past


@pytest.mark.parametrize("n", [1, 7, 64, 1100])
def test_forward_step_with_padding_anywhere_in_the_past_equals_the_unpadded_sequence(
    model: AlibiLM, n: int
) -> None:
    """What the service's decode buffer does: real tokens, free (masked) slots, then the new
    token; also pads before and between real tokens. Logits and the new entries equal
    forward_cached on the same tokens without any padding."""
    ids = random_ids(1, n + 1, seed=n)
    gen = torch.Generator().manual_seed(n)
    with torch.no_grad():
        past = model.empty_cache(1, torch.float32, ids.device)
        _, present = model.forward_cached(ids[:, :n], torch.ones(1, n, dtype=torch.int64), past)
        want, full = model.forward_cached(
            ids[:, n:], torch.ones(1, n + 1, dtype=torch.int64), present
        )
        free = 5 + n // 4
        layouts = {
            "free slots after the real ones": torch.arange(n + free) < n,
            "scattered": torch.randperm(n + free, generator=gen) < n,
        }
        for name, real in layouts.items():
            padded = scatter_past(present, real, gen)
            mask = torch.cat([real.long(), torch.ones(1, dtype=torch.int64)])[None]
            got, new = model.forward_step(ids[:, n:], mask, layer_caches(padded))
            assert new.shape == (CONFIG.n_layers, 2, 1, CONFIG.n_heads, 1, CONFIG.head_dim)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=name)
            torch.testing.assert_close(new, full[..., n:, :], atol=ATOL, rtol=0, msg=name)


def test_forward_step_returns_only_the_new_entries_of_forward_cached(model: AlibiLM) -> None:
    """One implementation: forward_cached is forward_step plus the past in front."""
    ids = random_ids(2, 9, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        past = model.empty_cache(2, torch.float32, ids.device)
        first, prompt = model.forward_step(ids[:, :6], mask[:, :6], layer_caches(past))
        cached_first, present = model.forward_cached(ids[:, :6], mask[:, :6], past)
        second, new = model.forward_step(ids[:, 6:], mask, layer_caches(prompt))
        cached_second, full = model.forward_cached(ids[:, 6:], mask, present)
    assert prompt.shape[4] == 6 and new.shape[4] == 3
    assert torch.equal(first, cached_first) and torch.equal(prompt, present)
    assert torch.equal(second, cached_second) and torch.equal(full, torch.cat([prompt, new], 4))


def test_runs_at_four_times_the_trained_context(model: AlibiLM) -> None:
    ids = random_ids(1, 4 * CONFIG.trained_context)
    with torch.no_grad():
        logits, hidden = model(ids, torch.ones_like(ids))
    assert logits.shape == (1, 32, CONFIG.vocab_size)
    assert torch.isfinite(logits).all() and torch.isfinite(hidden).all()


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vocab_size", 0, "vocab_size must be positive"),
        ("vocab_size", 3, "special tokens"),
        ("d_model", -8, "d_model must be positive"),
        ("n_heads", 0, "n_heads must be positive"),
        ("n_heads", 5, "divisible by n_heads"),
        ("n_layers", 0, "n_layers must be positive"),
        ("d_ff", 0, "d_ff must be positive"),
        ("trained_context", 0, "trained_context must be positive"),
        ("dropout", 1.0, "dropout"),
        ("dropout", -0.1, "dropout"),
        ("layer_norm_eps", 0.0, "layer_norm_eps"),
        ("attention_block", -1, "attention_block"),
    ],
)
def test_config_rejects_bad_values(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIG, **{field: value})


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONFIG.n_heads = 2  # type: ignore[misc]
