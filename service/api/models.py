"""``GET /v1/models`` (OpenAI-compatible) and admin ``POST /v1/models/{name}/load|unload``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import AdminKey, ApiKey, Registry
from service.api.errors import ADMIN_ERROR_RESPONSES, ERROR_RESPONSES
from service.api.models_protocol import LoadRequest, ModelCard, ModelList, UnloadResponse, card

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[ApiKey])
admin_router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[AdminKey])


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(registry: Registry) -> ModelList:
    return ModelList(data=[card(served) for served in registry.models()])


@router.get("/models/{name}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(name: str, request: Request, registry: Registry) -> ModelCard:
    served = registry.get(name)
    request.state.model = name
    return card(served)


@admin_router.post("/models/{name}/load", response_model=ModelCard, responses=ADMIN_ERROR_RESPONSES)
async def load_model(
    name: str, request: Request, registry: Registry, body: LoadRequest | None = None
) -> ModelCard:
    """Verify -> load -> warm up -> swap. On failure the previous version keeps serving (409)."""
    served = await registry.load(name, body.version if body else None)
    request.state.model = name
    return card(served)


@admin_router.post(
    "/models/{name}/unload", response_model=UnloadResponse, responses=ADMIN_ERROR_RESPONSES
)
async def unload_model(name: str, request: Request, registry: Registry) -> UnloadResponse:
    """Stop serving; requests already accepted finish first."""
    served = await registry.unload(name)
    request.state.model = name
    return UnloadResponse(id=name, version=served.version)
