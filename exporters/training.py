"""Demo and test training: MLM for encoders, next-token LM for decoders.

Presets are deliberately small: ``tiny`` trains in seconds for tests, ``demo`` in under 2.5
minutes per architecture on an idle 2-core machine and must beat the unigram baseline's held-out
loss by 20% (the bar the README's numbers are checked against). Every preset is a fixed number
of steps: nothing depends on the clock, so every machine trains the same model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

from exporters.architectures import build_model, config_from_dict, get_architecture
from exporters.architectures.common import CLS_ID, EOS_ID, MASK_ID, SPECIAL_TOKENS
from exporters.checkpoint import REPORT_FILE, save_checkpoint
from exporters.corpus import read_texts, split_corpus
from exporters.tokenizer import for_task, train_tokenizer

# Twice BERT's 15%: more supervised positions per step; small demo encoders learn faster with it.
MLM_PROBABILITY = 0.3
# Held-out evaluation: at least this many windows, and at least EVAL_TOKENS tokens, so that a
# preset with short windows is judged on as many masked tokens as the others.
EVAL_WINDOWS = 32
EVAL_TOKENS = 4096
# Training always uses this many intra-op threads (see ``train``): the machines this project
# targets have 2 cores, and a fixed count keeps a checkpoint the same wherever it is trained.
TRAIN_THREADS = 2


@dataclass(frozen=True)
class Preset:
    """How to train one architecture at one size. ``model`` holds config fields (no vocab)."""

    model: dict[str, Any]
    vocab_size: int
    seq_len: int  # the trained context
    batch_size: int
    steps: int
    lr: float
    tokenizer_bytes: int  # corpus text used to learn the BPE merges
    train_bytes: int  # corpus text tokenised for training
    # Forward and backward under torch.autocast(bf16) where the CPU multiplies bf16 natively
    # (weights, optimizer state and the held-out evaluation stay fp32). Measured on this
    # avx512_bf16 machine: a Linformer demo step 1.75x faster, the same loss after 1000 steps.
    bf16_autocast: bool = False


class _Schedule(TypedDict):
    """A preset's fields other than ``model``, shared by the presets of several architectures."""

    vocab_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    tokenizer_bytes: int
    train_bytes: int
    bf16_autocast: NotRequired[bool]


_TINY: _Schedule = {
    "vocab_size": 512,
    "seq_len": 64,
    "batch_size": 8,
    "steps": 30,
    "lr": 3e-3,
    "tokenizer_bytes": 300_000,
    "train_bytes": 400_000,
}
_DEMO: _Schedule = {
    "vocab_size": 2048,
    "seq_len": 256,
    "batch_size": 16,
    "steps": 400,
    "lr": 2e-3,
    "tokenizer_bytes": 3_000_000,
    "train_bytes": 6_000_000,
}
# Encoders learn masked tokens from local context: half the window, twice the steps per second.
_DEMO_ENCODER: _Schedule = {**_DEMO, "seq_len": 128, "steps": 900, "lr": 3e-3}
# Linformer learns positions from a table (Shatter needs none), and on 128-token windows its
# masked-token loss stayed near unigram for the whole budget (0.897 x unigram after 1000
# steps). On 32-token windows, 64 per batch (the same tokens per step), positions are learned
# early: measured 0.825 after 1200 steps and 0.644 after 2500 (same seed, bf16 autocast), so
# the demo trains there, under bf16 autocast (~1.75x the steps per second).
_DEMO_LINFORMER: _Schedule = {
    **_DEMO_ENCODER,
    "seq_len": 32,
    "batch_size": 64,
    "steps": 2000,
    "bf16_autocast": True,
}

