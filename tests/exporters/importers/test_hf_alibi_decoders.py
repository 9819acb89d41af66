"""HF BLOOM and MPT imported as Longhaul ALiBi decoders: logits of the eager model and of the
exported kv-cache graph against ``transformers``, and greedy generation token for token.

The reference is the ``transformers`` model itself (pinned in pyproject.toml), run on the same
left-padded batches the service builds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from torch import Tensor

from exporters.importers import import_checkpoint
from exporters.runtime import OnnxRunner
from model_store import ModelVersion, past_inputs
from tests.exporters.importers.conftest import (
    Imported,
    left_padded,
    mpt_model,
    random_rows,
    save_hf,
)

TOLERANCE = 1e-4
NEW_TOKENS = 32
Step = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def onnx_step(version: ModelVersion) -> Step:
    """The published kv-cache graph as a (ids, mask, past) -> (logits, present) function: the
    graph returns the new tokens' entries, appended here as the service appends them."""
    runner = OnnxRunner(version.model_path, ["logits", "new_key_values"])
    cache = version.manifest.signature.cache
    assert cache is not None
    names = cache.inputs  # the per-layer past inputs

    def step(ids: Tensor, mask: Tensor, past: Tensor) -> tuple[Tensor, Tensor]:
        inputs = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        out = runner.run({**inputs, **past_inputs(past.numpy(), names)})
        new = torch.from_numpy(out["new_key_values"])
        return torch.from_numpy(out["logits"]), torch.cat([past, new], dim=4)

    return step


def eager_step(imported: Imported) -> Step:
    model = imported.checkpoint.model

    def step(ids: Tensor, mask: Tensor, past: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return model.forward_cached(ids, mask, past)  # type: ignore[operator]

    return step


def longhaul_greedy(imported: Imported, step: Step, rows: list[list[int]]) -> list[list[int]]:
    """Greedy decoding over Longhaul's cache, stopping rows at the config's eos_token_id; a
    finished row continues with pad_token_id, as ``generate`` pads it."""
    config = imported.checkpoint.config
    ids, mask = left_padded(rows, config.pad_token_id)
    past = imported.checkpoint.model.empty_cache(len(rows), torch.float32, torch.device("cpu"))
    logits, past = step(ids, mask, past)
    out: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    for _ in range(NEW_TOKENS):
        tokens = logits[:, -1].argmax(-1).tolist()
        for i, token in enumerate(tokens):
            tokens[i] = config.pad_token_id if finished[i] else token
            out[i].append(tokens[i])
            finished[i] = finished[i] or tokens[i] == config.eos_token_id
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        logits, past = step(torch.tensor(tokens)[:, None], mask, past)
    return out


def transformers_greedy(imported: Imported, rows: list[list[int]]) -> list[list[int]]:
    pad = imported.reference.config.pad_token_id
    ids, mask = left_padded(rows, pad)
    with torch.no_grad():
        generated = imported.reference.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
        )
    new = generated[:, ids.shape[1] :].tolist()
    # generate stops early once every row has ended; the missing tail is padding.
    return [row + [pad] * (NEW_TOKENS - len(row)) for row in new]


@pytest.fixture(params=["bloom", "mpt"])
def decoder(request: pytest.FixtureRequest) -> Imported:
    imported: Imported = request.getfixturevalue(request.param)
    return imported


def test_config_records_the_models_own_special_tokens(decoder: Imported) -> None:
    config = decoder.checkpoint.config
    assert (config.eos_token_id, config.pad_token_id) == (2, 0)
    assert config.vocab_size == decoder.reference.config.vocab_size
    assert decoder.checkpoint.tokenizer.to_str() == decoder.tokenizer.to_str()


