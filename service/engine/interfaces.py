"""What the registry and the api need from an engine, whatever class implements it.

Every engine has a lifecycle (:class:`Engine`); an ``encode`` model's engine also encodes
(:class:`EncodeEngine`, implemented by the batcher) and a ``generate`` model's engine generates
(:class:`GenerateEngine`, implemented by the generation engine). The api reaches them through
``ServedModel.encoder()`` / ``ServedModel.generator()``, which refuse the wrong task.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol, runtime_checkable

from service.engine.encoding import EncodeOutput, EncodeParams
from service.engine.generation_stream import GenerationStream
from service.engine.sampling import SamplingParams


class Engine(Protocol):
    async def start(self) -> None: ...
    async def warmup(self) -> None: ...
    async def stop(self) -> None:
        """Finish what was accepted (up to the drain timeout), then refuse everything."""
        ...


@runtime_checkable
class EncodeEngine(Engine, Protocol):
    async def encode(
        self, inputs: list[str] | list[list[int]], params: EncodeParams
    ) -> EncodeOutput: ...


@runtime_checkable
class GenerateEngine(Engine, Protocol):
    async def submit(self, prompt: str | list[int], params: SamplingParams) -> GenerationStream:
        """Check and queue one request; its tokens arrive on the returned stream."""
        ...

    async def submit_many(
        self, prompts: Seq[str | list[int]], params: SamplingParams, choices: int = 1
    ) -> list[list[GenerationStream]]:
        """Queue several prompts, ``choices`` continuations each, all or none; the streams of
        each prompt in order."""
        ...

    def cancel(self, stream_id: int) -> None:
        """End the request of ``GenerationStream.id``; its slot is freed within one step."""
        ...