PRESETS: dict[str, dict[str, Preset]] = {
    "linformer": {
        "tiny": Preset(
            model={
                "d_model": 32,
                "n_heads": 2,
                "n_layers": 2,
                "d_ff": 64,
                "k": 16,
                "n_max": 4096,
                "sharing": "key-value",
            },
            **_TINY,
        ),
        "demo": Preset(
            model={
                "d_model": 128,
                "n_heads": 4,
                "n_layers": 2,
                "d_ff": 512,
                "k": 128,
                # 8192 failed fp32 export parity (1.2e-4 > 1e-4 at 8192 tokens): E·K sums over
                # every position, and rounding grows with n.
                "n_max": 4096,
                "sharing": "key-value",
            },
            **_DEMO_LINFORMER,
        ),
    },
    "reformer": {
        "tiny": Preset(
            model={
                "d_model": 32,
                "n_heads": 2,
                "n_layers": 2,
                "d_ff": 64,
                "chunk_length": 16,
                "n_buckets": 4,
                "n_hashes": 2,
                "causal": True,
            },
            **_TINY,
        ),
        "demo": Preset(
            model={
                "d_model": 128,
                "n_heads": 4,
                "n_layers": 2,
                "d_ff": 512,
                # One hash round and 32-token chunks: a third of the step time of 2 x 64, so the
                # demo's 400 steps fit its 2.5-minute budget.
                "chunk_length": 32,
                "n_buckets": 8,
                "n_hashes": 1,
                "causal": True,
            },
            **_DEMO,
        ),
    },
    "alibi": {
        "tiny": Preset(model={"d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64}, **_TINY),
        "demo": Preset(
            model={"d_model": 128, "n_heads": 4, "n_layers": 3, "d_ff": 512},
            # The slowest step of the four (three layers of full attention over 256 tokens).
            **(_DEMO | {"steps": 360}),
        ),
    },
    "shatter": {
        "tiny": Preset(model={"d_model": 32, "n_layers": 2, "d_ff": 64, "n_parts": 4}, **_TINY),
        "demo": Preset(
            model={"d_model": 128, "n_layers": 2, "d_ff": 512, "n_parts": 8}, **_DEMO_ENCODER
        ),
    },
}


def get_preset(arch: str, preset: str) -> Preset:
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(PRESETS))}")
    if preset not in PRESETS[arch]:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS[arch]))}")
    return PRESETS[arch][preset]


def _token_stream(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Concatenate documents separated by <eos> into one int32 array."""
    pieces: list[np.ndarray] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
        pieces.append(np.asarray([EOS_ID], dtype=np.int32))
    return np.concatenate(pieces)


def _windows(stream: np.ndarray, starts: Tensor, length: int) -> Tensor:
    offsets = starts[:, None] + torch.arange(length)[None, :]  # (b, length)
    return torch.from_numpy(stream).long()[offsets]


def _mlm_batch(windows: Tensor, vocab_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT-style masking: MLM_PROBABILITY of positions are targets (80% <mask>, 10% random,
    10% kept).

    Position 0 holds <cls> and is never a target. Returns (inputs, labels) with -100 = ignore.
    """
    b, t = windows.shape
    inputs = torch.cat([torch.full((b, 1), CLS_ID), windows], dim=1)  # (b, t+1)
    labels = inputs.clone()
    chosen = torch.rand(b, t + 1, generator=gen) < MLM_PROBABILITY
    chosen[:, 0] = False
    labels[~chosen] = -100
    roll = torch.rand(b, t + 1, generator=gen)
    inputs[chosen & (roll < 0.8)] = MASK_ID
    random_ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (b, t + 1), generator=gen)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_ids[swap]
    return inputs, labels


def _batch(
    task: str, windows: Tensor, vocab_size: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    if task == "encode":
        return _mlm_batch(windows, vocab_size, gen)
    return windows[:, :-1], windows[:, 1:]


def _loss(model: nn.Module, inputs: Tensor, labels: Tensor, task: str) -> Tensor:
    mask = torch.ones_like(inputs)
    if task == "encode" and hasattr(model, "hidden_states"):
        # Only the masked positions are scored: the vocabulary projection of the other 70% of
        # positions would be computed (and back-propagated) for nothing. Same loss value.
        # (nn.Module.__getattr__ types the method and the head submodule as Tensor | Module.)
        hidden = model.hidden_states(inputs, mask)  # type: ignore[operator]  # (b, t, d)
        chosen = labels != -100
        return F.cross_entropy(model.lm_head(hidden[chosen]), labels[chosen])  # type: ignore[operator]
    logits, _ = model(inputs, mask)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def bf16_supported() -> bool:
    """True where oneDNN has native bf16 kernels (avx512_bf16 or AMX); elsewhere bf16 autocast
    is emulated and slower than fp32, so training stays fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _unigram_loss(train: np.ndarray, labels: Tensor, vocab_size: int) -> float:
    """Held-out cross-entropy of an add-one-smoothed unigram model fitted on the train stream."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = labels[labels != -100].numpy()
    return float(-logp[targets].mean())


@dataclass(frozen=True)
class TrainingData:
    """Everything one run trains and evaluates on, derived from the preset alone."""

    config: Any
    tokenizer: Tokenizer  # the task's tokenizer (with its post-processor), saved with the model
    train_stream: np.ndarray  # int32 token ids, documents separated by <eos>
    held_stream: np.ndarray
    window: int  # tokens cut from the stream per row
    tokenizer_seconds: float

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)


