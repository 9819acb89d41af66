"""GenerationEngine on a ``full_sequence`` graph (causal HF-compatible Reformer, TorchScript):
every step recomputes each running sequence in full; only rows of equal length share a pass.

Native causal Reformers export a ``kv_cache`` graph (test_generation_reformer_cache.py); an
``hf_compatible`` one cannot (a later token can change an earlier one's chunks), so it is the
model this mode exists for."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelRepository
from service.engine.generation import GenerationEngine, GenerationResult
from service.engine.models import LoadedModel, load_model
from service.engine.sampling import SamplingParams
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import EagerReference, run
from tests.service.engine.conftest import OTHER_PROMPTS, PROMPT, Probe, with_backend


def hf_compatible_copy(ckpt: Path, out: Path) -> Path:
    """The same checkpoint with ``hf_compatible`` switched on (same weights and tokenizer)."""
    from exporters.checkpoint import CONFIG_FILE

    for item in ckpt.iterdir():
        shutil.copy(item, out / item.name)
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    meta["config"]["hf_compatible"] = True
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


@pytest.fixture(scope="module")
def reformer(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[[str], Path]
) -> Iterator[tuple[LoadedModel, EagerReference]]:
    from exporters.export import ExportRequest, export

    ckpt = hf_compatible_copy(tiny_checkpoint("reformer"), tmp_path_factory.mktemp("hf-ckpt"))
    store = tmp_path_factory.mktemp("reformer-store")
    # TorchScript: the dynamo ONNX export of the causal Reformer fails in this torch version.
    export(ExportRequest(ckpt, store, "ref", "torchscript", progress=False))
    model = load_model(ModelRepository(store), "ref", None, Settings(store=store))
    assert model.manifest.signature.generation_mode == "full_sequence"
    yield model, EagerReference(ckpt)
    model.close()


async def generate_all(
    model: LoadedModel, requests: list[tuple[str, SamplingParams]], gate: Probe | None = None
) -> list[GenerationResult]:
    """Run the requests together; with ``gate``, none starts before all are queued."""
    engine = GenerationEngine(model, Settings(drain_timeout_seconds=5.0), Metrics())
    await engine.start()
    try:
        if gate is not None:
            gate.gate.clear()
        streams = [await engine.submit(prompt, params) for prompt, params in requests]
        if gate is not None:
            gate.gate.set()
        results = await asyncio.gather(*(s.collect() for s in streams))
        assert engine.stats().kv_cache_bytes == 0  # no cache in this mode
        return list(results)
    finally:
        await engine.stop()


def test_each_step_is_the_eager_full_recompute(
    reformer: tuple[LoadedModel, EagerReference],
) -> None:
    model, reference = reformer
    probe = Probe(model.backend)
    (result,) = run(
        generate_all(
            with_backend(model, probe), [(PROMPT, SamplingParams(max_new_tokens=8, temperature=0))]
        )
    )
    ids = reference.token_ids(PROMPT)
    # One forward pass per token over the whole sequence so far: prompt, then prompt + 1, ...
    assert [c.input_shape for c in probe.calls] == [(1, len(ids) + i) for i in range(8)]
    # Each step against the eager forward of the prefix it saw: HF's causal rule lets a later
    # token change an earlier position's logits, so one forward over the final sequence won't do.
    rows = []
    with torch.no_grad():
        for i in range(8):
            x = torch.tensor([ids + result.token_ids[:i]], dtype=torch.long)
            rows.append(reference.ckpt.model(x, torch.ones_like(x))[0][0, -1].numpy())
    eager_logits = np.stack(rows)
    served = np.stack([c.outputs["logits"][0, -1] for c in probe.calls])
    np.testing.assert_allclose(served, eager_logits, atol=1e-4)
    assert result.token_ids == [int(t) for t in eager_logits.argmax(axis=-1)]


def test_equal_length_rows_share_a_pass_and_each_gets_its_solo_output(
    reformer: tuple[LoadedModel, EagerReference],
) -> None:
    """Rows of equal length go through one forward pass together (no padding needed), and each
    still computes exactly what it computes alone, including after the shortest one leaves."""
    model, _ = reformer
    requests = [
        (PROMPT, SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed))
        for n, seed in ((10, 5), (4, 6), (7, 7))
    ]
    requests.append((PROMPT, SamplingParams(max_new_tokens=6, temperature=0)))
    alone = [run(generate_all(model, [request]))[0] for request in requests]
    # The first request holds the backend (gate) until the others are queued, so those four
    # join the running batch in the same step, at the same length.
    blocker = (OTHER_PROMPTS[0], SamplingParams(max_new_tokens=1, temperature=0))
    probe = Probe(model.backend)
    together = run(generate_all(with_backend(model, probe), [blocker, *requests], gate=probe))[1:]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    # After the blocker's one pass, step k runs every request still generating its k-th token
    # in one pass: four rows, then fewer as each reaches its length (or <eos>).
    lengths = [len(r.token_ids) for r in alone]
    expected = [sum(n >= k for n in lengths) for k in range(1, max(lengths) + 1)]
    assert expected[0] == 4
    assert [c.input_shape[0] for c in probe.calls] == [1, *expected]


def test_rows_of_different_lengths_never_share_a_pass(
    reformer: tuple[LoadedModel, EagerReference],
) -> None:
    # The engine batches only rows of equal length (HF-mode chunking depends on padding), so a
    # row is never padded and computes exactly what it computes alone.
    model, _ = reformer
    ours = (PROMPT, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5))
    others = [
        (OTHER_PROMPTS[1] * 2, SamplingParams(max_new_tokens=20, temperature=1.0, seed=9)),
        (OTHER_PROMPTS[0], SamplingParams(max_new_tokens=3, temperature=0)),
    ]
    probe = Probe(model.backend)
    (alone,) = run(generate_all(model, [ours]))
    together = run(
        generate_all(with_backend(model, probe), [others[0], ours, others[1]], gate=probe)
    )
    assert together[1].token_ids == alone.token_ids
    assert together[1].text == alone.text
    # The three prompts differ in length, so no forward pass mixed lengths or padded a row.
    assert max(c.input_shape[0] for c in probe.calls) == 1


def test_prompt_logprobs_and_choices_in_full_sequence_mode(
    reformer: tuple[LoadedModel, EagerReference],
) -> None:
    """The first full pass covers the whole prompt, so its logits score it (the same rule as
    chunked prefill); n choices are independent rows here, seeded per choice."""
    model, reference = reformer
    ids = reference.token_ids(PROMPT)

    async def main() -> tuple[GenerationResult, list[GenerationResult]]:
        engine = GenerationEngine(model, Settings(drain_timeout_seconds=5.0), Metrics())
        await engine.start()
        try:
            scored = await (
                await engine.submit(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=1))
            ).collect()
            (group,) = await engine.submit_many([ids], SamplingParams(4, seed=3), choices=2)
            choices = await asyncio.gather(*(s.collect() for s in group))
            return scored, list(choices)
        finally:
            await engine.stop()

    scored, choices = run(main())
    assert scored.prompt is not None and scored.prompt.logprobs is not None
    with torch.no_grad():
        x = torch.tensor([ids], dtype=torch.long)
        logits = reference.ckpt.model(x, torch.ones_like(x))[0][0].double()
    expected = torch.log_softmax(logits, -1).numpy()[np.arange(len(ids) - 1), ids[1:]]
    served = [s.logprob for s in scored.prompt.logprobs]
    assert served[0] is None
    np.testing.assert_allclose(np.array(served[1:], float), expected, atol=1e-4)
    (alone,) = run(generate_all(model, [(PROMPT, SamplingParams(4, seed=3))]))
    assert choices[0].token_ids == alone.token_ids  # choice 0 draws from the seed itself
    assert all(c.completion_tokens == 4 for c in choices)
