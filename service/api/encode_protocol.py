"""Wire schemas of ``POST /v1/encode`` (Longhaul's native encode route) and the conversion to
engine parameters."""

from __future__ import annotations

from typing import Annotated, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.json_schema import JsonDict

from service.engine.encoding import EncodeOutput, EncodeParams

#: Same cap as OpenAI's embeddings endpoint: one request, at most this many inputs.
MAX_INPUTS = 2048

Text = Annotated[str, StringConstraints(min_length=1)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Strict(BaseModel):
    # strict: "true" is not a bool and 1 is not a string; extra: a misspelt field is an error, not
    # silently ignored (e.g. "poolng": "cls" would otherwise return mean-pooled vectors).
    model_config = ConfigDict(extra="forbid", strict=True)


#: The combinations :meth:`EncodeRequest._compatible` refuses, stated in the published schema too.
_INCOMPATIBLE: JsonDict = {
    "allOf": [
        {
            "not": {
                "required": ["truncate", "chunk"],
                "properties": {"truncate": {"const": True}, "chunk": {"const": True}},
            }
        },
        {
            "not": {
                "required": ["chunk", "pooling"],
                "properties": {"chunk": {"const": True}, "pooling": {"const": "none"}},
            }
        },
    ]
}


class EncodeRequest(_Strict):
    model_config = ConfigDict(json_schema_extra=_INCOMPATIBLE)

    model: ModelName
    inputs: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] = Field(
        description="one text or a list of texts"
    )
    pooling: Literal["mean", "cls", "none"] = Field(
        "mean", description="mean over real tokens, the <cls> position, or per-token vectors"
    )
    normalize: bool = Field(True, description="L2-normalise each vector")
    truncate: bool = Field(False, description="drop tokens beyond max_context instead of failing")
    chunk: bool = Field(
        False, description="encode long inputs as overlapping max_context windows, then average"
    )

    @model_validator(mode="after")
    def _compatible(self) -> Self:
        if self.truncate and self.chunk:
            raise ValueError("truncate and chunk are mutually exclusive: choose one")
        if self.chunk and self.pooling == "none":
            raise ValueError("chunk needs pooling 'mean' or 'cls'")
        return self

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)

    def to_params(self) -> EncodeParams:
        return EncodeParams(
            pooling=self.pooling,
            normalize=self.normalize,
            truncate=self.truncate,
            chunk=self.chunk,
            param="inputs",
        )


class EncodeUsage(BaseModel):
    prompt_tokens: int = Field(description="tokens encoded (after truncation)")
    truncated_tokens: int = Field(description="tokens dropped by truncate")
    chunks: int = Field(description="sequences run through the model (windows when chunking)")


class EncodeResponse(BaseModel):
    model: str
    embeddings: list[list[float]] | list[list[list[float]]] = Field(
        description="one vector per input, or one matrix (tokens × dim) per input for pooling none"
    )
    usage: EncodeUsage


def to_response(model: str, output: EncodeOutput) -> dict[str, object]:
    """Plain dict (not a validated model): re-validating thousands of floats costs more than
    the JSON encoding itself, and the shape is produced right here."""
    return {
        "model": model,
        "embeddings": [np.asarray(e, dtype=np.float32).tolist() for e in output.embeddings],
        "usage": {
            "prompt_tokens": output.prompt_tokens,
            "truncated_tokens": output.truncated_tokens,
            "chunks": output.chunks,
        },
    }
