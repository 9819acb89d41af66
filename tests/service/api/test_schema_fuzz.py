"""``schemathesis run`` against the published ``/openapi.json`` of a real server: validation is
the schema.

Every operation is fuzzed (coverage phase: boundary and type-mutation cases of every field;
fuzzing phase: Hypothesis, deterministic, a bounded number of examples) with valid and invalid
requests, under every check schemathesis has: no 5xx, statuses, content types, headers and bodies
as documented, schema-invalid requests refused, unsupported methods answered 405 with ``Allow``.
Schema-valid requests must be accepted, except where the served model itself refuses them
(schemathesis_hooks.py, ``MODEL_DEPENDENT_CODES``).

The ``model`` field of each body is narrowed to the served models of the route's task and the
``name`` of ``GET /v1/models/{name}`` and of admin ``load`` to served names, so the fuzzed requests
reach the engines and the reload path instead of stopping at 404. The admin key goes with every
request, so the admin routes are fuzzed past authentication. ``unload`` is left out: schemathesis
reuses names it saw in responses, and unloading the served models would leave the rest of the
run nothing to reach (test_models.py covers it).

The CLI runs in a subprocess (schemathesis' pytest integration does not support the pinned
pytest); the server runs in this process, on loopback.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import LiveServer, ServiceStore, make_settings, start_live_server

ADMIN_KEY = "fuzz-admin-key"
#: Small, so each generated completion is short; the published schema carries the same bound.
MAX_NEW_TOKENS = 8
MAX_EXAMPLES = 25
#: Body component -> the served models of the task its route serves.
MODEL_CHOICES = {
    "EncodeRequest": ["lin", "sha"],
    "EmbeddingRequest": ["lin", "sha"],
    "GenerateRequest": ["ali"],
    "CompletionRequest": ["ali"],
}
#: (path, method) -> served names for its ``name`` path parameter.
NAME_CHOICES = {("/v1/models/{name}", "get"): ["ali", "lin", "sha"],
                ("/v1/models/{name}/load", "post"): ["lin"]}  # fmt: skip
ENGINE_ROUTES = ("/v1/encode", "/v1/embeddings", "/v1/generate", "/v1/completions")

#: About 750 requests: two minutes on a busy 2-core machine.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server(service_store: ServiceStore) -> Iterator[LiveServer]:
    server = start_live_server(
        make_settings(
            service_store.root, models=[], admin_keys=[ADMIN_KEY],
            max_new_tokens_limit=MAX_NEW_TOKENS,
        )
    )  # fmt: skip
    yield server
    server.stop()


def narrowed_openapi(url: str) -> dict[str, Any]:
    """The server's own document, with model names narrowed to served ones (see the docstring)."""
    raw: dict[str, Any] = httpx.get(f"{url}/openapi.json").json()
    patched = copy.deepcopy(raw)
    components = patched["components"]["schemas"]
    for component, names in MODEL_CHOICES.items():
        components[component]["properties"]["model"]["enum"] = names
    # Deadlines are test_deadlines.py's: a fuzzed X-Request-Timeout of 5e-324 s ends most valid
    # requests in a 504 before they reach an engine (and narrowing its range would make the
    # fuzz expect refusals of values the server rightly accepts), so the fuzz leaves it out.
    for item in patched["paths"].values():
        for operation in item.values():
            operation["parameters"] = [
                p for p in operation.get("parameters", []) if p["name"] != "x-request-timeout"
            ]
    for (path, method), names in NAME_CHOICES.items():
        for parameter in patched["paths"][path][method]["parameters"]:
            if parameter["name"] == "name":
                parameter["schema"]["enum"] = names
    return patched


@pytest.fixture(scope="module")
def fuzz_run(fuzz_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the CLI once; returns its JSON report plus ``calls``: (method path, status, mode)."""
    work = tmp_path_factory.mktemp("fuzz")
    schema_path = work / "openapi.json"
    schema_path.write_text(json.dumps(narrowed_openapi(fuzz_server.url)))
    calls_log = work / "calls.log"
    cli = Path(sys.executable).with_name("schemathesis")
    command = [
        str(cli), "run", str(schema_path), "--url", fuzz_server.url,
        "-H", f"Authorization: Bearer {ADMIN_KEY}",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--exclude-path", "/v1/models/{name}/unload",
        "--phases", "examples,coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES),
        "--generation-deterministic",  # also: no example database
        "--workers", "1", "--request-timeout", "60", "--no-color",
        "--report", "json", "--report-dir", str(work / "report"),
        "--report-json-path", str(work / "report.json"),
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.api.schemathesis_hooks",
           "PYTHONPATH": str(root), "LONGHAUL_FUZZ_LOG": str(calls_log)}  # fmt: skip
    # cwd: schemathesis keeps a cache directory in its working directory.
    done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, timeout=540)
    output = done.stdout[-6000:] + done.stderr[-2000:]
    assert (work / "report.json").exists(), output
    report: dict[str, Any] = json.loads((work / "report.json").read_text())
    report["output"] = output
    report["calls"] = [tuple(line.rsplit(" ", 2)) for line in calls_log.read_text().splitlines()]
    return report


def test_fuzzed_requests_follow_the_schema(fuzz_run: dict[str, Any]) -> None:
    output = fuzz_run["output"]
    assert fuzz_run["complete"] and fuzz_run["operations"]["errored"] == 0, output
    assert fuzz_run["failures"] == [] and fuzz_run["errors"] == [], output
    assert fuzz_run["test_cases"]["with_failures"] == 0, output
    assert fuzz_run["exit_code"] == 0, output
    assert not any(status.startswith("5") for _, status, _ in fuzz_run["calls"])


def test_fuzzing_reached_every_engine(fuzz_run: dict[str, Any]) -> None:
    statuses = Counter((route, status) for route, status, _ in fuzz_run["calls"])
    for route in ENGINE_ROUTES:
        assert statuses[(f"POST {route}", "200")] >= 5, statuses
        # Invalid requests were sent too, and refused with a 4xx.
        assert sum(n for (r, s), n in statuses.items() if r == f"POST {route}" and s[0] == "4")
    assert statuses[("POST /v1/models/{name}/load", "200")] >= 1, statuses  # a real reload
    assert len(fuzz_run["calls"]) >= 300, len(fuzz_run["calls"])
    modes = Counter(mode for _, _, mode in fuzz_run["calls"])
    # Shown with `pytest -s`: the figures of this run.
    sys.stderr.write(
        f"\nschema fuzz: {len(fuzz_run['calls'])} requests ({dict(modes)}), "
        f"{fuzz_run['test_cases']['generated']} generated cases, "
        f"{fuzz_run['running_time']:.0f} s; by route and status: {dict(sorted(statuses.items()))}\n"
    )
