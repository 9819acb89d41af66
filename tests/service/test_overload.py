"""Overload, proven on a real server: each engine driven past its queue limit for a few seconds
over loopback (benchmarks/overload.py, the ``overload`` section of ``make bench``, shorter).

Admitted requests are 200, the excess 429 with Retry-After, nothing else; the server counted
exactly the 429s the clients saw as queue_full rejections; admitted p99 stays within what the
queue limit allows; RSS stays flat.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.overload import MIB, OverloadPlan, bodies, run_engine, serve, server_env
from tests.service.conftest import ServiceStore

PLAN = OverloadPlan(
    seconds=3.0, clients=24, queue_limit=2, slots=2, retry_pause_s=0.1, solo_requests=6,
    max_new_tokens=16, floor_s=2.0,  # the floor: scheduling noise of 2 cores shared by a CI run
)  # fmt: skip


@pytest.mark.slow  # a server subprocess and 2 x 3 s of saturating load: ~30 s on 2 cores
def test_each_engine_past_its_queue_limit(service_store: ServiceStore, tmp_path: Path) -> None:
    env = server_env(PLAN, ["lin", "ali"])
    with serve(service_store.root, env, tmp_path / "server.log") as server:
        for engine, (path, body) in bodies("lin", "ali", PLAN).items():
            run = asyncio.run(run_engine(server, path, body, body["model"], PLAN))
            summary = run.summary(PLAN)
            assert set(run.statuses) == {"200", "429"}, (engine, summary)
            assert run.admitted >= PLAN.slots and run.rejected >= PLAN.clients, (engine, summary)
            assert run.rejected_without_retry_after == 0, (engine, summary)
            assert run.server_rejected == run.rejected, (engine, summary)
            assert summary["admitted_p99_s"] <= run.bound_s(PLAN), (engine, summary)
            # Flat: what a few seconds of traffic may add once the allocator settled.
            assert run.rss_growth_bytes() <= 32 * MIB, (engine, summary)
