"""``POST /v1/encode``: thin router; the work is in service/engine (batcher, encoding)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import ApiKey, Registry
from service.api.encode_protocol import EncodeRequest, EncodeResponse, to_response
from service.api.errors import ERROR_RESPONSES
from service.engine.encoding import EncodeOutput, EncodeParams
from service.engine.registry import ModelRegistry

router = APIRouter(prefix="/v1", tags=["encode"], dependencies=[ApiKey])


async def encode_with(
    registry: ModelRegistry, request: Request, name: str, inputs: list[str] | list[list[int]],
    params: EncodeParams,
) -> EncodeOutput:  # fmt: skip
    """Shared by /v1/encode and /v1/embeddings: lease the model, check its task, encode."""
    request.state.model = name
    async with registry.lease(name) as served:
        return await served.encoder().encode(inputs, params)


@router.post("/encode", response_model=EncodeResponse, responses=ERROR_RESPONSES)
async def encode(body: EncodeRequest, request: Request, registry: Registry) -> JSONResponse:
    """Embeddings with Longhaul's options: pooling, normalisation, truncation or chunking."""
    output = await encode_with(registry, request, body.model, body.texts(), body.to_params())
    return JSONResponse(to_response(body.model, output))
