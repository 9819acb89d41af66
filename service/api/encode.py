"""``POST /v1/encode``: thin router; the work is in service/engine (batcher, encoding)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import ApiKey, AppMetrics, Registry, record_outcome
from service.api.encode_protocol import EncodeRequest, EncodeResponse, to_response
from service.api.errors import ERROR_RESPONSES
from service.engine.encoding import EncodeOutput, EncodeParams
from service.engine.errors import EngineError
from service.engine.registry import ModelRegistry
from service.metrics import Metrics

router = APIRouter(prefix="/v1", tags=["encode"], dependencies=[ApiKey])


async def encode_with(
    registry: ModelRegistry, request: Request, name: str, inputs: list[str] | list[list[int]],
    params: EncodeParams, metrics: Metrics,
) -> EncodeOutput:  # fmt: skip
    """Shared by /v1/encode and /v1/embeddings: lease the model, check its task, encode.
    Leaves the access log's figures in ``request.state`` and keeps the model's health."""
    request.state.model = name
    async with registry.lease(name) as served:
        encoder = served.encoder()
        try:
            output = await encoder.encode(inputs, params)
        except EngineError:
            raise  # the request's own fault (too long, bad token id, queue full), not the model's
        except Exception as exc:
            record_outcome(metrics, served, exc)
            raise
        record_outcome(metrics, served, None)
    request.state.prompt_tokens = output.prompt_tokens
    request.state.queue_seconds = output.queue_seconds
    return output


@router.post("/encode", response_model=EncodeResponse, responses=ERROR_RESPONSES)
async def encode(
    body: EncodeRequest, request: Request, registry: Registry, metrics: AppMetrics
) -> JSONResponse:
    """Embeddings with Longhaul's options: pooling, normalisation, truncation or chunking."""
    output = await encode_with(
        registry, request, body.model, body.texts(), body.to_params(), metrics
    )
    return JSONResponse(to_response(body.model, output))
