"""Linformer: the efficient path against naive softmax attention, padding, sharing, limits."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from exporters.architectures import linformer
from exporters.architectures.common import key_padding_bias
from exporters.architectures.linformer import (
    LinformerConfig,
    LinformerEncoder,
    linformer_attention,
    linformer_project,
)

N_MAX = 64
LENGTHS = [1, 7, 32, 64]
SHARING_MODES = ["none", "key-value", "layerwise"]
ATOL = 1e-5


def tiny_config(**overrides: Any) -> LinformerConfig:
    values: dict[str, Any] = dict(
        vocab_size=50, d_model=16, n_heads=2, n_layers=2, d_ff=32, k=8, n_max=N_MAX
    )
    values.update(overrides)
    return LinformerConfig(**values)


def tiny_model(seed: int = 0, **overrides: Any) -> LinformerEncoder:
    torch.manual_seed(seed)
    return LinformerEncoder(tiny_config(**overrides)).eval()


def naive_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """Reference full softmax attention, (b, h, t, e) -> (b, h, t, e), padded keys masked."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + key_padding_bias(key_mask, q.dtype)
    return scores.softmax(dim=-1) @ v


def random_ids(b: int, t: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, 50, (b, t), generator=generator)


def run(model: LinformerEncoder, ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return model(ids, torch.ones_like(ids) if mask is None else mask)


# --- attention math -------------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_identity_projection_is_full_attention(n: int) -> None:
    torch.manual_seed(n)
    q, k, v = torch.randn(3, 2, 3, n, 4).unbind(0)  # 3 × (b, h, n, e)
    # k = n and the first n columns of E = F are the identity; the rest must be sliced away.
    E = torch.eye(n, N_MAX)
    mask = torch.ones(2, n, dtype=torch.int64)
    got = linformer_attention(q, k, v, E, E.clone(), mask)
    torch.testing.assert_close(got, naive_attention(q, k, v, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_real", [1, 7, 32])
def test_project_ignores_padded_rows(n_real: int) -> None:
    torch.manual_seed(n_real)
    x = torch.randn(2, 3, N_MAX, 4)  # (b, h, s, e), garbage beyond n_real
    E = torch.randn(8, N_MAX)
    mask = torch.zeros(2, N_MAX, dtype=torch.int64)
    mask[:, :n_real] = 1
    expected = E[:, :n_real] @ x[:, :, :n_real]  # (b, h, k, e) from the real rows only
    torch.testing.assert_close(linformer_project(x, E, mask), expected, atol=ATOL, rtol=0)


def test_project_rejects_sequence_longer_than_projection() -> None:
    with pytest.raises(ValueError, match=r"65.*64"):
        linformer_project(torch.zeros(1, 1, 65, 4), torch.zeros(8, 64), torch.ones(1, 65))


@pytest.mark.parametrize("n", LENGTHS)
def test_model_with_identity_projections_is_full_attention_model(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(seed=n, k=n)
    with torch.no_grad():
        for matrix in model.seq_proj:
            matrix.copy_(torch.eye(n, N_MAX))
    ids = random_ids(2, n, seed=n)
    logits, hidden = run(model, ids)

    # Same weights, every layer's attention swapped for the naive reference.
    def full(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, key_mask: Tensor) -> Tensor:
        return naive_attention(q, k, v, key_mask)

    monkeypatch.setattr(linformer, "linformer_attention", full)
    ref_logits, ref_hidden = run(model, ids)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, ref_hidden, atol=ATOL, rtol=0)


# --- model behaviour ------------------------------------------------------------------------


def test_output_shapes_and_finite_padding() -> None:
    model = tiny_model()
    ids = random_ids(3, 10, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    logits, hidden = run(model, ids, mask)
    assert logits.shape == (3, 10, 50)
    assert hidden.shape == (3, 10, 16)
    assert torch.isfinite(logits).all() and torch.isfinite(hidden).all()


@pytest.mark.parametrize("sharing", SHARING_MODES)
@pytest.mark.parametrize("n_real", [1, 7, 32])
def test_appended_padding_does_not_change_real_tokens(sharing: str, n_real: int) -> None:
    model = tiny_model(sharing=sharing)
    ids = random_ids(1, N_MAX, seed=n_real)  # random ids at the pads too: their content is moot
    mask = torch.zeros_like(ids)
    mask[:, :n_real] = 1
    alone_logits, alone_hidden = run(model, ids[:, :n_real])
    padded_logits, padded_hidden = run(model, ids, mask)
    torch.testing.assert_close(padded_logits[:, :n_real], alone_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(padded_hidden[:, :n_real], alone_hidden, atol=ATOL, rtol=0)


def test_batch_rows_equal_rows_computed_alone() -> None:
    model = tiny_model()
    lengths = [7, 32]
    ids = random_ids(2, max(lengths), seed=3)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    logits, hidden = run(model, ids, mask)
    for row, n in enumerate(lengths):
        row_logits, row_hidden = run(model, ids[row : row + 1, :n])
        torch.testing.assert_close(logits[row : row + 1, :n], row_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(hidden[row : row + 1, :n], row_hidden, atol=ATOL, rtol=0)


def test_same_input_same_output() -> None:
    model = tiny_model()
    ids = random_ids(2, 7, seed=4)
    first, second = run(model, ids), run(model, ids)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("n", [N_MAX + 1, 2 * N_MAX])
def test_longer_than_n_max_raises(n: int) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=rf"\b{n}\b.*n_max={N_MAX}"):
        run(model, random_ids(1, n, seed=0))


def test_n_max_itself_is_accepted() -> None:
    logits, _ = run(tiny_model(), random_ids(1, N_MAX, seed=0))
    assert logits.shape == (1, N_MAX, 50)


# --- sharing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sharing", "n_matrices"), [("none", 4), ("key-value", 2), ("layerwise", 1)]
)
def test_sharing_mode_sets_number_of_projection_tensors(sharing: str, n_matrices: int) -> None:
    model = tiny_model(sharing=sharing)  # 2 layers
    assert len(model.seq_proj) == n_matrices
    assert sum(key.startswith("seq_proj.") for key in model.state_dict()) == n_matrices
    base = sum(p.numel() for p in tiny_model(sharing="layerwise").parameters())
    extra = sum(p.numel() for p in model.parameters()) - base
    assert extra == (n_matrices - 1) * 8 * N_MAX  # each extra (k, n_max) matrix


@pytest.mark.parametrize(
    ("sharing", "n_distinct"), [("none", 4), ("key-value", 2), ("layerwise", 1)]
)
def test_sharing_mode_passes_the_same_tensors(
    sharing: str, n_distinct: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(sharing=sharing)
    seen: list[tuple[Tensor, Tensor]] = []
    real = linformer.linformer_attention

    def spy(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, key_mask: Tensor) -> Tensor:
        seen.append((E, F))
        return real(q, k, v, E, F, key_mask)

    monkeypatch.setattr(linformer, "linformer_attention", spy)
    run(model, random_ids(1, 5, seed=0))
    assert len(seen) == 2  # one call per layer
    assert all((E is F) == (sharing != "none") for E, F in seen)
    assert len({id(matrix) for pair in seen for matrix in pair}) == n_distinct


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": -3}, "k"),
        ({"k": N_MAX + 1}, "k"),
        ({"n_max": 0}, "n_max"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": 3}, "vocab_size"),
        ({"d_model": 10, "n_heads": 3}, "d_model"),
        ({"sharing": "headwise"}, "sharing"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_is_frozen_and_describes_the_task() -> None:
    config = tiny_config()
    assert config.task == "encode"
    assert config.max_positions == N_MAX
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.k = 4  # type: ignore[misc]
    LinformerConfig()  # the defaults are valid


def test_position_table_starts_smooth_in_position() -> None:
    """Native init: neighbouring positions start more alike than distant ones (sinusoids)."""
    model = LinformerEncoder(tiny_config(d_model=64, n_max=512))
    table = torch.nn.functional.normalize(model.pos_emb.weight, dim=-1)  # (n_max, d)
    near = (table[:-1] * table[1:]).sum(-1).mean()
    far = (table[:-100] * table[100:]).sum(-1).mean()
    assert near > 0.9 and far < near - 0.3
    assert abs(float(model.pos_emb.weight.std()) - 0.02 / math.sqrt(2)) < 2e-3
