"""lucidrains ``linformer.LinformerLM`` imported as a Longhaul Linformer encoder: logits at n_max
and below, eager and exported, against the package's own model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from exporters.importers import import_checkpoint
from exporters.importers.lucidrains_linformer import config_from_args
from exporters.importers.source import UnsupportedCheckpointError
from exporters.runtime import OnnxRunner
from model_store import ModelVersion
from tests.exporters.importers.conftest import LINFORMER, Imported, random_rows, save_linformer

TOLERANCE = 1e-4
N_MAX = LINFORMER["seq_len"]


def reference_logits(imported: Imported, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = imported.reference(ids)
    assert logits.std() > 0.5  # O(1) logits: a wrong mapping would show
    return logits


@pytest.mark.parametrize("length", [N_MAX, 100, 17, 1])
def test_eager_logits_match_linformer(linformer: Imported, length: int) -> None:
    ids = torch.tensor(random_rows(linformer.reference.to_logits.out_features, [length] * 2, 3))
    with torch.no_grad():
        got, _ = linformer.checkpoint.model(ids, torch.ones_like(ids))
    diff = (got - reference_logits(linformer, ids)).abs().max().item()
    assert diff <= TOLERANCE, f"length {length}: max|diff| {diff:.2e}"


def test_a_padded_row_computes_what_the_reference_computes_on_the_row_alone(
    linformer: Imported,
) -> None:
    """LinformerLM has no mask; Longhaul's masked projection makes padding invisible instead."""
    vocab = linformer.reference.to_logits.out_features
    long, short = random_rows(vocab, [N_MAX, 40], seed=8)
    ids = torch.tensor([long, short + [0] * (N_MAX - 40)])
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with torch.no_grad():
        got, _ = linformer.checkpoint.model(ids, mask)
    alone = reference_logits(linformer, torch.tensor([short]))
    assert (got[1, :40] - alone[0]).abs().max().item() <= TOLERANCE
    assert (got[0] - reference_logits(linformer, torch.tensor([long]))[0]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("length", [N_MAX, 33])
def test_exported_graph_matches_linformer(
    linformer: Imported, exported: Callable[[Imported], ModelVersion], length: int
) -> None:
    version = exported(linformer)
    assert (version.manifest.task, version.manifest.max_context) == ("encode", N_MAX)
    runner = OnnxRunner(version.model_path, ["logits", "hidden"])
    ids = torch.tensor(random_rows(linformer.reference.to_logits.out_features, [length] * 2, 4))
    got = runner.run({"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})
    expected = reference_logits(linformer, ids)
    diff = (torch.from_numpy(got["logits"]) - expected).abs().max().item()
    assert diff <= TOLERANCE, f"length {length}: max|diff| {diff:.2e}"


def test_shared_key_value_projection_as_safetensors(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """share_kv: one projection is both keys and values, one E is both E and F."""
    from safetensors.torch import save_file

    model = save_linformer({**LINFORMER, "share_kv": True}, tokenizer, tmp_path / "src", seed=6)
    (tmp_path / "src" / "model.pt").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "src" / "model.safetensors"))  # fmt: skip
    result = import_checkpoint(
        "lucidrains-linformer", tmp_path / "src", tmp_path / "out",
        tokenizer=tmp_path / "tokenizer.json",
    )  # fmt: skip
    assert result.config.sharing == "key-value"
    imported = Imported("x", model, tmp_path / "src", tmp_path / "out", tokenizer)
    ids = torch.tensor(random_rows(model.to_logits.out_features, [N_MAX, N_MAX], seed=2))
    with torch.no_grad():
        got, _ = imported.checkpoint.model(ids, torch.ones_like(ids))
    assert (got - reference_logits(imported, ids)).abs().max().item() <= TOLERANCE


def test_config_maps_to_a_linformer_without_final_norm(linformer: Imported) -> None:
    c = linformer.checkpoint.config
    assert (c.d_model, c.n_heads, c.n_layers, c.k, c.n_max, c.d_ff) == (32, 4, 2, 16, 128, 128)
    assert (c.sharing, c.activation, c.final_norm) == ("none", "gelu", False)
    assert linformer.checkpoint.trained_context == N_MAX


@pytest.mark.parametrize(
    ("option", "value"),
    [("one_kv_head", True), ("reversible", True), ("dim_head", 4), ("emb_dim", 8)],
)
def test_unsupported_arguments_are_named(option: str, value: object) -> None:
    args = {"num_tokens": 320, **LINFORMER, option: value}
    with pytest.raises(UnsupportedCheckpointError, match=option):
        config_from_args(args)


def test_missing_tokenizer_is_a_clear_error(linformer: Imported, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        import_checkpoint("lucidrains-linformer", linformer.src, tmp_path / "out")
