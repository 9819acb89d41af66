"""Automatic prefix caching in the generation engine, on the real tiny ALiBi graph: a hit gives
the tokens of a cold prefill (greedy and seeded), whole blocks and mid-block; an entirely cached
prompt still computes its last token; prompts sent together share one prefill; the byte bound
holds; the metrics count what was reused.

The rule (docs/decisions.md, "Prefix caching"): tokens identical, logits within the exporters'
FP32 parity rule, because a hit moves where the prefill's chunks start, and chunking alone
reorders float sums; where the chunks coincide, a hit is bit-for-bit the cold prefill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from exporters.parity import FP32_RULE
from model_store import ModelRepository
from service.engine.generation import GenerationResult
from service.engine.kv_cache import CacheShape
from service.engine.models import LoadedModel, load_model
from service.engine.sampling import SamplingParams
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import EagerReference, run
from tests.service.engine.conftest import OTHER_PROMPTS, PROMPT, Probe, running, with_backend

NEW = 12
BLOCK = 16


@dataclass(frozen=True)
class Trained:
    model: LoadedModel
    reference: EagerReference


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """60 steps, so its greedy choices depend on the context (test_generation.py's reason)."""
    from exporters.export import ExportRequest, export
    from exporters.training import train

    ckpt = tmp_path_factory.mktemp("ali-prefix-ckpt")
    store = tmp_path_factory.mktemp("ali-prefix-store")
    train("alibi", "tiny", ckpt, steps=60, seed=0, progress=False)
    export(ExportRequest(checkpoint=ckpt, store=store, name="ali", format="onnx", progress=False))
    model = load_model(ModelRepository(store), "ali", None, Settings(store=store))
    yield Trained(model, EagerReference(ckpt))
    model.close()


@pytest.fixture(scope="module")
def doc(trained: Trained) -> list[int]:
    """A 48-token "document" (3 blocks) that the prompts below share."""
    ids = trained.reference.token_ids((OTHER_PROMPTS[1] + PROMPT) * 3)
    assert len(ids) >= 48
    return ids[:48]


def question(trained: Trained, text: str) -> list[int]:
    return trained.reference.token_ids(text)[1:]  # without the special prefix


@dataclass
class Served:
    results: list[GenerationResult]
    probe: Probe
    metrics: Metrics

    def value(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(f"longhaul_{name}", {"model": "ali"})
        return 0.0 if value is None else value


def serve(
    model: LoadedModel,
    prompts: list[list[int]],
    params: dict[str, Any],
    together: bool = False,
    **settings: Any,
) -> Served:
    """Generate for ``prompts`` in one engine, one after another (or all queued at once)."""
    probe = Probe(model.backend)
    metrics = Metrics(CollectorRegistry())

    async def main() -> list[GenerationResult]:
        async with running(with_backend(model, probe), metrics, **settings) as engine:
            if not together:
                results = []
                for prompt in prompts:
                    stream = await engine.submit(prompt, SamplingParams(NEW, **params))
                    results.append(await stream.collect())
                return results
            probe.gate.clear()  # nothing runs until every prompt is queued
            streams = [await engine.submit(p, SamplingParams(NEW, **params)) for p in prompts]
            probe.gate.set()
            return list(await asyncio.gather(*(s.collect() for s in streams)))

    return Served(run(main()), probe, metrics)


def logits_of_last(served: Served) -> np.ndarray:
    """Next-token logits of every forward pass of the last request (it ran alone, last)."""
    calls = served.probe.calls[-NEW:]
    return np.stack([c.outputs["logits"][0, -1] for c in calls])


def assert_within_parity_rule(actual: np.ndarray, expected: np.ndarray) -> None:
    bound = FP32_RULE.bound(float(np.abs(expected).max()))
    assert float(np.abs(actual - expected).max()) <= bound


def block_bytes(model: LoadedModel) -> int:
    layout = model.manifest.signature.cache
    assert layout is not None
    return BLOCK * CacheShape.from_layout(layout).bytes_per_token


PARAMS = [{"temperature": 0}, {"temperature": 0.9, "top_k": 40, "seed": 5}]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_a_hit_ending_mid_block_gives_the_tokens_of_a_cold_prefill(
    trained: Trained, doc: list[int], params: dict[str, Any]
) -> None:
    first = doc + question(trained, " return self.parse(text)" * 3)
    second = doc + question(trained, " return self.value")
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    # The match ends inside the first's 4th block, which is whole (only whole blocks are kept).
    assert len(doc) < common < len(doc) + BLOCK <= len(first)
    cold = serve(trained.model, [second], params, prefix_cache=False)
    warm = serve(trained.model, [first, second], params)
    assert warm.results[1].token_ids == cold.results[0].token_ids
    assert len(set(cold.results[0].token_ids)) > 2  # context-dependent, not one token repeated
    # The second prompt's prefill: one pass over its tokens after the common prefix.
    prefill = warm.probe.calls[-NEW]
    assert prefill.past_tokens == (common,) and prefill.input_shape == (1, len(second) - common)
    assert_within_parity_rule(logits_of_last(warm), logits_of_last(cold))
    assert warm.value("prefix_cache_hit_tokens_total") == common
    assert warm.value("prefix_cache_lookups_total") == 2
    assert warm.value("prefix_cache_lookup_tokens_total") == len(first) + len(second)
    # The second shares the document's blocks and adds its own after them.
    blocks = len(first) // BLOCK + len(second) // BLOCK - len(doc) // BLOCK
    assert warm.value("prefix_cache_blocks") == blocks
    assert warm.value("prefix_cache_bytes") == blocks * block_bytes(trained.model)


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_an_entirely_cached_prompt_computes_only_its_last_token(
    trained: Trained, doc: list[int], params: dict[str, Any]
) -> None:
    prompt = doc + question(trained, " x")
    cold = serve(trained.model, [prompt], params, prefix_cache=False)
    warm = serve(trained.model, [prompt, prompt], params)
    assert warm.results[1].token_ids == warm.results[0].token_ids == cold.results[0].token_ids
    prefill = warm.probe.calls[-NEW]
    assert prefill.past_tokens == (len(prompt) - 1,) and prefill.input_shape == (1, 1)
    assert_within_parity_rule(logits_of_last(warm), logits_of_last(cold))
    assert warm.value("prefix_cache_hit_tokens_total") == len(prompt) - 1


def test_where_the_chunks_coincide_a_hit_is_bit_for_bit_the_cold_prefill(
    trained: Trained, doc: list[int]
) -> None:
    """16-token chunks: the cold prefill of ``second`` computes the document in the same
    chunks the first request did, so the reused entries and then every logit are identical."""
    first = doc + question(trained, "\n\nclass A:")
    second = doc + question(trained, " return None")
    assert first[len(doc)] != second[len(doc)]  # the hit is the 3 whole blocks of the document
    params = {"temperature": 0}
    cold = serve(trained.model, [second], params, prefix_cache=False, prefill_chunk_tokens=16)
    warm = serve(trained.model, [first, second], params, prefill_chunk_tokens=16)
    assert warm.probe.calls[-NEW].past_tokens == (len(doc),)
    np.testing.assert_array_equal(logits_of_last(warm), logits_of_last(cold))
    assert warm.results[1].token_ids == cold.results[0].token_ids


def test_prompts_sent_together_prefill_their_shared_document_once(
    trained: Trained, doc: list[int]
) -> None:
    """Admitted in one step, the later prefills pick up the blocks the first one inserts."""
    prompts = [doc + question(trained, q) for q in (" return 1", " return 22", " pass")]
    params = {"temperature": 0}
    cold = [serve(trained.model, [p], params, prefix_cache=False).results[0] for p in prompts]
    warm = serve(trained.model, prompts, params, together=True, prefill_chunk_tokens=16)
    assert [r.token_ids for r in warm.results] == [r.token_ids for r in cold]
    prefilled = sum(c.input_shape[1] for c in warm.probe.calls if c.input_shape[1] > 1)
    assert prefilled < len(doc) + sum(len(p) - len(doc) for p in prompts) + BLOCK
    assert warm.value("prefix_cache_hit_tokens_total") >= 2 * len(doc)


def test_off_reuses_nothing(trained: Trained, doc: list[int]) -> None:
    prompt = doc + question(trained, " x")
    served = serve(trained.model, [prompt, prompt], {"temperature": 0}, prefix_cache=False)
    assert served.probe.calls[-NEW].past_tokens == (0,)  # the whole prompt again
    assert served.value("prefix_cache_lookups_total") == 0
    assert served.value("prefix_cache_bytes") == 0


def test_the_byte_bound_holds_and_evicted_prompts_are_recomputed_exactly(
    trained: Trained, doc: list[int]
) -> None:
    bytes_per_block = block_bytes(trained.model)
    prompts = [[5 + i, *doc[1:], *question(trained, " y")] for i in range(4)]  # no shared block
    params = {"temperature": 0}
    served = serve(
        trained.model, [*prompts, prompts[0]], params, prefix_cache_bytes=4 * bytes_per_block
    )
    assert served.value("prefix_cache_bytes") <= 4 * bytes_per_block
    assert served.value("prefix_cache_evicted_blocks_total") > 0
    assert served.probe.calls[-NEW].past_tokens == (0,)  # the first prompt was evicted
    cold = serve(trained.model, [prompts[0]], params, prefix_cache=False)
    assert served.results[-1].token_ids == cold.results[0].token_ids == served.results[0].token_ids
