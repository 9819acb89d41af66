"""GenerationEngine on the real tiny ALiBi graph (and a scripted fake where behaviour must be
forced): equivalence with the eager model, batching invariance, sampling, stopping, chunked
prefill, KV budget, cancellation, metrics."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from model_store import ModelRepository
from service.backends.base import Backend
from service.engine.cost import MIN_PREFILL_CHUNK, prefill_chunk_limit
from service.engine.errors import ContextLengthExceeded, EngineStopped, InvalidInput, QueueFull
from service.engine.generation import (
    EOS_ID,
    GenerationChunk,
    GenerationEngine,
    GenerationError,
    GenerationResult,
    GenerationStats,
    GenerationStream,
)
from service.engine.kv_cache import CacheShape
from service.engine.models import LoadedModel, load_model
from service.engine.sampling import SamplingParams
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import EagerReference, run, wait_for
from tests.service.engine.conftest import (
    OTHER_PROMPTS,
    PROMPT,
    Probe,
    eager_greedy,
    past_cache,
    running,
    settings_for,
    with_backend,
)

T = TypeVar("T")
# ----------------------------------------------------------------------------- fixtures


class CountingBackend(Backend):
    """A fake kv_cache graph: the next token is the last input id + 1, except that
    ``eos_after`` is followed by <eos>. The new cache entries it returns are zeros."""

    provider = "counting"

    def __init__(self, shape: CacheShape, vocab: int, eos_after: int = -1) -> None:
        self.shape = shape
        self.vocab = vocab
        self.eos_after = eos_after
        self.runs = 0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        ids, past = inputs["input_ids"], past_cache(inputs)
        assert past is not None
        b, t = ids.shape
        following = np.where(ids == self.eos_after, EOS_ID, (ids + 1) % self.vocab)
        logits = np.zeros((b, t, self.vocab), np.float32)
        np.put_along_axis(logits, following[..., None], 10.0, axis=-1)
        new = np.zeros((*past.shape[:4], t, past.shape[5]), np.float32)
        return {"logits": logits, "new_key_values": new}


@dataclass(frozen=True)
class Trained:
    model: LoadedModel
    reference: EagerReference


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """An ALiBi trained for 60 steps (2 s): unlike the 5-step session model, whose greedy output
    is one token repeated whatever the context, its choices depend on the context, so a batching
    bug that corrupts a row's cache changes its tokens."""
    from exporters.export import ExportRequest, export
    from exporters.training import train

    ckpt = tmp_path_factory.mktemp("ali60-ckpt")
    store = tmp_path_factory.mktemp("ali60-store")
    train("alibi", "tiny", ckpt, steps=60, seed=0, progress=False)
    export(ExportRequest(checkpoint=ckpt, store=store, name="ali", format="onnx", progress=False))
    settings = Settings(store=store, intra_op_threads=2)
    model = load_model(ModelRepository(store), "ali", None, settings)
    yield Trained(model, EagerReference(ckpt))
    model.close()


@pytest.fixture(scope="module")
def ali(trained: Trained) -> LoadedModel:
    return trained.model


@pytest.fixture(scope="module")
def reference(trained: Trained) -> EagerReference:
    return trained.reference


def counting_model(ali: LoadedModel, eos_after: int = -1) -> LoadedModel:
    layout = ali.manifest.signature.cache
    assert layout is not None
    vocab = int(ali.manifest.config["vocab_size"])
    return with_backend(ali, CountingBackend(CacheShape.from_layout(layout), vocab, eos_after))


async def generate(
    engine: GenerationEngine, prompt: str | list[int], **params: Any
) -> GenerationResult:
    stream = await engine.submit(prompt, SamplingParams(**params))
    return await stream.collect()


def ran_to_the_end(result: GenerationResult, max_new_tokens: int, eos_id: int = EOS_ID) -> bool:
    """The request ran until it was done: all its tokens, or fewer ending on EOS (sampled
    requests of a real model may draw it at any step)."""
    if result.finish_reason == "stop" and result.token_ids[-1:] == [eos_id]:
        return result.completion_tokens <= max_new_tokens
    return result.finish_reason == "length" and result.completion_tokens == max_new_tokens


# ----------------------------------------------------------------------------- equivalence


