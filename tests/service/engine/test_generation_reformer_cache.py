"""GenerationEngine on a causal (native) Reformer: served through the ``kv_cache`` path like
ALiBi, with no Reformer-specific code in the service, and equal to the eager full recompute."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelRepository
from service.engine.models import LoadedModel, load_model
from service.engine.sampling import SamplingParams
from service.settings import Settings
from tests.service.conftest import EagerReference, run
from tests.service.engine.conftest import (
    OTHER_PROMPTS,
    PROMPT,
    Probe,
    eager_greedy,
    running,
    with_backend,
)

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def reformer(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[[str], Path]
) -> Iterator[tuple[LoadedModel, EagerReference]]:
    from exporters.export import ExportRequest, export
    from exporters.training import train

    # Trained long enough that its greedy tokens change with the context (not one token
    # repeated), so a wrong cache shows up in the tokens.
    ckpt = tmp_path_factory.mktemp("reformer-kv-ckpt")
    train("reformer", "tiny", ckpt, steps=60, seed=0, progress=False)
    store = tmp_path_factory.mktemp("reformer-kv-store")
    export(ExportRequest(ckpt, store, "ref", "onnx", progress=False))
    model = load_model(ModelRepository(store), "ref", None, Settings(store=store))
    assert model.manifest.signature.generation_mode == "kv_cache"
    yield model, EagerReference(ckpt)
    model.close()


def test_greedy_tokens_and_logits_equal_the_eager_full_recompute(
    reformer: tuple[LoadedModel, EagerReference],
) -> None:
    model, reference = reformer
    probe = Probe(model.backend)

    async def main() -> list[int]:
        async with running(with_backend(model, probe)) as engine:
            stream = await engine.submit(PROMPT, SamplingParams(NEW_TOKENS, temperature=0))
            return (await stream.collect()).token_ids

    tokens = run(main())
    ids = reference.token_ids(PROMPT)
    expected = eager_greedy(reference, ids, NEW_TOKENS)
    assert tokens == expected
    assert len(set(tokens)) > 2  # context-dependent choices, not one token repeated
    # One prefill with an empty cache, then one token per step on a cache growing by one (in
    # the decode buffer, whose free slots are masked).
    steps = len(tokens)
    assert [c.input_shape for c in probe.calls] == [(1, len(ids))] + [(1, 1)] * (steps - 1)
    assert [c.past_tokens for c in probe.calls] == [
        (0,),
        *((n,) for n in range(len(ids), len(ids) + steps - 1)),
    ]
    assert all(c.past_length > len(ids) for c in probe.calls[1:])  # free slots in the past
    with torch.no_grad():
        eager = []
        for i in range(steps):
            x = torch.tensor([ids + tokens[:i]], dtype=torch.long)
            eager.append(reference.ckpt.model(x, torch.ones_like(x))[0][0, -1].numpy())
    served = np.stack([c.outputs["logits"][0, -1] for c in probe.calls])
    np.testing.assert_allclose(served, np.stack(eager), atol=1e-4)


def test_batched_with_chunked_prefill_gives_the_solo_greedy_tokens(
    reformer: tuple[LoadedModel, EagerReference],
) -> None:
    """Left-padded decode batch + prompts prefilled in 16-token chunks: each row is unchanged."""
    model, reference = reformer
    prompts = [OTHER_PROMPTS[1] * 2, PROMPT, OTHER_PROMPTS[0]]
    probe = Probe(model.backend)

    async def main() -> list[list[int]]:
        async with running(with_backend(model, probe), prefill_chunk_tokens=16) as engine:
            probe.gate.clear()
            streams = [
                await engine.submit(p, SamplingParams(NEW_TOKENS, temperature=0)) for p in prompts
            ]
            probe.gate.set()
            results = await asyncio.gather(*(s.collect() for s in streams))
            return [r.token_ids for r in results]

    together = run(main())
    for prompt, tokens in zip(prompts, together, strict=True):
        assert tokens == eager_greedy(reference, reference.token_ids(prompt), NEW_TOKENS)
    assert max(c.input_shape[0] for c in probe.calls) == 3  # decode steps shared the batch
    assert any(c.past_length > 0 and c.input_shape[1] > 1 for c in probe.calls)  # chunked prefill


def test_prefix_cache_hits_give_the_eager_greedy_tokens(
    reformer: tuple[LoadedModel, EagerReference],
) -> None:
    """The Reformer's cache (shared-QK vectors and values, buckets recomputed from them) is a
    function of each token's past alone, so another prompt's entries are reusable: a hit that
    ends mid-block and a prompt that is entirely cached give the eager full recompute's tokens."""
    model, reference = reformer
    doc = reference.token_ids((OTHER_PROMPTS[1] + PROMPT) * 2)
    prompts = [doc + reference.token_ids(q)[1:] for q in (" return x", " return y")]
    prompts.append(prompts[1])  # entirely cached
    probe = Probe(model.backend)

    async def main() -> list[tuple[list[int], int]]:
        """Each prompt's tokens, and the cached tokens its prefill started from."""
        async with running(with_backend(model, probe)) as engine:
            results = []
            for prompt in prompts:
                stream = await engine.submit(prompt, SamplingParams(NEW_TOKENS, temperature=0))
                tokens = (await stream.collect()).token_ids
                prefill = probe.calls[-len(tokens)]  # then one decode step per later token
                results.append((tokens, prefill.past_tokens[0]))
            return results

    outcome = run(main())
    served, pasts = [tokens for tokens, _ in outcome], [past for _, past in outcome]
    common = next(i for i, (a, b) in enumerate(zip(*prompts[:2], strict=False)) if a != b)
    assert pasts == [0, common, len(prompts[2]) - 1]
    assert common % 16  # the second hit ends inside a block
    for prompt, tokens in zip(prompts, served, strict=True):
        assert tokens == eager_greedy(reference, prompt, NEW_TOKENS)
