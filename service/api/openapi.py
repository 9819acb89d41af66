"""The published OpenAPI document, completed with what depends on the settings.

The wire schemas are static classes, but some limits are deployment settings. Validation reads
them from ``settings``; this writes the same numbers into ``/openapi.json`` so that the schema
still states exactly what the server accepts.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.settings import Settings

#: (schema component, property) -> the setting that bounds it from above.
_NEW_TOKEN_FIELDS = (("GenerateRequest", "max_new_tokens"), ("CompletionRequest", "max_tokens"))


def install(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            components = schema.get("components", {}).get("schemas", {})
            for component, prop in _NEW_TOKEN_FIELDS:
                field = components.get(component, {}).get("properties", {}).get(prop)
                if field is not None:
                    field["maximum"] = settings.max_new_tokens_limit
                    # Left out, the default is capped at the limit (limit_new_tokens).
                    field["default"] = min(field.get("default", 1), settings.max_new_tokens_limit)
                    field["description"] = (
                        f"upper bound on new tokens; at most {settings.max_new_tokens_limit} "
                        "(LONGHAUL_MAX_NEW_TOKENS_LIMIT)"
                    )
            _publish_limits(components, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _branches(field: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The parts of a property schema of JSON type ``kind`` (itself, or its anyOf branches)."""
    options = field.get("anyOf", [field])
    return [option for option in options if option.get("type") == kind]


def _publish_limits(components: dict[str, Any], settings: Settings) -> None:
    """The settings that bound logprobs, n / best_of and the number of prompts."""
    maxima = [
        ("GenerateRequest", "logprobs", settings.max_logprobs),
        ("GenerateRequest", "prompt_logprobs", settings.max_logprobs),
        ("CompletionRequest", "logprobs", settings.max_logprobs),
        ("CompletionRequest", "n", settings.max_completion_choices),
        ("CompletionRequest", "best_of", settings.max_completion_choices),
    ]
    for component, prop, limit in maxima:
        field = components.get(component, {}).get("properties", {}).get(prop)
        for branch in _branches(field or {}, "integer"):
            branch["maximum"] = limit
    prompt = components.get("CompletionRequest", {}).get("properties", {}).get("prompt")
    for branch in _branches(prompt or {}, "array"):
        # A list of texts or of token-id lists is a batch; a flat list of ids is one prompt,
        # bounded by the model's context instead.
        if branch.get("items", {}).get("type") in ("string", "array"):
            branch["maxItems"] = settings.max_completion_prompts
