"""Every expected failure of ``python -m exporters``: one line that says what failed and what to
do, a non-zero exit, and no traceback unless ``--debug`` asks for one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from exporters import parity
from exporters.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(err: str) -> str:
    """The one error line, last on stderr (progress bars may come before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    assert "; " in errors[0] or "--help" in errors[0]  # what failed; what to do
    return errors[0]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporters", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_typo_is_one_line_naming_the_choices() -> None:
    result = _cli("train", "--arch", "alibbi", "--preset", "tiny", "--out", "x")
    assert result.returncode == 2
    line = _one_line_error(result.stderr)
    assert "invalid choice: 'alibbi'" in line and "--help" in line


def test_a_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    result = _cli(
        "export", str(missing), "--format", "onnx", "--store", str(tmp_path / "s"), "--name", "m"
    )
    assert result.returncode == 2
    line = _one_line_error(result.stderr)
    assert str(missing) in line and "config.json is missing" in line


def test_unreadable_weights_are_one_line_and_debug_shows_the_traceback(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("shatter"), ckpt)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    args = ["export", str(ckpt), "--format", "onnx", "--store", str(tmp_path / "s"), "--name", "m"]
    assert main(args) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "cannot read the weights" in line
    with pytest.raises(Exception, match="cannot read the weights"):
        main([*args, "--debug"])


def test_an_unsupported_config_option_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "bloom"
    src.mkdir()
    config = {"model_type": "bloom", "apply_residual_connection_post_layernorm": True}
    (src / "config.json").write_text(json.dumps(config))
    Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(src / "tokenizer.json"))
    result = _cli("import", "hf-bloom", str(src), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    line = _one_line_error(result.stderr)
    assert "apply_residual_connection_post_layernorm" in line
    assert not (tmp_path / "out").exists()


def test_failed_parity_prints_the_table_then_one_line(
    tiny_checkpoint: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parity, "FP32_RULE", parity.Fp32Rule(rtol=1e-12, atol=1e-15))
    store = tmp_path / "store"
    code = main(
        [
            "export",
            str(tiny_checkpoint("shatter")),
            "--format",
            "onnx",
            "--precision",
            "fp32",
            "--store",
            str(store),
            "--name",
            "m",
        ]
    )
    assert code == 1
    out, err = capsys.readouterr()
    assert "parity FAIL" in out  # the per-case table, on stdout
    line = _one_line_error(err)
    assert "nothing was published" in line and "the table above" in line
    assert not store.exists() or not any(store.iterdir())


def test_a_version_that_exists_is_one_line(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "export",
        str(tiny_checkpoint("shatter")),
        "--format",
        "torchscript",
        "--store",
        str(tmp_path),
        "--name",
        "m",
        "--version",
        "1",
    ]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in _one_line_error(capsys.readouterr().err)


def test_export_needs_no_format_or_precision_flags(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The user's path: import, then export with only where to publish and under what name."""
    store = tmp_path / "store"
    assert (
        main(["export", str(tiny_checkpoint("shatter")), "--store", str(store), "--name", "m"]) == 0
    )
    manifest = json.loads((store / "m" / "1" / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["parity"]["passed"]
