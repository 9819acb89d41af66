"""Concurrent HTTP requests really share batches, and every caller gets exactly its own result."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI

from service.app import create_app
from tests.service.conftest import EagerReference, ServiceStore, make_settings, run, running_app

# Distinct texts of different lengths, so a mixed-up result would be noticed.
TEXTS = [f"def f{i}(x):\n    return x * {i}" + " + 1" * (i % 5) for i in range(12)]


def batch_sizes(metrics_text: str, model: str) -> dict[float, float]:
    """Cumulative bucket counts of longhaul_batch_size for ``model``: {upper bound: count}."""
    pattern = rf'longhaul_batch_size_bucket\{{le="([0-9.+Inf]+)",model="{model}"\}} ([0-9.]+)'
    return {float(le): float(count) for le, count in re.findall(pattern, metrics_text)}


async def encode_concurrently(app: FastAPI, model: str) -> tuple[list[dict[str, Any]], str]:
    async with running_app(app) as http:
        responses = await asyncio.gather(
            *(http.post("/v1/encode", json={"model": model, "inputs": t}) for t in TEXTS)
        )
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses], (await http.get("/metrics")).text


@pytest.mark.parametrize("model", ["lin", "sha"])
def test_concurrent_requests_are_batched_and_answered_individually(
    service_store: ServiceStore, eager: Callable[[str], EagerReference], model: str
) -> None:
    # The deadline rule with a generous max_wait: a batch window wide enough to be
    # deterministic on 2 cores. The default throughput rule batches only where its warm-up
    # timings say batching pays by more than their own error, which a loaded machine's noise
    # decides (tests/service/engine/test_batcher.py drives it with scripted timings).
    settings = make_settings(
        service_store.root, models=[model], max_wait_ms=200.0, batch_policy="deadline"
    )
    app = create_app(settings)
    bodies, metrics_text = run(encode_concurrently(app, model))
    ref = eager(model)
    for text, body in zip(TEXTS, bodies, strict=True):
        expected = ref.embed(ref.token_ids(text))
        np.testing.assert_allclose(body["embeddings"][0], expected, atol=1e-4)
    buckets = batch_sizes(metrics_text, model)
    batches = buckets[float("inf")]
    assert batches - buckets[1.0] >= 1, f"{model}: no batch larger than 1 ({buckets})"
    # 12 requests + 1 warm-up in far fewer forward passes than requests.
    assert batches <= 7, buckets
