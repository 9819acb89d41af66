"""The ALiBi length sweep: the user's text or the held-out corpus, chunked loss, the rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporters import extrapolation
from exporters.architectures.alibi import AlibiConfig, AlibiLM
from exporters.architectures.common import init_weights
from exporters.cli import main
from tests.exporters.importers.conftest import TOKENIZER_TEXT, train_tokenizer

CONFIG = AlibiConfig(vocab_size=320, d_model=16, n_heads=2, n_layers=1, d_ff=32, trained_context=16)


@pytest.fixture(scope="module")
def model() -> AlibiLM:
    torch.manual_seed(0)
    m = AlibiLM(CONFIG).eval()
    init_weights(m, std=0.3)
    return m


def test_chunked_loss_equals_the_loss_of_whole_logits(
    model: AlibiLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = np.random.default_rng(0).integers(4, CONFIG.vocab_size, size=4 * 41, dtype=np.int64)
    windows = torch.from_numpy(stream).view(4, 41)
    with torch.no_grad():
        logits, _ = model(windows[:, :-1], torch.ones_like(windows[:, :-1]))
    want = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    monkeypatch.setattr(extrapolation, "LOGIT_ROWS", 7)  # slices cross window boundaries
    got = extrapolation.loss_at_length(model, stream, 40, batch_size=4)
    assert got == pytest.approx(want, rel=1e-6)


def test_sweep_on_user_text_records_the_text(model: AlibiLM, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("".join(TOKENIZER_TEXT))
    (docs / "sub" / "b.py").write_text("".join(reversed(TOKENIZER_TEXT)))
    (docs / ".hidden").write_text("never read")
    assert extrapolation.text_files(docs) == [docs / "a.txt", docs / "sub" / "b.py"]

    tokenizer = train_tokenizer()
    curve = extrapolation.measure(model, tokenizer, 16, progress=False, eval_text=docs)
    assert curve.text == f"user text {docs}"
    assert curve.lengths == [16, 32, 64, 128]
    assert curve.chosen in curve.lengths and curve.ratios[0] == 1.0
    assert curve.tokens > 0 and all(loss > 0 for loss in curve.losses)
    default = extrapolation.measure(model, tokenizer, 16, progress=False)
    assert default.text == extrapolation.DEFAULT_TEXT and default.losses != curve.losses


def test_user_text_too_short_for_the_longest_window_is_refused(
    model: AlibiLM, tmp_path: Path
) -> None:
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    with pytest.raises(ValueError, match=r"short.txt has \d+ tokens; the sweep to 128"):
        extrapolation.measure(model, train_tokenizer(), 16, progress=False, eval_text=short)
    with pytest.raises(FileNotFoundError, match="no such file"):
        extrapolation.text_files(tmp_path / "missing")


def test_a_long_sweep_says_how_to_skip_it_after_its_first_forward() -> None:
    lengths, per_length = [2048, 4096, 8192, 16384], [61440] * 4
    # 8192 tokens in 100 s: 750 s per length at a flat cost per token, 1x/2x/4x/8x that at worst.
    low, high = extrapolation.sweep_seconds(100.0, 8192, lengths, per_length)
    assert (low, high) == (3000.0, 11250.0)

    class Bar:
        def __init__(self) -> None:
            self.written: list[str] = []

        def write(self, text: str) -> None:
            self.written.append(text)

    bar = Bar()
    extrapolation._warn_if_long(100.0, 8192, lengths, per_length, bar)  # type: ignore[arg-type]
    (message,) = bar.written
    assert "about 50 min-3.1 h" in message
    assert "--max-context 2048 --skip-extrapolation" in message  # the exact flags, N filled in
    bar.written.clear()
    extrapolation._warn_if_long(1.0, 8192, lengths, per_length, bar)  # type: ignore[arg-type]
    assert bar.written == []  # under 10 minutes: nothing to say


def test_the_estimate_is_given_after_the_first_forward_pass(model: AlibiLM) -> None:
    stream = np.arange(4, 4 + 3 * 33, dtype=np.int64) % CONFIG.vocab_size
    calls: list[tuple[float, int]] = []
    extrapolation.loss_at_length(
        model, stream, 32, 1, first_forward=lambda s, t: calls.append((s, t))
    )
    assert len(calls) == 1 and calls[0][1] == 32 and calls[0][0] > 0


def test_skip_extrapolation_needs_max_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from exporters.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", AlibiLM(CONFIG), train_tokenizer(), CONFIG.trained_context)
    args = ["export", str(tmp_path / "ckpt"), "--format", "onnx", "--store", str(tmp_path / "s")]
    assert main([*args, "--name", "m", "--skip-extrapolation"]) == 2
    assert "--skip-extrapolation needs --max-context" in capsys.readouterr().err
