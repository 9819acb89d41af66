"""Parity cases of kv-cache graphs: new cache entries compared, in the service's cache layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from exporters import parity
from exporters.architectures.alibi import AlibiConfig, AlibiLM
from exporters.architectures.common import init_weights
from exporters.graphs import graph_spec, wrap
from exporters.parity import ParityError, _prepare_decode, build_cases, run_parity
from exporters.runtime import Runner

CONFIG = AlibiConfig(vocab_size=40, d_model=16, n_heads=2, n_layers=2, d_ff=32, trained_context=8)


class EagerRunner(Runner):
    """The eager graph module behind the Runner interface. ``whole_cache``: answer as graphs
    exported under the old contract did, with the past and the new entries together."""

    provider = "eager"

    def __init__(self, module: nn.Module, whole_cache: bool = False) -> None:
        self.module = module
        self.whole_cache = whole_cache

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logits, new = self.module(*(torch.from_numpy(v) for v in inputs.values()))
        if self.whole_cache:
            names = graph_spec("generate", CONFIG).input_names[2:]
            layers = [inputs[name] for name in names]  # (b, h, P, e) each, layer-major
            past = np.stack(layers).reshape(CONFIG.n_layers, 2, *layers[0].shape)
            new = torch.cat([torch.from_numpy(past), new], dim=4)
        return {"logits": logits.numpy(), "new_key_values": new.numpy()}


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    torch.manual_seed(0)
    model = AlibiLM(CONFIG).eval()
    init_weights(model, std=0.3)
    return wrap(model, graph_spec("generate", CONFIG), torch.float32)


def test_decode_cases_hold_padding_between_the_past_and_the_new_token(
    reference: nn.Module,
) -> None:
    """As the service's decode buffer holds it: real entries first, free slots, new token."""
    spec = graph_spec("generate", CONFIG)
    case = next(c for c in build_cases(spec, CONFIG, [4, 10]) if c.name.endswith("padded-decode"))
    prompt_mask = case.inputs["attention_mask"]
    assert prompt_mask.tolist()[1] == [0] * 5 + [1] * 5  # the prompt itself is left-padded
    with torch.no_grad():
        _, prefill = reference(*(torch.from_numpy(v) for v in case.inputs.values()))
    cache = prefill.numpy()
    decode = _prepare_decode(cache, spec, case, CONFIG.vocab_size, np.random.default_rng(0))
    assert decode.inputs["attention_mask"].tolist() == [[1] * 11, [1] * 5 + [0] * 5 + [1]]
    assert list(decode.inputs)[2:] == spec.input_names[2:]  # per layer, in graph order
    layers = [decode.inputs[name] for name in spec.input_names[2:]]
    past = np.stack(layers).reshape(CONFIG.n_layers, 2, *layers[0].shape)
    np.testing.assert_array_equal(past[:, :, 1, :, :5], prefill[:, :, 1, :, 5:].numpy())
    np.testing.assert_array_equal(past[:, :, 0], prefill[:, :, 0].numpy())
    assert decode.cache_mask is not None and decode.cache_mask.shape == (2, 1)  # one new entry


def test_new_entries_are_compared_and_the_old_whole_cache_output_fails(
    reference: nn.Module,
) -> None:
    spec = graph_spec("generate", CONFIG)
    report = run_parity(reference, EagerRunner(reference), spec, CONFIG, [4, 10], "fp32", False)
    assert report.passed and report.max_abs_diff == 0
    names = [c.name for c in report.cases]
    assert "b2xL10-padded-prefill" in names and "b2xL10-padded-decode" in names
    old = EagerRunner(reference, whole_cache=True)
    with pytest.raises(ParityError, match=r"decode: new_key_values has shape"):
        run_parity(reference, old, spec, CONFIG, [4, 10], "fp32", False)


class PastBlindRunner(EagerRunner):
    """A broken graph that ignores its past: right for a whole prompt, wrong for any chunk
    after the first."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = inputs["input_ids"].shape[1]
        blind = {
            name: (value[:, -t:] if name == "attention_mask" else value[..., :0, :])
            if name != "input_ids"
            else value
            for name, value in inputs.items()
        }
        return super().run(blind)


def test_long_prompts_run_as_chunked_prefill_on_both_sides(
    reference: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = graph_spec("generate", CONFIG)
    assert parity.prefill_chunk(1, CONFIG.vocab_size) == parity.PREFILL_CHUNK
    assert parity.prefill_chunk(2, 250_880) == 133  # large vocabularies: shorter chunks
    monkeypatch.setattr(parity, "PREFILL_CHUNK", 16)
    report = run_parity(reference, EagerRunner(reference), spec, CONFIG, [4, 40], "fp32", False)
    assert report.passed and report.max_abs_diff == 0
    assert [(c.name, c.length) for c in report.cases if c.name.endswith("prefill")] == [
        ("b1xL4-prefill", 4), ("b1xL40-prefill", 40), ("b2xL40-padded-prefill", 40)
    ]  # fmt: skip
    # A graph that ignores its past passes a whole-prompt check; chunking exposes it.
    blind = run_parity(reference, PastBlindRunner(reference), spec, CONFIG, [4, 40], "fp32", False)
    failed = [c.name for c in blind.cases if c.worst_ratio(blind.rule) > 1]
    assert not blind.passed and "b1xL40-prefill" in failed and "b1xL4-prefill" not in failed


@pytest.mark.parametrize("block", [7, 1 << 23])  # blocks inside a row and one block per row
def test_blocked_comparison_equals_the_whole_array_one(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs are compared block by block (bounded float64 copies); the figures are those of
    the whole arrays, and a NaN anywhere still fails."""
    monkeypatch.setattr(parity, "COMPARE_BLOCK_VALUES", block)
    gen = np.random.default_rng(0)
    ref = gen.normal(size=(2, 37, 5)).astype(np.float32)
    out = (ref + gen.normal(scale=1e-3, size=ref.shape)).astype(np.float32)
    mask = np.ones((2, 37), dtype=np.int64)
    mask[1, :20] = 0  # a left-padded row: its padding is not compared
    out[1, 3] += 100.0  # in the padding: ignored
    keep = mask.astype(bool)
    diff = parity._compare(ref, out, mask, 1)
    whole = np.abs(ref.astype(np.float64) - out.astype(np.float64))[keep]
    assert diff.max_abs_diff == whole.max()
    assert diff.peak == np.abs(ref.astype(np.float64))[keep].max()
    cosine, agree = parity._cosine_and_argmax(ref, out, mask)
    r, o = ref[keep].astype(np.float64), out[keep].astype(np.float64)
    cos = (r * o).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(o, axis=-1) + 1e-12)
    assert cosine == pytest.approx(cos.mean(), abs=1e-12)
    assert agree == (r.argmax(-1) == o.argmax(-1)).mean()
    out[0, 30, 2] = np.nan
    assert np.isnan(parity._compare(ref, out, mask, 1).max_abs_diff)
    cache = gen.normal(size=(2, 2, 2, 3, 37, 4)).astype(np.float32)  # (L, 2, b, h, t, e)
    moved = cache.copy()
    moved[:, :, 0, :, 36] += 0.5
    assert parity._compare(cache, moved, mask, 4).max_abs_diff == pytest.approx(0.5, rel=1e-6)
