"""Checkpoints hold their weights once: a model is given the loaded tensors, not a copy of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exporters.architectures.alibi import AlibiConfig, AlibiLM
from exporters.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    model_with_weights,
    save_checkpoint,
)
from tests.exporters.importers.conftest import train_tokenizer

CONFIG = AlibiConfig(vocab_size=320, d_model=16, n_heads=2, n_layers=1, d_ff=32, trained_context=16)


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in AlibiLM(CONFIG).state_dict().items()}


def test_the_model_holds_the_given_tensors_themselves() -> None:
    state = _state()
    model = model_with_weights(CONFIG, state, "test")
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert tensor.data_ptr() == state[name].data_ptr(), name  # no copy


def test_other_dtypes_and_layouts_become_what_the_model_holds() -> None:
    state = _state()
    state["embed.weight"] = state["embed.weight"].half()
    state["head.proj.weight"] = state["head.proj.weight"].t().contiguous().t()  # a transpose
    model = model_with_weights(CONFIG, state, "test")
    assert model.embed.weight.dtype == torch.float32
    assert model.head.proj.weight.is_contiguous()
    assert torch.equal(model.head.proj.weight, state["head.proj.weight"])


def test_a_mismatched_state_dict_names_the_problem() -> None:
    state = _state()
    del state["ln_f.bias"]
    state["embed.weight"] = state["embed.weight"][:100]
    with pytest.raises(CheckpointError, match=r"missing \['ln_f.bias'\].*embed.weight"):
        model_with_weights(CONFIG, state, "test")


def test_tied_tensors_are_saved_under_both_names_and_load_back(tmp_path: Path) -> None:
    state = _state()
    state["head.proj.weight"] = state["embed.weight"]  # one tensor, as BLOOM's import maps it
    model = model_with_weights(CONFIG, state, "test")
    save_checkpoint(tmp_path, model, train_tokenizer(), CONFIG.trained_context)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert torch.equal(saved["head.proj.weight"], saved["embed.weight"])
    loaded = load_checkpoint(tmp_path)
    assert torch.equal(loaded.model.head.proj.weight, state["embed.weight"])
    # Loaded into memory of its own: rewriting the file changes nothing already loaded.
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    assert torch.equal(loaded.model.embed.weight, state["embed.weight"])


def test_a_tensor_outside_the_state_dict_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    original = AlibiLM.__init__

    def with_table(self: AlibiLM, config: AlibiConfig) -> None:
        original(self, config)
        self.table = torch.zeros(3)  # made on the meta device, never loaded

    monkeypatch.setattr(AlibiLM, "__init__", with_table)
    with pytest.raises(RuntimeError, match=r"outside its state dict: \['table'\]"):
        model_with_weights(CONFIG, _state(), "test")
