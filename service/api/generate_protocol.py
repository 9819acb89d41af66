"""Wire schemas of ``POST /v1/generate`` (native) and ``POST /v1/completions`` (OpenAI) and the
conversion from each to engine parameters (:class:`SamplingParams`).

The published schema is what validation accepts (service/api/schema_types.py): schema
violations (token counts below 1, ``top_p`` outside (0, 1], ``temperature`` outside [0, 100], a
non-finite number) are 422s raised by pydantic. The deployment limit on new tokens
(``max_new_tokens_limit``) is checked by :func:`limit_new_tokens` and written into the
schema by service/api/openapi.py. OpenAI parameters Longhaul does not implement are published
with their neutral value only and refused by name by :meth:`CompletionRequest.unsupported`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from service.api.encode_protocol import ModelName
from service.api.errors import ApiError
from service.api.schema_types import (
    INTEGRAL,
    FiniteFloat,
    PositiveInt,
    Seed,
    Temperature,
    TokenId,
    TopK,
    TopP,
)
from service.engine.generation import FinishReason, GenerationChunk, GenerationResult
from service.engine.sampling import SamplingParams
from service.settings import Settings

#: OpenAI allows 4 stop sequences; a few more cost nothing here, hundreds would on every token.
MAX_STOP_STRINGS = 16
#: Mirrors OpenAI's default ``max_tokens`` for completions (and vLLM's), so clients that omit it
#: get the behaviour they expect. The native route uses the same default.
DEFAULT_MAX_TOKENS = 16

StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


def _refused(schema: dict[str, Any], neutral: str) -> WithJsonSchema:
    """The published schema of an OpenAI parameter Longhaul does not implement: only its neutral
    value. Validation still parses any value of the OpenAI type, so that
    :meth:`CompletionRequest.unsupported` can refuse it by name (400 ``unsupported_parameter``)
    instead of a generic 422."""
    description = (
        f"not supported: only {neutral} is accepted; any other value is refused with "
        "400 unsupported_parameter"
    )
    return WithJsonSchema({**schema, "description": description})


class _Strict(BaseModel):
    # Same policy as the encode schemas: misspelt fields are errors, "1" is not a number.
    model_config = ConfigDict(extra="forbid", strict=True)


def limit_new_tokens(value: int, explicit: bool, settings: Settings, param: str) -> int:
    """The new-token count to use: 422 above ``settings.max_new_tokens_limit`` (a deployment
    limit, published in the schema by service/api/openapi.py) when the client asked for it;
    the default, when the client left the field out, is capped at the limit instead."""
    limit = settings.max_new_tokens_limit
    if not explicit:
        return min(value, limit)
    if value > limit:
        raise ApiError(
            422, f"{param}: must be <= {limit} (LONGHAUL_MAX_NEW_TOKENS_LIMIT), got {value}",
            code="validation_error", param=param,
        )  # fmt: skip
    return value


# ------------------------------------------------------------------- native /v1/generate


class GenerateRequest(_Strict):
    model: ModelName
    prompt: str = Field(description="text to continue; empty = start of a new document")
    max_new_tokens: PositiveInt = Field(DEFAULT_MAX_TOKENS, description="upper bound on new tokens")
    temperature: Temperature = 1.0
    top_k: TopK | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list, description="end before any of these strings")
    stream: bool = Field(False, description="Server-Sent Events, one per token chunk, then [DONE]")

    def to_sampling_params(self, settings: Settings) -> SamplingParams:
        explicit = "max_new_tokens" in self.model_fields_set
        return SamplingParams(
            max_new_tokens=limit_new_tokens(
                self.max_new_tokens, explicit, settings, "max_new_tokens"
            ),
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
        )


class GenerateUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: FinishReason
    usage: GenerateUsage


class GenerateStreamChunk(BaseModel):
    """One SSE event of a streamed /v1/generate; the last one carries finish_reason and usage."""

    model: str
    text: str
    finish_reason: FinishReason | None = None
    usage: GenerateUsage | None = None


def generate_response(model: str, result: GenerationResult) -> dict[str, Any]:
    usage = GenerateUsage(
        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
    )
    return GenerateResponse(
        model=model, text=result.text, finish_reason=result.finish_reason, usage=usage
    ).model_dump()


def generate_stream_events(model: str, chunk: GenerationChunk) -> list[dict[str, Any]]:
    """The SSE payloads for one engine chunk: none while text is held back, unless final."""
    if chunk.finish_reason is None:
        return [{"model": model, "text": chunk.text}] if chunk.text else []
    usage = GenerateUsage(
        prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens
    )
    final = GenerateStreamChunk(
        model=model, text=chunk.text, finish_reason=chunk.finish_reason, usage=usage
    )
    return [final.model_dump()]


# ------------------------------------------------------------------- OpenAI /v1/completions


class StreamOptions(_Strict):
    include_usage: bool = False


class CompletionRequest(_Strict):
    """OpenAI's completions request. Every field the official client can send is declared, so an
    unsupported one is refused by name (400) instead of being silently ignored."""

    model: ModelName
    prompt: str | list[TokenId] = Field(description="text, or token ids")
    max_tokens: PositiveInt = DEFAULT_MAX_TOKENS
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK | None = Field(None, description="vLLM-style extension; not in OpenAI's API")
    n: Annotated[int, INTEGRAL, _refused({"type": "integer", "const": 1}, "1")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = None
    # Accepted for compatibility, refused unless left at their neutral value (see unsupported()).
    logprobs: Annotated[int | None, INTEGRAL, _refused({"type": "null"}, "null")] = None
    echo: Annotated[bool, _refused({"type": "boolean", "const": False}, "false")] = False
    best_of: Annotated[
        int | None,
        INTEGRAL,
        _refused({"anyOf": [{"type": "integer", "const": 1}, {"type": "null"}]}, "1 or null"),
    ] = None
    suffix: Annotated[str | None, _refused({"type": "null"}, "null")] = None
    presence_penalty: Annotated[FiniteFloat, _refused({"type": "number", "const": 0}, "0")] = 0.0
    frequency_penalty: Annotated[FiniteFloat, _refused({"type": "number", "const": 0}, "0")] = 0.0
    logit_bias: Annotated[
        dict[str, FiniteFloat] | None,
        _refused(
            {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]}, "null or {}"
        ),
    ] = None
    user: str | None = None  # accepted and ignored, as OpenAI documents it (abuse monitoring)

    def unsupported(self) -> ApiError | None:
        """A 400 naming the first parameter set to something Longhaul cannot do, if any."""
        refusals: list[tuple[bool, str, str]] = [
            (self.n != 1, "n", f"n={self.n}: only n=1 is supported; send separate requests"),
            (
                self.best_of not in (None, 1),
                "best_of",
                f"best_of={self.best_of}: only best_of=1 is supported",
            ),
            (self.logprobs is not None, "logprobs", "logprobs are not supported"),
            (self.echo, "echo", "echo is not supported"),
            (self.suffix is not None, "suffix", "suffix (insertion) is not supported"),
            (bool(self.presence_penalty), "presence_penalty", "presence_penalty is not supported"),
            (
                bool(self.frequency_penalty),
                "frequency_penalty",
                "frequency_penalty is not supported",
            ),
            (bool(self.logit_bias), "logit_bias", "logit_bias is not supported"),
        ]
        for refused, param, message in refusals:
            if refused:
                return ApiError(400, message, code="unsupported_parameter", param=param)
        return None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def to_sampling_params(self, settings: Settings) -> SamplingParams:
        explicit = "max_tokens" in self.model_fields_set
        return SamplingParams(
            max_new_tokens=limit_new_tokens(self.max_tokens, explicit, settings, "max_tokens"),
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_strings(),
        )


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


def completion_usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class CompletionIdentity:
    """``id`` and ``created`` shared by every chunk of one completion, as OpenAI sends them."""

    def __init__(self, model: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def response(self, result: GenerationResult) -> dict[str, Any]:
        choice = CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason)
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice],
            usage=completion_usage(result.prompt_tokens, result.completion_tokens),
        ).model_dump()  # fmt: skip

    def stream_events(self, chunk: GenerationChunk, include_usage: bool) -> list[dict[str, Any]]:
        """SSE payloads for one engine chunk, in OpenAI's streaming shape."""
        events: list[dict[str, Any]] = []
        if chunk.text or chunk.finish_reason is not None:
            choice = CompletionChoice(index=0, text=chunk.text, finish_reason=chunk.finish_reason)
            events.append(self._chunk([choice], None))
        if chunk.finish_reason is not None and include_usage:
            # OpenAI's stream_options.include_usage: one last chunk, no choices, the usage.
            events.append(
                self._chunk([], completion_usage(chunk.prompt_tokens, chunk.completion_tokens))
            )
        return events

    def _chunk(
        self, choices: list[CompletionChoice], usage: CompletionUsage | None
    ) -> dict[str, Any]:
        # Content chunks leave "usage" out entirely (OpenAI sends it only on the usage chunk);
        # null finish_reason and logprobs stay, as in OpenAI's chunks.
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        ).model_dump(exclude={"usage"} if usage is None else None)