@pytest.mark.parametrize("length", [16, 512, 2048])
def test_logits_match_transformers(
    decoder: Imported, exported: Callable[[Imported], ModelVersion], length: int
) -> None:
    """Batch of two, the second row left-padded to the first's length."""
    name = decoder.name
    rows = random_rows(decoder.reference.config.vocab_size, [length, length // 2 + 1], length)
    ids, mask = left_padded(rows, pad=0)
    with torch.no_grad():
        expected = decoder.reference(input_ids=ids, attention_mask=mask).logits
        eager, _ = decoder.checkpoint.model(ids, mask)
    past = decoder.checkpoint.model.empty_cache(2, torch.float32, torch.device("cpu"))
    graph, _ = onnx_step(exported(decoder))(ids, mask, past)
    real = mask.bool()
    assert eager.shape == graph.shape == expected.shape
    # The check is only as strong as the logits are large: O(1) here, O(1) errors if wrong.
    assert expected[real].std() > 0.5
    for label, got in (("eager", eager), ("onnx", graph)):
        diff = (got - expected).abs()[real].max().item()
        assert diff <= TOLERANCE, f"{name} {label} at {length}: max|diff| {diff:.2e}"


def test_greedy_generation_equals_transformers_generate(
    decoder: Imported, exported: Callable[[Imported], ModelVersion]
) -> None:
    rows = random_rows(decoder.reference.config.vocab_size, [12, 5], seed=7)
    expected = transformers_greedy(decoder, rows)
    # Rows that differ and do not just repeat a token: equal by more than luck.
    assert len({tuple(r) for r in expected}) == 2 and max(len(set(r)) for r in expected) > 4
    assert longhaul_greedy(decoder, eager_step(decoder), rows) == expected
    assert longhaul_greedy(decoder, onnx_step(exported(decoder)), rows) == expected


def test_generation_stops_at_the_imported_eos(decoder: Imported, tmp_path: Path) -> None:
    """generation_config.json names an eos that the greedy continuation reaches (a random model
    rarely predicts id 2 itself): transformers stops there, and so does Longhaul, which knows the
    id only from what the import recorded in its config."""
    rows = random_rows(decoder.reference.config.vocab_size, [9, 6], seed=5)
    first = transformers_greedy(decoder, rows)[0]
    eos = next(t for i, t in enumerate(first) if i >= 1 and t not in first[:i] and t > 2)
    src = tmp_path / "src"
    shutil.copytree(decoder.src, src)
    # pad too: without one, generate pads finished rows with the eos id instead.
    (src / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "pad_token_id": 0})
    )
    import_checkpoint(decoder.name, src, tmp_path / "longhaul")
    reference = type(decoder.reference).from_pretrained(src).eval()
    with_eos = Imported(decoder.name, reference, src, tmp_path / "longhaul", decoder.tokenizer)
    assert with_eos.checkpoint.config.eos_token_id == eos

    expected = transformers_greedy(with_eos, rows)
    assert eos in expected[0] and expected[0].index(eos) < NEW_TOKENS - 1  # stops early
    assert longhaul_greedy(with_eos, eager_step(with_eos), rows) == expected


@pytest.mark.parametrize(
    ("attn_config", "note"),
    [
        # transformers builds MPT's bias with 8 whatever alibi_bias_max says: so does the
        # import, and it says that the config's value was not used
        ({"alibi_bias_max": 16}, "alibi_bias_max=16"),
        ({"softmax_scale": 0.2}, None),
    ],
)
def test_mpt_attention_options_follow_the_reference(
    tokenizer: Tokenizer, tmp_path: Path, attn_config: dict[str, float], note: str | None
) -> None:
    reference = mpt_model(tokenizer, **attn_config)
    save_hf(reference, tokenizer, tmp_path / "src")
    result = import_checkpoint("hf-mpt", tmp_path / "src", tmp_path / "out")
    if note is None:
        assert result.notes == ()
    else:
        assert len(result.notes) == 1 and note in result.notes[0]
    imported = Imported("hf-mpt", reference, tmp_path / "src", tmp_path / "out", tokenizer)
    rows = random_rows(reference.config.vocab_size, [300, 120], seed=1)
    ids, mask = left_padded(rows, pad=0)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got, _ = imported.checkpoint.model(ids, mask)
    assert (got - expected).abs()[mask.bool()].max().item() <= TOLERANCE


def test_alibi_slopes_follow_each_model() -> None:
    """BLOOM: the paper's rule; MPT with 6 heads: its own order (odd-indexed slopes first)."""
    from exporters.architectures.alibi import alibi_slopes

    paper = alibi_slopes(6).tolist()
    mpt = alibi_slopes(6, 8.0, "mpt").tolist()
    eight = [2.0 ** (-(i + 1)) for i in range(8)]
    assert mpt == pytest.approx(eight[1::2] + eight[0::2][:2])
    assert paper == pytest.approx([2.0 ** (-8 * (i + 1) / 4) for i in range(4)] + eight[0::2][:2])
    assert np.allclose(alibi_slopes(8, 8.0, "mpt"), alibi_slopes(8))