def test_greedy_matches_the_eager_models_own_loop(
    ali: LoadedModel, reference: EagerReference
) -> None:
    ids = reference.token_ids(PROMPT)
    probe = Probe(ali.backend)

    async def main() -> GenerationResult:
        async with running(with_backend(ali, probe)) as engine:
            return await generate(engine, PROMPT, max_new_tokens=16, temperature=0)

    result = run(main())
    expected = eager_greedy(reference, ids, 16)
    assert result.token_ids == expected
    assert len(set(expected)) > 3  # a real test only if the model's choices vary
    # Token by token, the cached graph's logits are the eager model's full recompute.
    with torch.no_grad():
        x = torch.tensor([ids + expected[:-1]], dtype=torch.long)
        eager_logits = reference.ckpt.model(x, torch.ones_like(x))[0][0, len(ids) - 1 :].numpy()
    served = np.stack([call.outputs["logits"][0, -1] for call in probe.calls])
    np.testing.assert_allclose(served, eager_logits, atol=1e-4)
    assert result.prompt_tokens == len(ids)
    assert result.completion_tokens == len(expected)
    expected_text = reference.ckpt.tokenizer.decode(
        [t for t in expected if t != EOS_ID], skip_special_tokens=True
    )
    assert result.text == expected_text


def test_empty_prompt_starts_a_document_with_eos(
    ali: LoadedModel, reference: EagerReference
) -> None:
    async def main() -> GenerationResult:
        async with running(ali) as engine:
            return await generate(engine, "", max_new_tokens=6, temperature=0)

    result = run(main())
    assert result.prompt_tokens == 1
    assert result.token_ids == eager_greedy(reference, [EOS_ID], 6)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0},
        {"temperature": 1.0, "seed": 7},
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3},
    ],
    ids=["greedy", "seeded", "seeded-topk-topp"],
)
def test_output_is_the_same_alone_or_beside_others(
    ali: LoadedModel, params: dict[str, Any]
) -> None:
    """Joining mid-stream, other prompt lengths, others leaving early: same tokens as alone."""

    async def alone() -> GenerationResult:
        async with running(ali) as engine:
            return await generate(engine, PROMPT, max_new_tokens=24, **params)

    async def crowded() -> GenerationResult:
        async with running(ali, prefill_chunk_tokens=16) as engine:
            long = await engine.submit(
                OTHER_PROMPTS[1] * 3, SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)
            )
            await anext(long)  # it is decoding: ours joins a running batch
            short = await engine.submit(
                OTHER_PROMPTS[0], SamplingParams(max_new_tokens=3, temperature=0)
            )
            ours = await engine.submit(PROMPT, SamplingParams(max_new_tokens=24, **params))
            late = await engine.submit(OTHER_PROMPTS[2], SamplingParams(max_new_tokens=30))
            results = await asyncio.gather(
                ours.collect(), long.collect(), short.collect(), late.collect()
            )
            return results[0]

    solo = run(alone())
    together = run(crowded())
    assert together.token_ids == solo.token_ids
    assert together.text == solo.text


def test_seeded_sampling_is_reproducible_and_seed_dependent(ali: LoadedModel) -> None:
    async def main() -> list[list[int]]:
        async with running(ali) as engine:
            results = [
                await generate(engine, PROMPT, max_new_tokens=20, temperature=1.0, seed=seed)
                for seed in (11, 11, 12)
            ]
            return [r.token_ids for r in results]

    first, again, other = run(main())
    assert first == again
    assert first != other


# ----------------------------------------------------------------------------- stopping


def test_max_new_tokens_ends_with_length(ali: LoadedModel) -> None:
    async def main() -> GenerationResult:
        async with running(counting_model(ali)) as engine:
            return await generate(engine, [10], max_new_tokens=5, temperature=0)

    result = run(main())
    assert result.token_ids == [11, 12, 13, 14, 15]
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)


def test_eos_ends_with_stop_and_is_not_text(ali: LoadedModel) -> None:
    model = counting_model(ali, eos_after=13)

    async def main() -> GenerationResult:
        async with running(model) as engine:
            return await generate(engine, [10], max_new_tokens=50, temperature=0)

    result = run(main())
    assert result.token_ids == [11, 12, 13, EOS_ID]
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 4
    assert result.text == ali.tokenizer.decode([11, 12, 13])


