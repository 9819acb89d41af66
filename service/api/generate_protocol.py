"""Wire schemas of ``POST /v1/generate`` (native) and ``POST /v1/completions`` (OpenAI) and the
conversion from each to engine parameters (:class:`SamplingParams`).

The published schema is what validation accepts (service/api/schema_types.py): schema
violations (token counts below 1, ``top_p`` outside (0, 1], ``temperature`` outside [0, 100], a
non-finite number) are 422s raised by pydantic. The deployment limits (new tokens, prompts per
request, n / best_of, logprobs) are settings, checked here (422 ``validation_error``) and
written into the schema by service/api/openapi.py. OpenAI parameters Longhaul does not implement
are published with their neutral value only and refused by name by
:meth:`CompletionRequest.unsupported`.

Logprobs are the model's raw distribution (service/engine/logprobs.py); OpenAI's shape is
``{tokens, token_logprobs, top_logprobs, text_offset}``, where ``top_logprobs[i]`` holds the k
most probable tokens at position i and the token itself when it is not among them (so
``logprobs: 0`` gives each token's own), and the first token of an echoed prompt has ``null``
(nothing precedes it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from service.api.encode_protocol import ModelName
from service.api.errors import ApiError
from service.api.schema_types import (
    INTEGRAL,
    FiniteFloat,
    MaxTokens,
    PositiveInt,
    Seed,
    Temperature,
    TokenId,
    TopK,
    TopP,
)
from service.engine.generation import FinishReason, GenerationChunk, GenerationResult
from service.engine.generation_types import PromptEcho, TokenLogprob
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


def _over_limit(param: str, value: int, limit: int, setting: str) -> ApiError:
    return ApiError(
        422, f"{param}: must be <= {limit} ({setting}), got {value}",
        code="validation_error", param=param,
    )  # fmt: skip


#: How many alternatives per token a request may ask for: a deployment setting, in the schema.
Logprobs = Annotated[
    int, Field(ge=0, description="log-probability of each token and of the k most likely"), INTEGRAL
]


def limit_logprobs(value: int | None, settings: Settings, param: str = "logprobs") -> int | None:
    if value is not None and value > settings.max_logprobs:
        raise _over_limit(param, value, settings.max_logprobs, "LONGHAUL_MAX_LOGPROBS")
    return value


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
    logprobs: Logprobs | None = Field(
        None,
        description="each generated token's log-probability and the k most likely tokens at "
        "its position (raw model distribution); null = none",
    )
    prompt_logprobs: Logprobs | None = Field(
        None,
        description="the same for every prompt token, given the tokens before it (the first "
        "has none: logprob null), as vLLM's prompt_logprobs; every position is scored, so the "
        "prefix cache is not used for the request; null = none",
    )

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
            logprobs=limit_logprobs(self.logprobs, settings),
            prompt_logprobs=limit_logprobs(self.prompt_logprobs, settings, "prompt_logprobs"),
        )


class GenerateUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TopTokenOut(BaseModel):
    id: int
    token: str
    logprob: float


class TokenLogprobOut(BaseModel):
    """One generated token: its id, its own text, its log-probability, where its text starts in
    ``text`` and the k most likely tokens at its position."""

    id: int
    token: str
    logprob: float
    offset: int
    top: list[TopTokenOut]


class PromptTokenLogprobOut(BaseModel):
    """One prompt token: as a generated one, but the first has no log-probability (null), and
    ``offset`` is into the prompt as tokenized and decoded (``prompt_text``)."""

    id: int
    token: str
    logprob: float | None
    offset: int
    top: list[TopTokenOut]


class PromptLogprobsOut(BaseModel):
    prompt_text: str = Field(description="the prompt's token ids decoded: what the offsets index")
    tokens: list[PromptTokenLogprobOut]


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: FinishReason
    usage: GenerateUsage
    logprobs: list[TokenLogprobOut] | None = Field(None, description="with logprobs set")
    prompt_logprobs: PromptLogprobsOut | None = Field(None, description="with prompt_logprobs set")


class GenerateStreamChunk(BaseModel):
    """One SSE event of a streamed /v1/generate; the last one carries finish_reason and usage."""

    model: str
    text: str
    finish_reason: FinishReason | None = None
    usage: GenerateUsage | None = None
    logprobs: list[TokenLogprobOut] | None = None  # this event's tokens, with logprobs set
    prompt_logprobs: PromptLogprobsOut | None = None  # the first event's, with prompt_logprobs


def _top(lp: TokenLogprob) -> list[TopTokenOut]:
    return [TopTokenOut(id=t.token_id, token=t.token, logprob=t.logprob) for t in lp.top]


def _native_logprobs(items: Seq[TokenLogprob]) -> list[TokenLogprobOut]:
    return [
        TokenLogprobOut(id=lp.token_id, token=lp.token, logprob=lp.logprob or 0.0,
                        offset=lp.offset, top=_top(lp))
        for lp in items
    ]  # fmt: skip


def _prompt_logprobs(prompt: PromptEcho | None) -> PromptLogprobsOut | None:
    if prompt is None or prompt.logprobs is None:
        return None
    tokens = [
        PromptTokenLogprobOut(id=lp.token_id, token=lp.token, logprob=lp.logprob,
                              offset=lp.offset, top=_top(lp))
        for lp in prompt.logprobs
    ]  # fmt: skip
    return PromptLogprobsOut(prompt_text=prompt.text, tokens=tokens)


def _excluded(logprobs: bool, prompt_logprobs: bool) -> set[str]:
    """Fields a request did not ask for are left out, not sent as null."""
    asked = {"logprobs": logprobs, "prompt_logprobs": prompt_logprobs}
    return {name for name, wanted in asked.items() if not wanted}


def generate_response(
    model: str, result: GenerationResult, logprobs: bool, prompt_logprobs: bool = False
) -> dict[str, Any]:
    usage = GenerateUsage(
        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
    )
    return GenerateResponse(
        model=model, text=result.text, finish_reason=result.finish_reason, usage=usage,
        logprobs=_native_logprobs(result.logprobs) if logprobs else None,
        prompt_logprobs=_prompt_logprobs(result.prompt) if prompt_logprobs else None,
    ).model_dump(exclude=_excluded(logprobs, prompt_logprobs))  # fmt: skip


def generate_stream_events(
    model: str, chunk: GenerationChunk, logprobs: bool, prompt_logprobs: bool = False
) -> list[dict[str, Any]]:
    """The SSE payloads for one engine chunk: none while text is held back (and, with
    logprobs, no token came), unless final or the first (with prompt_logprobs, it carries
    the prompt's)."""
    scores = _native_logprobs(chunk.logprobs) if logprobs else None
    prompt = _prompt_logprobs(chunk.prompt) if prompt_logprobs else None
    exclude = _excluded(logprobs, prompt is not None)  # the prompt's: in the first event only
    if chunk.finish_reason is None:
        if not chunk.text and not scores and prompt is None:
            return []
        event = GenerateStreamChunk(
            model=model, text=chunk.text, logprobs=scores, prompt_logprobs=prompt
        )
        return [event.model_dump(exclude={"finish_reason", "usage", *exclude})]
    usage = GenerateUsage(
        prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens
    )
    final = GenerateStreamChunk(
        model=model, text=chunk.text, finish_reason=chunk.finish_reason, usage=usage,
        logprobs=scores, prompt_logprobs=prompt,
    )  # fmt: skip
    return [final.model_dump(exclude=exclude)]


# ------------------------------------------------------------------- OpenAI /v1/completions


class StreamOptions(_Strict):
    include_usage: bool = False


TokenIds = Annotated[list[TokenId], Field(min_length=1)]
#: OpenAI's four shapes of ``prompt``. The list lengths' upper bound is a setting
#: (``max_completion_prompts``), checked by :meth:`CompletionRequest.prompts` and published.
CompletionPrompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(_Strict):
    """OpenAI's completions request. Every field the official client can send is declared, so an
    unsupported one is refused by name (400) instead of being silently ignored."""

    model: ModelName
    prompt: CompletionPrompt = Field(
        description="a text, a list of texts, token ids, or a list of token-id lists: one "
        "completion per prompt (x n), choices in prompt order"
    )
    max_tokens: MaxTokens = Field(
        DEFAULT_MAX_TOKENS, description="0 with echo: score the prompt, generate nothing"
    )
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK | None = Field(None, description="vLLM-style extension; not in OpenAI's API")
    n: Annotated[int, Field(ge=1, description="completions per prompt"), INTEGRAL] = 1
    best_of: (
        Annotated[
            int,
            Field(
                ge=1,
                description="generate best_of per prompt and return the n with the highest "
                "cumulative logprob; must be >= n (else 400 invalid_input)",
            ),
            INTEGRAL,
        ]
        | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = Field(
        None,
        description="same seed + same request = same choices: choice i of each prompt draws "
        "from numpy SeedSequence(seed, spawn_key=(i,)) (choice 0 from seed itself)",
    )
    logprobs: Logprobs | None = Field(
        None,
        description="log-probability of each token (raw model distribution) and of the k most "
        "likely at its position; null = none",
    )
    echo: bool = Field(False, description="prepend the prompt to each choice (and its logprobs)")
    # Accepted for compatibility, refused unless left at their neutral value (see unsupported()).
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

    def prompts(self, settings: Settings) -> list[str] | list[list[int]]:
        """The prompts, one per choice group, in order; 422 beyond the batch limit."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        ids = [item for item in value if isinstance(item, int)]
        if ids:
            return [ids]  # one token-id list
        texts = [item for item in value if isinstance(item, str)]
        lists = [item for item in value if isinstance(item, list)]
        if len(value) > settings.max_completion_prompts:
            raise _over_limit(
                "prompt", len(value), settings.max_completion_prompts,
                "LONGHAUL_MAX_COMPLETION_PROMPTS; prompts per request",
            )  # fmt: skip
        return texts or lists

    def choices(self, settings: Settings) -> tuple[int, int]:
        """(n, best_of): returned and generated per prompt."""
        limit = settings.max_completion_choices
        best_of = self.n if self.best_of is None else self.best_of
        for param, value in (("n", self.n), ("best_of", best_of)):
            if value > limit:
                raise _over_limit(param, value, limit, "LONGHAUL_MAX_COMPLETION_CHOICES")
        if best_of < self.n:
            raise ApiError(
                400, f"best_of ({best_of}) must be >= n ({self.n})", code="invalid_input",
                param="best_of",
            )  # fmt: skip
        return self.n, best_of

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def to_sampling_params(self, settings: Settings, ranked: bool) -> SamplingParams:
        """``ranked``: best_of > n, so every choice's cumulative logprob is needed."""
        explicit = "max_tokens" in self.model_fields_set
        logprobs = limit_logprobs(self.logprobs, settings)
        return SamplingParams(
            max_new_tokens=limit_new_tokens(self.max_tokens, explicit, settings, "max_tokens"),
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_strings(),
            logprobs=0 if logprobs is None and ranked else logprobs,
            prompt_logprobs=logprobs if self.echo else None,
            echo=self.echo,
        )


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object, one entry per token of the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


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


@dataclass(frozen=True)
class ChoiceResult:
    """One returned choice: the engine's result and where it goes in ``choices``."""

    index: int
    result: GenerationResult


def openai_logprobs(
    items: Seq[TokenLogprob], base: int = 0, into: CompletionLogprobs | None = None
) -> CompletionLogprobs:
    """OpenAI's shape for ``items``; ``base`` shifts the offsets (the echoed prompt's length)."""
    out = into or CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for lp in items:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        if lp.logprob is None:
            out.top_logprobs.append(None)
        else:
            top = {t.token: t.logprob for t in lp.top}
            top.setdefault(lp.token, lp.logprob)
            out.top_logprobs.append(top)
        out.text_offset.append(base + lp.offset)
    return out


def _echo_prefix(prompt: PromptEcho | None) -> str:
    return "" if prompt is None else prompt.text


class CompletionIdentity:
    """``id`` and ``created`` shared by every chunk of one completion, as OpenAI sends them;
    what the request asked for that shapes each choice (echo, logprobs)."""

    def __init__(self, model: str, echo: bool = False, logprobs: bool = False) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.echo = echo
        self.logprobs = logprobs
        self._bases: dict[int, int] = {}  # choice index -> length of its echoed prompt

    def choice(self, index: int, result: GenerationResult) -> CompletionChoice:
        prefix = _echo_prefix(result.prompt) if self.echo else ""
        logprobs = None
        if self.logprobs:
            logprobs = CompletionLogprobs(
                tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]
            )
            if self.echo and result.prompt is not None and result.prompt.logprobs is not None:
                openai_logprobs(result.prompt.logprobs, 0, logprobs)
            openai_logprobs(result.logprobs, len(prefix), logprobs)
        return CompletionChoice(
            index=index, text=prefix + result.text, finish_reason=result.finish_reason,
            logprobs=logprobs,
        )  # fmt: skip

    def response(
        self, choices: Seq[ChoiceResult], prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model,
            choices=[self.choice(c.index, c.result) for c in choices],
            usage=completion_usage(prompt_tokens, completion_tokens),
        ).model_dump()  # fmt: skip

    def stream_events(self, index: int, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """SSE payloads for one engine chunk of choice ``index``, in OpenAI's streaming shape;
        with echo, the choice's first chunk starts with the prompt (and its logprobs)."""
        prompt = chunk.prompt if self.echo else None
        if prompt is not None:
            self._bases[index] = len(prompt.text)
        base = self._bases.get(index, 0)  # text_offset counts the echoed prompt
        logprobs = None
        if self.logprobs:
            logprobs = CompletionLogprobs(
                tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]
            )
            if prompt is not None and prompt.logprobs is not None:
                openai_logprobs(prompt.logprobs, 0, logprobs)
            openai_logprobs(chunk.logprobs, base, logprobs)
        text = _echo_prefix(prompt) + chunk.text
        if not text and chunk.finish_reason is None and not (logprobs and logprobs.tokens):
            return []
        choice = CompletionChoice(
            index=index, text=text, finish_reason=chunk.finish_reason, logprobs=logprobs
        )
        return [self._chunk([choice], None)]

    def chunk_of(self, choice: CompletionChoice) -> dict[str, Any]:
        """A streamed chunk holding one whole choice (best_of > n streams its winners so)."""
        return self._chunk([choice], None)

    def usage_event(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """OpenAI's stream_options.include_usage: one last chunk, no choices, the usage."""
        return self._chunk([], completion_usage(prompt_tokens, completion_tokens))

    def _chunk(
        self, choices: list[CompletionChoice], usage: CompletionUsage | None
    ) -> dict[str, Any]:
        # Content chunks leave "usage" out entirely (OpenAI sends it only on the usage chunk);
        # null finish_reason and logprobs stay, as in OpenAI's chunks.
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        ).model_dump(exclude={"usage"} if usage is None else None)
