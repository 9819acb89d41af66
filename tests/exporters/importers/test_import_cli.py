"""The ``import`` command and the checks every importer shares: what it refuses, and how."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporters.cli import IMPORT_FORMATS, main
from exporters.importers import IMPORTERS, hf_bloom, hf_mpt, import_checkpoint
from exporters.importers.source import UnsupportedCheckpointError, load_weights, special_tokens
from tests.exporters.importers.conftest import Imported


def copy_src(imported: Imported, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(imported.src, src)
    return src


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_cli_formats_are_the_importers() -> None:
    assert sorted(IMPORT_FORMATS) == sorted(IMPORTERS)


def test_cli_import_writes_a_checkpoint_and_a_summary(
    mpt: Imported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    assert main(["import", "hf-mpt", str(mpt.src), "--out", str(out)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("imported hf-mpt") and "eos 2" in summary
    written, reference = (
        load_file(str(out / "model.safetensors")),
        mpt.checkpoint.model.state_dict(),
    )
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[k], reference[k]) for k in written)
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == "alibi" and meta["imported_from"]["format"] == "hf-mpt"
    assert meta["trained_context"] == 2048  # MPT's max_seq_len, no override given
    # Readable as any directory the user makes is (the umask's mode), not private to the user.
    made = tmp_path / "made-by-mkdir"
    made.mkdir()
    assert out.stat().st_mode & 0o777 == made.stat().st_mode & 0o777


def test_cli_names_the_unsupported_option(
    mpt: Imported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = copy_src(mpt, tmp_path)
    config = json.loads((src / "config.json").read_text())
    edit_json(src / "config.json", attn_config={**config["attn_config"], "qk_ln": True})
    assert main(["import", "hf-mpt", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "attn_config.qk_ln" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_to_overwrite(mpt: Imported, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", "hf-mpt", str(mpt.src), "--out", str(mpt.out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_a_failed_import_leaves_nothing_behind(mpt: Imported, tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UnsupportedCheckpointError, match="tokenizers JSON"):
        import_checkpoint("hf-mpt", mpt.src, tmp_path / "out", tokenizer=tmp_path / "broken.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("attn_config.prefix_lm", True),
        ("attn_config.alibi", False),
        ("attn_config.attn_type", "multiquery_attention"),
        ("logit_scale", 2.0),
        ("no_bias", False),
        ("norm_type", "rmsnorm"),
    ],
)
def test_mpt_options_it_cannot_reproduce(tmp_path: Path, option: str, value: object) -> None:
    config: dict[str, Any] = {"d_model": 48, "n_heads": 6, "n_layers": 2, "vocab_size": 320}
    if option.startswith("attn_config."):
        config["attn_config"] = {option.split(".")[1]: value}
    else:
        config[option] = value
    with pytest.raises(UnsupportedCheckpointError, match=option):
        hf_mpt.config_from_hf(tmp_path, config, None)


def test_bloom_post_layernorm_residual_is_refused(tmp_path: Path) -> None:
    config = {"hidden_size": 64, "n_head": 4, "n_layer": 2, "vocab_size": 320}
    with pytest.raises(UnsupportedCheckpointError, match="apply_residual_connection"):
        hf_bloom.config_from_hf(
            tmp_path, {**config, "apply_residual_connection_post_layernorm": True}, None
        )


def test_a_tensor_the_mapping_does_not_use_is_refused(bloom: Imported, tmp_path: Path) -> None:
    """A part the mapping does not know (here: a stray bias) would silently change the model."""
    src = copy_src(bloom, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    save_file(
        {**state, "transformer.h.0.extra.bias": torch.zeros(4)}, str(src / "model.safetensors")
    )
    with pytest.raises(
        UnsupportedCheckpointError, match=r"transformer\.h\.0\.extra\.bias|h\.0\.extra"
    ):
        import_checkpoint("hf-bloom", src, tmp_path / "out")


def test_torch_state_dicts_load_weights_only(bloom: Imported, tmp_path: Path) -> None:
    """HF's legacy pytorch_model.bin works; anything but tensors is refused, never unpickled."""
    src = copy_src(bloom, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    import_checkpoint("hf-bloom", src, tmp_path / "out", trained_context=128)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        bloom.out / "model.safetensors"
    ).read_bytes()
    torch.save({"weights": state, "trainer": Path("not a tensor")}, src / "pytorch_model.bin")
    with pytest.raises(UnsupportedCheckpointError, match="weights_only"):
        load_weights(src)


def test_generation_config_wins_and_several_eos_are_refused(tmp_path: Path) -> None:
    config = {"eos_token_id": 2, "pad_token_id": None}
    assert special_tokens(tmp_path, config, 320).eos_token_id == 2
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    tokens = special_tokens(tmp_path, config, 320)
    assert (tokens.eos_token_id, tokens.pad_token_id) == (7, 0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    with pytest.raises(UnsupportedCheckpointError, match="eos_token_id"):
        special_tokens(tmp_path, config, 320)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(mpt: Imported, tmp_path: Path) -> None:
    from tests.exporters.importers.conftest import train_tokenizer

    big = train_tokenizer(vocab_size=400)
    assert big.get_vocab_size() > mpt.reference.config.vocab_size
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(UnsupportedCheckpointError, match="index past the embedding"):
        import_checkpoint("hf-mpt", mpt.src, tmp_path / "out", tokenizer=tmp_path / "big.json")