def test_stop_string_ends_generation_and_is_never_streamed(ali: LoadedModel) -> None:
    async def main() -> tuple[GenerationResult, list[GenerationChunk], str]:
        async with running(ali) as engine:
            full = await generate(engine, PROMPT, max_new_tokens=32, temperature=0)
            text = full.text
            middle = len(text) // 2
            stop = text[middle : middle + 2]
            stream = await engine.submit(
                PROMPT, SamplingParams(max_new_tokens=32, temperature=0, stop=("\x00", stop))
            )
            chunks = [chunk async for chunk in stream]
            return full, chunks, stop

    full, chunks, stop = run(main())
    expected = full.text[: full.text.index(stop)]
    streamed = "".join(c.text for c in chunks)
    assert streamed == expected
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens < 32
    # Nothing released could have been taken back: every prefix streamed is a prefix of the
    # answer, and no chunk contains any part of the stop string's occurrence.
    released = ""
    for chunk in chunks:
        released += chunk.text
        assert expected.startswith(released)


# ----------------------------------------------------------------------------- chunked prefill


def test_chunked_prefill_equals_unchunked(ali: LoadedModel, reference: EagerReference) -> None:
    prompt = (OTHER_PROMPTS[1] + PROMPT) * 3
    n_prompt = len(reference.token_ids(prompt))
    assert n_prompt > 40

    async def main(chunk: int) -> tuple[GenerationResult, Probe]:
        probe = Probe(ali.backend)
        async with running(with_backend(ali, probe), prefill_chunk_tokens=chunk) as engine:
            return await generate(engine, prompt, max_new_tokens=8, temperature=0), probe

    whole, whole_probe = run(main(512))
    chunked, chunked_probe = run(main(16))
    shapes = [c.input_shape for c in chunked_probe.calls]
    chunks = [s[1] for s in shapes[: -(8 - 1)]]  # prefill calls, then 7 decode steps
    assert chunks == [16] * (n_prompt // 16) + ([n_prompt % 16] if n_prompt % 16 else [])
    assert [c.past_length for c in chunked_probe.calls[: len(chunks)]] == [
        16 * i for i in range(len(chunks))
    ]
    last_whole = whole_probe.calls[0].outputs["logits"][0, -1]
    last_chunked = chunked_probe.calls[len(chunks) - 1].outputs["logits"][0, -1]
    np.testing.assert_allclose(last_chunked, last_whole, atol=1e-4)
    assert chunked.token_ids == whole.token_ids


def test_prefill_chunks_shrink_with_the_past_under_the_pair_budget(
    ali: LoadedModel, reference: EagerReference
) -> None:
    """ALiBi chunks attend to the whole past: with a pair budget they shrink as it grows, and
    the tokens are still those of an unbounded prefill."""
    prompt = (OTHER_PROMPTS[1] + PROMPT) * 3
    n_prompt = len(reference.token_ids(prompt))
    budget = 2048

    async def main(pairs: int) -> tuple[GenerationResult, Probe]:
        probe = Probe(ali.backend)
        model = with_backend(ali, probe)
        async with running(model, prefill_chunk_tokens=512, prefill_chunk_pairs=pairs) as engine:
            return await generate(engine, prompt, max_new_tokens=6, temperature=0), probe

    whole, _ = run(main(10**9))
    bounded, probe = run(main(budget))
    chunks: list[int] = []
    for call in probe.calls:  # the sequence is alone: its prefill calls come first
        if sum(chunks) == n_prompt:
            break
        chunks.append(call.input_shape[1])
    past = [sum(chunks[:i]) for i in range(len(chunks))]
    assert chunks == [min(n_prompt - p, prefill_chunk_limit(p, budget)) for p in past], (
        "each chunk is the longest the pair budget allows on its past"
    )
    assert chunks[0] > chunks[-2] >= MIN_PREFILL_CHUNK  # later chunks are shorter
    assert bounded.token_ids == whole.token_ids


def test_long_prefill_is_interleaved_with_running_decodes(ali: LoadedModel) -> None:
    """A long prompt is admitted chunk by chunk; the running stream decodes between chunks."""
    probe = Probe(ali.backend)

    async def main() -> int:
        async with running(with_backend(ali, probe), prefill_chunk_tokens=16) as engine:
            # Greedy: no early <eos> can end this stream while the long prompt is prefilled.
            streaming = await engine.submit(PROMPT, SamplingParams(60, temperature=0))
            await anext(streaming)
            start = len(probe.calls)
            long = await engine.submit(OTHER_PROMPTS[1] * 6, SamplingParams(max_new_tokens=2))
            await asyncio.gather(streaming.collect(), long.collect())
            return start

    start = run(main())
    kinds = ["prefill" if c.input_shape[1] > 1 else "decode" for c in probe.calls[start:]]
    first, last = kinds.index("prefill"), len(kinds) - 1 - kinds[::-1].index("prefill")
    assert last - first >= 6  # several chunks...
    between = kinds[first : last + 1]
    # ...each followed by a decode step of the running stream before the next chunk.
    assert all(a != b for a, b in itertools.pairwise(between))


# ----------------------------------------------------------------------------- admission, budget


def test_kv_budget_makes_the_second_request_wait_then_complete_correctly(
    ali: LoadedModel,
) -> None:
    layout = ali.manifest.signature.cache
    assert layout is not None
    per_token = CacheShape.from_layout(layout).bytes_per_token
    prompt_b = OTHER_PROMPTS[0]
    probe = Probe(ali.backend, delay=0.002)
    budget = 40 * per_token  # one request of <= 40 tokens at a time, never two

    async def main() -> tuple[GenerationResult, GenerationResult, list[int], GenerationResult]:
        async with running(with_backend(ali, probe), kv_cache_bytes=budget) as engine:
            a = await engine.submit(PROMPT, SamplingParams(max_new_tokens=25, temperature=0))
            b = await engine.submit(prompt_b, SamplingParams(max_new_tokens=25, temperature=0))
            await anext(a)
            stats = engine.stats()
            seen = [stats.running, stats.waiting]
            result_a, result_b = await asyncio.gather(a.collect(), b.collect())
            seen.append(engine.stats().kv_cache_bytes)
        async with running(ali) as engine:
            alone_b = await generate(engine, prompt_b, max_new_tokens=25, temperature=0)
        return result_a, result_b, seen, alone_b

    _, result_b, seen, alone_b = run(main())
    assert seen == [1, 1, 0]
    assert result_b.token_ids == alone_b.token_ids
    assert max(c.past_bytes for c in probe.calls) <= budget
    assert max(c.input_shape[0] for c in probe.calls) == 1  # never batched together


def test_the_allocated_cache_never_exceeds_the_budget_while_buffers_grow(
    ali: LoadedModel,
) -> None:
    """The decode buffer grows with headroom (256-slot blocks); capped at the longest
    reservation, rows x capacity stays within what admission counted, so the budget holds for
    what is really allocated at every step, not only for the reservations."""
    layout = ali.manifest.signature.cache
    assert layout is not None
    per_token = CacheShape.from_layout(layout).bytes_per_token
    budget = 3 * 300 * per_token  # three sequences of 300 tokens; 3 x 512 slots would not fit
    counting = counting_model(ali)  # the fake graph has no context limit of its own
    counting = replace(counting, manifest=ali.manifest.model_copy(update={"max_context": 1024}))
    probe = Probe(counting.backend)
    held: list[int] = []

    async def main() -> list[GenerationResult]:
        async with running(with_backend(counting, probe), kv_cache_bytes=budget) as engine:
            params = SamplingParams(max_new_tokens=299, temperature=0)
            streams = [await engine.submit([10 + i], params) for i in range(5)]
            done = asyncio.gather(*(s.collect() for s in streams))
            while not done.done():
                held.append(engine.stats().kv_cache_bytes)
                await asyncio.sleep(0.001)
            return await done

    results = run(main())
    assert [r.completion_tokens for r in results] == [299] * 5
    decodes = [c for c in probe.calls if c.input_shape[1] == 1 and c.past_length > 1]
    assert max(c.input_shape[0] for c in decodes) == 3  # three rows at once, never more
    assert max(c.past_length for c in decodes) == 300  # grew past 256, capped at 300
    assert max(c.past_bytes for c in probe.calls) <= budget
    assert max(held) <= budget


def test_beyond_the_waiting_limit_requests_are_refused(ali: LoadedModel) -> None:
    probe = Probe(ali.backend)
    metrics = Metrics(CollectorRegistry())

    async def main() -> None:
        model = with_backend(ali, probe)
        async with running(model, metrics, max_num_seqs=1, max_waiting_sequences=1) as engine:
            probe.gate.clear()  # hold the first request inside its prefill
            first = await engine.submit(PROMPT, SamplingParams(max_new_tokens=4))
            await wait_for(lambda: engine.stats().running == 1)
            second = await engine.submit(PROMPT, SamplingParams(max_new_tokens=4))
            with pytest.raises(QueueFull) as refused:
                await engine.submit(PROMPT, SamplingParams(max_new_tokens=4))
            assert refused.value.retry_after == 1
            probe.gate.set()
            await asyncio.gather(first.collect(), second.collect())

    run(main())
    rejected = metrics.registry.get_sample_value(
        "longhaul_requests_rejected_total", {"model": "ali", "reason": "queue_full"}
    )
    assert rejected == 1


def test_requests_that_can_never_fit_are_refused_up_front(ali: LoadedModel) -> None:
    layout = ali.manifest.signature.cache
    assert layout is not None
    per_token = CacheShape.from_layout(layout).bytes_per_token

    async def main() -> None:
        async with running(ali, kv_cache_bytes=10 * per_token) as engine:
            with pytest.raises(InvalidInput, match="LONGHAUL_KV_CACHE_BYTES"):
                await engine.submit([5, 6], SamplingParams(max_new_tokens=9))
            assert ran_to_the_end(await generate(engine, [5, 6], max_new_tokens=8), 8)

    run(main())


def test_context_length_and_vocabulary_are_checked(ali: LoadedModel) -> None:
    max_context = ali.manifest.max_context

    async def main() -> None:
        async with running(ali) as engine:
            with pytest.raises(ContextLengthExceeded) as exc:
                await engine.submit([5] * (max_context - 3), SamplingParams(max_new_tokens=4))
            assert exc.value.tokens == max_context + 1
            with pytest.raises(InvalidInput, match="token ids"):
                await engine.submit([5, 100_000], SamplingParams(max_new_tokens=1))
            # Exactly at the limit is fine.
            result = await generate(engine, [5] * (max_context - 3), max_new_tokens=3)
            assert ran_to_the_end(result, 3)

    run(main())


# ----------------------------------------------------------------------------- cancellation


def test_cancel_frees_the_sequence_within_a_step(ali: LoadedModel) -> None:
    probe = Probe(ali.backend, delay=0.002)

    async def main() -> int:
        async with running(with_backend(ali, probe)) as engine:
            stream = await engine.submit(PROMPT, SamplingParams(200, temperature=0))
            other = await engine.submit(OTHER_PROMPTS[0], SamplingParams(30, temperature=0))
            await anext(stream)
            await anext(stream)
            stream.cancel()
            calls_at_cancel = len(probe.calls)
            result = await other.collect()  # the neighbour is unaffected
            assert result.completion_tokens == 30
            assert engine.stats() == GenerationStats(0, 0, 0, 0)
            return calls_at_cancel

    calls_at_cancel = run(main())
    after = [c.input_shape[0] for c in probe.calls[calls_at_cancel:]]
    assert after.count(2) <= 1  # at most the step already in flight still carried it
    assert len(probe.calls) < 60  # it never ran its 200 tokens


def test_cancel_while_waiting_removes_it_from_the_queue(ali: LoadedModel) -> None:
    probe = Probe(ali.backend)

    async def main() -> None:
        async with running(with_backend(ali, probe), max_num_seqs=1) as engine:
            probe.gate.clear()
            first = await engine.submit(PROMPT, SamplingParams(max_new_tokens=3))
            await wait_for(lambda: engine.stats().running == 1)
            waiting = await engine.submit(PROMPT, SamplingParams(max_new_tokens=3))
            assert engine.stats().waiting == 1
            waiting.cancel()
            assert engine.stats().waiting == 0
            probe.gate.set()
            await first.collect()

    run(main())


def test_engine_cancel_ends_the_stream_and_frees_the_slot(ali: LoadedModel) -> None:
    """The engine's own cancel (what a deadline would call), not the stream's: the consumer's
    iteration ends without a final chunk, whether the request was waiting or decoding."""
    probe = Probe(ali.backend, delay=0.002)

    async def main() -> tuple[list[GenerationChunk], list[GenerationChunk]]:
        async with running(with_backend(ali, probe), max_num_seqs=1) as engine:
            decoding = await engine.submit(PROMPT, SamplingParams(200, temperature=0))
            waiting = await engine.submit(PROMPT, SamplingParams(200, temperature=0))
            await anext(decoding)
            engine.cancel(waiting.id)
            engine.cancel(decoding.id)
            engine.cancel(decoding.id)  # idempotent
            rest = [chunk async for chunk in decoding]
            never = [chunk async for chunk in waiting]
            await wait_for(lambda: engine.stats() == GenerationStats(0, 0, 0, 0))
            return rest, never

    rest, never = run(main())
    assert never == []
    assert len(rest) < 5 and all(chunk.finish_reason is None for chunk in rest)
    assert max(c.input_shape[0] for c in probe.calls) == 1  # the waiting one never ran


# ----------------------------------------------------------------------------- failures, lifecycle


def test_backend_failure_fails_the_request_not_the_engine(ali: LoadedModel) -> None:
    probe = Probe(ali.backend)

    async def main() -> None:
        async with running(with_backend(ali, probe)) as engine:
            probe.fail = RuntimeError("device lost")
            with pytest.raises(GenerationError):
                await generate(engine, PROMPT, max_new_tokens=3)
            probe.fail = None
            assert ran_to_the_end(await generate(engine, PROMPT, max_new_tokens=3), 3)
            assert engine.stats().kv_cache_bytes == 0

    run(main())


def test_stop_finishes_admitted_work_then_refuses(ali: LoadedModel) -> None:
    async def main() -> None:
        engine = GenerationEngine(ali, settings_for(), Metrics())
        with pytest.raises(EngineStopped):
            await engine.submit(PROMPT, SamplingParams(max_new_tokens=1))  # not started yet
        await engine.start()
        await engine.warmup()
        stream: GenerationStream = await engine.submit(PROMPT, SamplingParams(max_new_tokens=10))
        await engine.stop()
        assert ran_to_the_end(await stream.collect(), 10)
        with pytest.raises(EngineStopped):
            await engine.submit(PROMPT, SamplingParams(max_new_tokens=1))

    run(main())


# ----------------------------------------------------------------------------- metrics


def test_metrics_count_tokens_latencies_and_state(
    ali: LoadedModel, reference: EagerReference
) -> None:
    metrics = Metrics(CollectorRegistry())
    n_prompt = len(reference.token_ids(PROMPT))

    probe = Probe(ali.backend)

    async def main() -> None:
        async with running(with_backend(ali, probe), metrics) as engine:
            await engine.warmup()  # stays out of the request metrics
            probe.gate.clear()  # both requests queue up before any step runs: they share steps
            params = SamplingParams(max_new_tokens=7, temperature=0)
            streams = [await engine.submit(PROMPT, params) for _ in range(2)]
            probe.gate.set()
            await asyncio.gather(*(s.collect() for s in streams))

    run(main())

    def value(name: str, labels: dict[str, str] | None = None) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "ali", **(labels or {})})

    assert value("longhaul_generated_tokens_total") == 14
    assert value("longhaul_input_tokens_total") == 2 * n_prompt
    assert value("longhaul_time_to_first_token_seconds_count") == 2
    assert value("longhaul_inter_token_latency_seconds_count") == 12
    assert value("longhaul_running_sequences") == 0
    assert value("longhaul_waiting_sequences") == 0
    assert value("longhaul_kv_cache_bytes") == 0
    # One batch_size observation per forward pass; the two requests shared decode steps.
    rows = [c.input_shape[0] for c in probe.calls]
    assert value("longhaul_batch_size_count") == len(rows)
    assert value("longhaul_batch_size_bucket", {"le": "1.0"}) == rows.count(1)
    assert rows.count(2) >= 5
