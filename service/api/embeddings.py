"""OpenAI-compatible ``POST /v1/embeddings`` (the official ``openai`` client works unchanged)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import ApiKey, AppMetrics, Registry
from service.api.embeddings_protocol import EmbeddingRequest, EmbeddingResponse, to_response
from service.api.encode import encode_with
from service.api.errors import ERROR_RESPONSES, ApiError

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKey])


@router.post("/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def embeddings(
    body: EmbeddingRequest, request: Request, registry: Registry, metrics: AppMetrics
) -> JSONResponse:
    if body.dimensions is not None:
        # None: a graph without embeddings (a decoder); encode_with answers wrong_task.
        width = registry.get(body.model).loaded.hidden_size
        if width is not None and body.dimensions != width:
            raise ApiError(
                400, f"model {body.model!r} produces {width}-dimensional embeddings; "
                f"dimensions={body.dimensions} is not supported", code="invalid_dimensions",
                param="dimensions",
            )  # fmt: skip
    output = await encode_with(
        registry, request, body.model, body.inputs(), body.to_params(), metrics
    )
    return JSONResponse(to_response(body.model, output, body.encoding_format))
