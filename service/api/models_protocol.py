"""Wire schemas of ``GET /v1/models`` (OpenAI list shape + Longhaul fields) and the admin routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schema_types import PositiveInt
from service.engine.registry import ServedModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="export time of the served version, Unix seconds")
    owned_by: str = "longhaul"
    # Longhaul fields (OpenAI clients ignore them).
    version: int
    task: str
    architecture: str
    format: str
    precision: str
    max_context: int
    trained_context: int
    provider: str = Field(description="where it runs: an ORT execution provider, torch-cuda/cpu")
    fallback: str | None = Field(
        default=None,
        description="why it runs on `provider` and not on the first one the settings prefer",
    )
    threads: int | None = Field(
        None, description="intra-op threads of this model (its share of the thread budget)"
    )
    batching: dict[str, Any] | None = Field(
        None,
        description="encode models: the batch time model calibrated at warm-up (source "
        "measured or architecture, coefficients in seconds, the timed shapes, fit error)",
    )
    status: Literal["healthy", "unhealthy"] = Field(
        description="unhealthy once the model's recent requests all failed inside it"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: PositiveInt | None = Field(None, description="default: the newest")


class UnloadResponse(BaseModel):
    id: str
    version: int
    object: Literal["model"] = "model"
    unloaded: bool = True


def card(served: ServedModel) -> ModelCard:
    manifest = served.loaded.manifest
    return ModelCard(
        id=served.name,
        created=int(manifest.provenance.created_at.timestamp()),
        version=served.version,
        task=manifest.task,
        architecture=manifest.architecture,
        format=manifest.format,
        precision=manifest.precision,
        max_context=manifest.max_context,
        trained_context=manifest.trained_context,
        provider=served.loaded.backend.provider,
        threads=served.loaded.threads,
        batching=batching(served),
        fallback=served.loaded.backend.fallback,
        status="healthy" if served.healthy else "unhealthy",
    )


def batching(served: ServedModel) -> dict[str, Any] | None:
    time_model = getattr(served.engine, "time_model", None)  # only the encode batcher has one
    if time_model is None:
        return None
    info: dict[str, Any] = time_model.describe()
    return info
