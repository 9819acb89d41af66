"""Wire schemas of OpenAI-compatible ``POST /v1/embeddings`` and the conversion to engine params."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.api.encode_protocol import MAX_INPUTS, ModelName, Text
from service.api.schema_types import PositiveInt, TokenId
from service.engine.encoding import EncodeOutput, EncodeParams

TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelName
    input: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]
    ) = Field(description="text, list of texts, token ids, or list of token-id lists")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = Field(
        None, description="accepted only when equal to the model's width (no truncation of vectors)"
    )
    user: Annotated[str, StringConstraints(max_length=256)] | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        value = self.input
        if isinstance(value, str):
            return [value]
        texts = [item for item in value if isinstance(item, str)]
        if texts:
            return texts
        ids = [item for item in value if isinstance(item, int)]
        if ids:
            return [ids]  # one token-id list
        return [item for item in value if isinstance(item, list)]

    def to_params(self) -> EncodeParams:
        # OpenAI embeddings: one normalised vector per input, long inputs are an error.
        return EncodeParams(pooling="mean", normalize=True, param="input")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def _encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    as_f32 = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(as_f32.tobytes()).decode("ascii")
    result: list[float] = as_f32.tolist()
    return result


def to_response(model: str, output: EncodeOutput, encoding_format: str) -> dict[str, object]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode_vector(v, encoding_format)}
            for i, v in enumerate(output.embeddings)
        ],
        "model": model,
        "usage": {"prompt_tokens": output.prompt_tokens, "total_tokens": output.prompt_tokens},
    }
