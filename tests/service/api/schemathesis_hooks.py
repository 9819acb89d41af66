"""Schemathesis hooks for test_schema_fuzz.py, loaded by ``schemathesis run`` through
``SCHEMATHESIS_HOOKS`` (module path) in a subprocess.

* :func:`valid_data_accepted_unless_the_model_refuses` replaces the built-in
  ``positive_data_acceptance``: what a schema cannot state is the served model itself (its
  vocabulary, its context length, its embedding width), so a schema-valid request over those
  limits is refused by the model with 400 and one of :data:`MODEL_DEPENDENT_CODES`. Every other
  refusal of valid data still fails the run.
* :func:`after_call` appends ``METHOD PATH STATUS MODE`` per response to the file named by
  ``LONGHAUL_FUZZ_LOG``, so the test can count what was sent and what came back.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

MODEL_DEPENDENT_CODES = frozenset(
    {
        "context_length_exceeded",  # prompt (+ new tokens) longer than the model's max_context
        # A token id outside the model's vocabulary; more than its KV budget (or n choices that
        # do not fit it together); and best_of < n, the one cross-field rule of /v1/completions.
        "invalid_input",
        "invalid_dimensions",  # embeddings `dimensions` other than the model's width
    }
)


def _error_code(response: schemathesis.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


@schemathesis.check
def valid_data_accepted_unless_the_model_refuses(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    if response.status_code == 400 and _error_code(response) in MODEL_DEPENDENT_CODES:
        return True
    result: bool | None = positive_data_acceptance(ctx, response, case)
    return result


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: Any) -> None:
    path = os.environ.get("LONGHAUL_FUZZ_LOG")
    if not path:
        return
    mode = case.meta.generation.mode.value if case.meta is not None else "explicit"
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"{case.method.upper()} {case.path} {response.status_code} {mode}\n")
