"""``python -m model_store {list,verify}``: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model_store import Manifest, ModelRepository, sha256_file
from model_store.cli import human_size, main
from tests.model_store.builders import StageFn, make_manifest, with_old_cache_contract

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def filled(store: ModelRepository, stage: StageFn) -> ModelRepository:
    store.publish(stage({"model.onnx": 2048, "tokenizer.json": 1024}), make_manifest())
    store.publish(stage(), make_manifest())
    document = make_manifest(precision="bf16", name="alibi-bf16").model_dump()
    document["parity"] = {**document["parity"], "min_cosine": 0.99931, "tolerance": None}
    store.publish(stage(), Manifest.model_validate(document))
    return store


def test_list_prints_a_table(filled: ModelRepository, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", str(filled.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "VERSION",
        "ARCH",
        "TASK",
        "FORMAT",
        "PRECISION",
        "MAX_CONTEXT",
        "SIZE",
        "PARITY",
        "MAX_DIFF",
        "COSINE",
    ]
    rows = [line.split() for line in lines[1:]]
    assert [row[:2] for row in rows] == [
        ["alibi-bf16", "1"],
        ["tiny-alibi", "1"],
        ["tiny-alibi", "2"],
    ]
    assert rows[1] == [
        "tiny-alibi", "1", "alibi", "generate", "onnx", "fp32", "512",
        "3.0", "KiB", "passed", "2.00e-06", "-",
    ]  # fmt: skip
    assert rows[0][5] == "bf16" and rows[0][-1] == "0.99931"
    assert rows[2][7:9] == ["71.8", "KiB"]  # 3000 + 70000 + 500 bytes


def test_list_empty_store(store: ModelRepository, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", str(store.root)]) == 0
    assert "no models in" in capsys.readouterr().out


def test_list_warns_about_broken_manifest(
    filled: ModelRepository, capsys: pytest.CaptureFixture[str]
) -> None:
    (filled.root / "tiny-alibi" / "1" / "manifest.json").write_text("oops")
    assert main(["list", str(filled.root)]) == 1
    captured = capsys.readouterr()
    assert "tiny-alibi/1" in captured.err and "invalid JSON" in captured.err
    assert "tiny-alibi  2" in captured.out


def test_verify_all_ok(filled: ModelRepository, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(filled.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["OK        alibi-bf16/1", "OK        tiny-alibi/1", "OK        tiny-alibi/2"]
    assert out[3].endswith("3 OK, 0 MISMATCH")


def test_an_outdated_version_is_reported_but_is_not_a_failure(
    filled: ModelRepository, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its files are as published; only this version of Longhaul cannot serve its graph."""
    path = filled.root / "tiny-alibi" / "1" / "manifest.json"
    path.write_text(json.dumps(with_old_cache_contract(json.loads(path.read_text()))))
    assert main(["verify", str(filled.root)]) == 0
    out = capsys.readouterr().out
    assert "OUTDATED  tiny-alibi/1  manifest.json:" in out and "'present_key_values'" in out
    assert out.rstrip().endswith("2 OK, 0 MISMATCH, 1 OUTDATED (re-export to serve)")
    assert main(["list", str(filled.root)]) == 0
    captured = capsys.readouterr()
    assert "tiny-alibi/1 is outdated" in captured.err and "tiny-alibi  2" in captured.out


def test_verify_reports_tampered_missing_and_extra(
    filled: ModelRepository, capsys: pytest.CaptureFixture[str]
) -> None:
    version = filled.root / "tiny-alibi" / "2"
    expected = filled.load_manifest("tiny-alibi", 2).files
    (version / "model.onnx").write_bytes(b"tampered")
    (version / "tokenizer.json").unlink()
    (version / "notes.txt").write_text("hi")

    assert main(["verify", str(filled.root), "--name", "tiny-alibi"]) == 1
    out = capsys.readouterr().out
    assert "OK        tiny-alibi/1" in out
    assert "alibi-bf16" not in out
    assert (
        f"MISMATCH  tiny-alibi/2  model.onnx: expected sha256={expected['model.onnx'].sha256} "
        f"(3000 bytes), actual sha256={sha256_file(version / 'model.onnx')} (8 bytes)"
    ) in out
    assert (
        f"MISMATCH  tiny-alibi/2  tokenizer.json: expected sha256="
        f"{expected['tokenizer.json'].sha256} (500 bytes), actual missing"
    ) in out
    assert "MISMATCH  tiny-alibi/2  notes.txt: not listed in the manifest (extra file)" in out
    assert out.rstrip().endswith("1 OK, 1 MISMATCH")


def test_verify_unknown_model_and_missing_store_exit_2(
    filled: ModelRepository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(filled.root), "--name", "nope"]) == 2
    assert "model not found: 'nope'" in capsys.readouterr().err
    missing = tmp_path / "no-such-store"
    for command in ("verify", "list"):
        assert main([command, str(missing)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: model store not found") and str(missing) in err


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate", "x"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_module_entry_point(filled: ModelRepository, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "model_store", "verify", str(filled.root)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "3 OK, 0 MISMATCH" in ok.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "model_store", "list", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "model store not found" in missing.stderr


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * 1024**4, "3072.0 GiB"),
    ],
)
def test_human_size(n_bytes: int, text: str) -> None:
    assert human_size(n_bytes) == text
