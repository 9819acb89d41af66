import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from exporters.checkpoint import CheckpointError, load_checkpoint
from exporters.cli import main
from exporters.training import PRESETS

ARCHS = sorted(PRESETS)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_training_writes_a_loadable_checkpoint(arch, tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint(arch)
    assert {p.name for p in ckpt.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_report.json",
    }
    report = json.loads((ckpt / "train_report.json").read_text())
    assert report["steps"] == 5 and report["architecture"] == arch
    # Even five steps must beat a uniform guess; the unigram baseline is a real number.
    assert report["held_out_loss"] < math.log(report["vocab_size"])
    assert 0 < report["unigram_baseline_loss"] < math.log(report["vocab_size"])

    assert load_checkpoint(ckpt).architecture == arch


def test_the_checkpoint_holds_the_trained_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What load_checkpoint gives back computes exactly what the trained model in memory did."""
    from exporters import training

    trained: list[torch.nn.Module] = []
    save = training.save_checkpoint

    def keep(out_dir: Path, model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        trained.append(model)
        save(out_dir, model, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", keep)
    training.train("alibi", "tiny", tmp_path / "ckpt", steps=2, progress=False)
    (in_memory,) = trained
    loaded = load_checkpoint(tmp_path / "ckpt").model
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected, _ = in_memory.eval()(ids, mask)
        actual, _ = loaded(ids, mask)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_training_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    """Same preset, steps and seed: byte-identical weights and tokenizer, whatever the caller's
    thread count (training fixes its own)."""
    from exporters.training import TRAIN_THREADS, train

    r1 = train("alibi", "tiny", tmp_path / "a", steps=3, seed=7, progress=False)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r2 = train("alibi", "tiny", tmp_path / "b", steps=3, seed=7, progress=False)
        assert torch.get_num_threads() == 1  # restored after training
    finally:
        torch.set_num_threads(saved)
    assert r1["held_out_loss"] == r2["held_out_loss"]
    assert r1["torch_threads"] == r2["torch_threads"] == TRAIN_THREADS
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    r3 = train("alibi", "tiny", tmp_path / "c", steps=3, seed=8, progress=False)
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (
        tmp_path / "a" / "model.safetensors"
    ).read_bytes()
    assert r3["steps"] == 3


def test_the_learning_rate_depends_on_the_step_alone() -> None:
    from exporters.training import lr_schedule

    lr_at = lr_schedule(1e-3, 100)
    assert lr_at(0) == pytest.approx(1e-4)  # warm-up over the first 10 steps
    assert lr_at(9) == pytest.approx(1e-3)
    assert lr_at(99) == pytest.approx(1e-4)  # cosine down to 10% at the last step
    assert lr_at(50) == lr_schedule(1e-3, 100)(50)  # a new schedule: no state carried between calls


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_mismatched_weights_are_refused_naming_the_tensors(tiny_checkpoint, tmp_path) -> None:
    ckpt = _copy(tiny_checkpoint("alibi"), tmp_path / "ckpt")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"]["d_ff"] *= 2
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(ckpt)


def test_unknown_config_field_and_missing_file_are_clear_errors(tiny_checkpoint, tmp_path) -> None:
    ckpt = _copy(tiny_checkpoint("shatter"), tmp_path / "ckpt")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"]["n_hedas"] = 3
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="n_hedas"):
        load_checkpoint(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(ckpt)


def test_cli_rejects_a_typo_with_usage(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--arch", "alibbi", "--preset", "tiny", "--out", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 'alibbi'" in capsys.readouterr().err


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, "bf16 autocast"), (False, "fp32")])
def test_bf16_autocast_trains_and_is_reported(
    monkeypatch, tmp_path: Path, native_bf16: bool, expected: str
) -> None:
    """A bf16 preset autocasts only where the CPU multiplies bf16 natively (emulated bf16 is
    slower than fp32): both answers of the platform check, whatever this machine has."""
    import dataclasses

    from exporters import training

    tiny = training.PRESETS["linformer"]["tiny"]
    monkeypatch.setitem(
        training.PRESETS["linformer"], "tiny", dataclasses.replace(tiny, bf16_autocast=True)
    )
    monkeypatch.setattr(training, "bf16_supported", lambda: native_bf16)
    report = training.train("linformer", "tiny", tmp_path / "ckpt", steps=3, progress=False)
    assert report["compute"] == expected
    assert math.isfinite(report["held_out_loss"])
    # Weights stay fp32 whatever the step computed in: the checkpoint loads as an fp32 model.
    model = load_checkpoint(tmp_path / "ckpt").model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_fp32_presets_report_fp32(tmp_path: Path) -> None:
    from exporters.training import train

    report = train("shatter", "tiny", tmp_path / "ckpt", steps=1, progress=False)
    assert report["compute"] == "fp32"


def test_mlm_loss_on_masked_rows_only_equals_the_full_loss() -> None:
    """Linformer's MLM loss scores only the masked positions: the same value as scoring all."""
    from exporters.architectures import build_model, config_from_dict
    from exporters.training import _loss

    config = config_from_dict(
        "linformer",
        {"vocab_size": 100, "d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32, "k": 8},
    )
    torch.manual_seed(0)
    model = build_model(config).eval()
    ids = torch.randint(4, 100, (3, 20))
    labels = ids.masked_fill(torch.rand(3, 20) < 0.7, -100)
    with torch.no_grad():
        logits, _ = model(ids, torch.ones_like(ids))
        full = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 100), labels.reshape(-1), ignore_index=-100
        )
        assert float(_loss(model, ids, labels, "encode")) == pytest.approx(float(full), rel=1e-6)