def prepare_data(arch: str, preset: Preset) -> TrainingData:
    """Learn the BPE merges, build the config, tokenise the train and held-out text."""
    started = time.perf_counter()
    split = split_corpus()
    base_tokenizer = train_tokenizer(
        read_texts(split.root, split.train, preset.tokenizer_bytes), preset.vocab_size
    )
    tokenizer_seconds = time.perf_counter() - started
    values = {**preset.model, "vocab_size": base_tokenizer.get_vocab_size()}
    if "trained_context" in {
        f.name for f in dataclasses.fields(get_architecture(arch).config_class)
    }:
        values["trained_context"] = preset.seq_len
    config = config_from_dict(arch, values)
    train_stream = _token_stream(
        base_tokenizer, list(read_texts(split.root, split.train, preset.train_bytes))
    )
    held_stream = _token_stream(
        base_tokenizer, list(read_texts(split.root, split.held_out, preset.train_bytes // 10))
    )
    # Decoders see seq_len inputs predicting the next seq_len tokens; encoders seq_len + <cls>.
    window = preset.seq_len + 1 if config.task == "generate" else preset.seq_len
    if len(held_stream) <= window or len(train_stream) <= window:
        raise RuntimeError("corpus too small for the preset's sequence length")
    return TrainingData(
        config=config,
        tokenizer=for_task(base_tokenizer, config.task),
        train_stream=train_stream,
        held_stream=held_stream,
        window=window,
        tokenizer_seconds=tokenizer_seconds,
    )


def lr_schedule(peak: float, steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 10% of the steps, then cosine decay to 10% of ``peak`` at
    the last step. A function of the step alone, so a run is the same on any machine."""
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr_at


def _optimise(
    model: nn.Module,
    data: TrainingData,
    preset: Preset,
    steps: int,
    gen: torch.Generator,
    autocast: bool,
    bar_label: str,
    progress: bool,
) -> None:
    """The training loop: ``steps`` AdamW steps on random windows of the train stream."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01)
    lr_at = lr_schedule(preset.lr, steps)
    task = data.config.task
    model.train()
    bar = tqdm(range(steps), desc=bar_label, disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(
            0, len(data.train_stream) - data.window, (preset.batch_size,), generator=gen
        )
        windows = _windows(data.train_stream, starts, data.window)
        inputs, labels = _batch(task, windows, data.vocab_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(model, inputs, labels, task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def evaluate(model: nn.Module, data: TrainingData) -> tuple[float, float]:
    """(held-out loss, unigram baseline loss) on fixed, evenly spaced held-out windows."""
    eval_gen = torch.Generator().manual_seed(1234)
    n_eval = max(EVAL_WINDOWS, EVAL_TOKENS // data.window)
    starts = torch.linspace(0, len(data.held_stream) - data.window - 1, n_eval).long()
    windows = _windows(data.held_stream, starts, data.window)
    inputs, labels = _batch(data.config.task, windows, data.vocab_size, eval_gen)
    with torch.no_grad():
        held_out_loss = float(_loss(model, inputs, labels, data.config.task))
    return held_out_loss, _unigram_loss(data.train_stream, labels, data.vocab_size)


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads, then restore the previous count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def train(
    arch: str,
    preset_name: str,
    out_dir: Path,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one architecture and write a checkpoint to ``out_dir``; returns the report.

    Reproducible: the same commit, preset, steps and seed give the same weights on any machine
    with the same CPU instruction set (fixed step count, seeded data order and masking, and
    ``TRAIN_THREADS`` threads whatever the machine has, since a GEMM's summation order can
    depend on how many threads share it). A slower machine takes longer, for the same result.
    """
    preset = get_preset(arch, preset_name)
    steps = preset.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    started = time.perf_counter()
    with fixed_threads(TRAIN_THREADS):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        data = prepare_data(arch, preset)
        model = build_model(data.config)
        autocast = preset.bf16_autocast and bf16_supported()
        loop_started = time.perf_counter()
        _optimise(
            model, data, preset, steps, gen, autocast, f"train {arch}/{preset_name}", progress
        )
        train_seconds = time.perf_counter() - loop_started
        held_out_loss, unigram = evaluate(model, data)

    report = {
        "architecture": arch,
        "preset": preset_name,
        "task": data.config.task,
        "objective": "mlm" if data.config.task == "encode" else "next-token",
        "steps": steps,
        "seed": seed,
        "batch_size": preset.batch_size,
        "seq_len": preset.seq_len,
        "vocab_size": data.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_available": len(data.train_stream),
        "seconds": round(time.perf_counter() - started, 2),
        "tokenizer_seconds": round(data.tokenizer_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "held_out_loss": round(held_out_loss, 4),
        "unigram_baseline_loss": round(unigram, 4),
        "ratio_to_unigram": round(held_out_loss / unigram, 4),
        "torch_threads": TRAIN_THREADS,
        "compute": "bf16 autocast" if autocast else "fp32",
    }
    save_checkpoint(out_dir, model, data.tokenizer, trained_context=preset.seq_len)
    (Path(out_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
