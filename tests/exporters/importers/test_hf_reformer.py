"""HF Reformer (``ReformerModelWithLMHead``) imported as an hf-compatible Longhaul Reformer:
logits against ``transformers`` at the lengths it accepts, eager and exported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

from exporters.architectures.reformer import ReformerModel
from exporters.importers import import_checkpoint
from exporters.importers.hf_reformer import config_from_hf
from exporters.importers.source import UnsupportedCheckpointError
from exporters.runtime import OnnxRunner
from model_store import ModelVersion
from tests.exporters.importers.conftest import (
    REFORMER,
    Imported,
    random_rows,
    reformer_model,
    save_hf,
)

TOLERANCE = 1e-4
# 5 and 16 fit the shortest chunk / the lcm: HF attends plainly or pads nothing; 20 and 100 are
# padded inside; 512 is the axial table's size, the longest input the reference accepts.
LENGTHS = [5, 16, 20, 100, 512]


def logits_diff(
    imported: Imported, model: ReformerModel, ids: torch.Tensor, mask: torch.Tensor
) -> float:
    with torch.no_grad():
        expected = imported.reference(input_ids=ids, attention_mask=mask).logits
        got, _ = model(ids, mask)
    assert expected.std() > 0.5  # logits of O(1): a wrong mapping would show
    return float((got - expected).abs()[mask.bool()].max())


@pytest.mark.parametrize("length", LENGTHS)
def test_eager_logits_match_transformers(reformer: Imported, length: int) -> None:
    rows = random_rows(reformer.reference.config.vocab_size, [length, length], seed=length)
    ids = torch.tensor(rows)
    diff = logits_diff(reformer, reformer.checkpoint.model, ids, torch.ones_like(ids))
    assert diff <= TOLERANCE, f"length {length}: max|diff| {diff:.2e}"


def test_right_padded_batch_matches_transformers(reformer: Imported) -> None:
    """Right padding, which HF handles like its own internal padding (its positions count
    slots, so left padding would shift them; Longhaul's count real tokens)."""
    ids = torch.tensor(random_rows(reformer.reference.config.vocab_size, [100, 100], seed=1))
    mask = torch.ones_like(ids)
    mask[1, 61:] = 0
    assert logits_diff(reformer, reformer.checkpoint.model, ids, mask) <= TOLERANCE


@pytest.mark.parametrize("length", [16, 100, 512])
def test_exported_graph_matches_transformers(
    reformer: Imported, exported: Callable[[Imported], ModelVersion], length: int
) -> None:
    version = exported(reformer)
    assert version.manifest.signature.generation_mode == "full_sequence"
    # hidden is both streams side by side (2d), as HF's final LayerNorm sees them
    assert version.manifest.signature.outputs[1].shape == ["batch", "sequence", 64]
    runner = OnnxRunner(version.model_path, ["logits", "hidden"])
    ids = torch.tensor(random_rows(reformer.reference.config.vocab_size, [length] * 2, seed=9))
    got = runner.run({"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})
    with torch.no_grad():
        expected = reformer.reference(input_ids=ids).logits
    diff = (torch.from_numpy(got["logits"]) - expected).abs().max().item()
    assert diff <= TOLERANCE, f"length {length}: max|diff| {diff:.2e}"


@pytest.mark.parametrize(
    "overrides",
    [
        # learned positions, three layers with LSH on both sides of a local one, one hash round,
        # tanh GELU, no head bias
        {"axial_pos_embds": False, "attn_layers": ["lsh", "local", "lsh"], "num_hashes": 1,
         "hidden_act": "gelu_new", "lsh_attn_chunk_length": 16, "local_attn_chunk_length": 8},
        # LSH only, three rounds, exact GELU, d/h heads
        {"attn_layers": ["lsh", "lsh"], "num_hashes": 3, "hidden_act": "gelu",
         "attention_head_size": 16},
    ],
)  # fmt: skip
def test_other_layouts_match_transformers(
    tokenizer: Tokenizer, tmp_path: Path, overrides: dict[str, Any]
) -> None:
    reference = reformer_model(tokenizer, seed=4, **overrides)
    save_hf(reference, tokenizer, tmp_path / "src")
    import_checkpoint("hf-reformer", tmp_path / "src", tmp_path / "out")
    imported = Imported("hf-reformer", reference, tmp_path / "src", tmp_path / "out", tokenizer)
    for length in (7, 48, 200):
        ids = torch.tensor(random_rows(reference.config.vocab_size, [length] * 2, seed=length))
        diff = logits_diff(imported, imported.checkpoint.model, ids, torch.ones_like(ids))
        assert diff <= TOLERANCE, f"{overrides} at {length}: max|diff| {diff:.2e}"


def test_import_maps_the_configuration(reformer: Imported) -> None:
    c = reformer.checkpoint.config
    assert c.hf_compatible and c.causal and c.stream_merge == "concat"
    assert c.attn_layers == ("local", "lsh") and c.head_dim == 12 and c.pad_multiple == 16
    assert (c.position_embedding, c.axial_pos_shape, c.max_positions) == ("axial", (16, 32), 512)
    assert (c.eos_token_id, c.pad_token_id, reformer.checkpoint.trained_context) == (2, 0, 512)
    # The hashing rotations are those HF draws from its seed, fixed into the LSH layer.
    torch.manual_seed(REFORMER["hash_seed"])
    hf = torch.randn(2, 12, 2, 2)  # (heads, head width, rounds, buckets / 2)
    assert torch.equal(reformer.checkpoint.model.blocks[1].attn.rotations, hf)


def test_dropped_head_bias_is_reported(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """transformers 5.x never adds lm_head.bias (trained_scale made it non-zero), and the
    logits above match without it; the CLI prints why it was left out."""
    from exporters.cli import main

    save_hf(reformer_model(tokenizer), tokenizer, tmp_path / "src")
    code = main(["import", "hf-reformer", str(tmp_path / "src"), "--out", str(tmp_path / "o")])
    assert code == 0
    result = import_checkpoint("hf-reformer", tmp_path / "src", tmp_path / "o2")
    assert any("lm_head.bias" in note for note in result.notes)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("num_buckets", None),  # automatic: HF sizes it from the first input
        ("num_buckets", [4, 3]),  # an odd factor
        ("num_buckets", 5),
        ("is_decoder", False),
        ("lsh_num_chunks_before", 2),
        ("local_num_chunks_after", 1),
        ("hidden_act", "swish"),
    ],
)
def test_unsupported_options_are_named(tmp_path: Path, option: str, value: object) -> None:
    config = {**REFORMER, "vocab_size": 320, option: value}
    with pytest.raises(UnsupportedCheckpointError, match=option):
        config_from_hf(tmp_path, config)
