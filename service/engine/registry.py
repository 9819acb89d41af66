"""What is served right now: model name -> (loaded version, engine), on ``app.state.registry``.

Routers call :meth:`ModelRegistry.get` (or ``async with registry.lease(name)``) per request.
Loading a version is verify -> load -> start engine -> warm up -> atomic swap: the swap is a
single dict assignment on the event loop, so every request sees either the old version or the new
one. The old version is retired in the background: it waits for requests that leased it to
finish (up to ``settings.drain_timeout_seconds``), then ``engine.stop()`` finishes whatever is
already queued, then the backend is closed. A load that fails at any step leaves the old version
serving and raises.

Engines by task: ``encode`` -> :class:`~service.engine.batcher.EncodeBatcher`; ``generate`` ->
:class:`~service.engine.generation.GenerationEngine`. Routers reach them through the task's
interface (interfaces.py): ``served.encoder()`` or ``served.generator()``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from model_store import ModelRepository
from service.engine.batcher import EncodeBatcher
from service.engine.errors import (
    EngineError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    WrongTask,
)
from service.engine.generation import GenerationEngine
from service.engine.interfaces import EncodeEngine, Engine, GenerateEngine
from service.engine.models import LoadedModel, load_model, resolve_version
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


def parse_model_spec(spec: str) -> tuple[str, int | None]:
    """``"name"`` (highest version) or ``"name:3"`` (pinned), as in LONGHAUL_MODELS."""
    match = re.fullmatch(r"([^:]+)(?::([1-9][0-9]*))?", spec.strip())
    if match is None:
        raise ValueError(f"model spec {spec!r} is not 'name' or 'name:version'")
    return match.group(1), int(match.group(2)) if match.group(2) else None


EngineFactory = Callable[[LoadedModel, Settings, Metrics], Engine]


def default_engine_factories() -> dict[str, EngineFactory]:
    return {"encode": EncodeBatcher, "generate": GenerationEngine}


#: A model whose last this-many requests all failed inside it (backend errors) is unhealthy.
UNHEALTHY_AFTER = 3


@dataclass
class ServedModel:
    loaded: LoadedModel
    engine: Engine
    #: Requests currently holding a lease on this version (see ModelRegistry.lease).
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: Requests in a row that failed inside the model; a success resets it.
    consecutive_failures: int = 0
    last_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures < UNHEALTHY_AFTER

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self, error: str) -> None:
        self.consecutive_failures += 1
        self.last_error = error

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def version(self) -> int:
        return self.loaded.version

    @property
    def task(self) -> str:
        return self.loaded.manifest.task

    def encoder(self) -> EncodeEngine:
        """This version's engine as an encoder; ``WrongTask`` for a model of another task."""
        if self.task != "encode" or not isinstance(self.engine, EncodeEngine):
            raise WrongTask(self.name, self.task, "encode")
        return self.engine

    def generator(self) -> GenerateEngine:
        """This version's engine as a generator; ``WrongTask`` for a model of another task."""
        if self.task != "generate" or not isinstance(self.engine, GenerateEngine):
            raise WrongTask(self.name, self.task, "generate")
        return self.engine

    def acquire(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()


class ModelRegistry:
    def __init__(
        self,
        repo: ModelRepository,
        settings: Settings,
        metrics: Metrics,
        factories: dict[str, EngineFactory] | None = None,
    ) -> None:
        self.repo = repo
        self.settings = settings
        self.metrics = metrics
        self.factories = factories if factories is not None else default_engine_factories()
        self._served: dict[str, ServedModel] = {}
        self._loading: set[str] = set()  # names still loading at start-up (503, not 404)
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._ever_served: set[str] = set()  # bounded by the store, not by request bodies
        self._planned: set[str] = set()  # models start-up loads: they share the thread budget
        self.started = False  # start-up loading finished (successfully or not)

    # ----------------------------------------------------------------------------- lookup

    def get(self, name: str) -> ServedModel:
        """The served version; raises ``ModelNotReady`` while loading, else ``ModelNotFound``."""
        served = self._served.get(name)
        if served is not None:
            return served
        if name in self._loading:
            raise ModelNotReady(name, self.settings.retry_after_seconds)
        raise ModelNotFound(name, available=self.names())

    @asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[ServedModel]:
        """``get`` plus a hold keeping this version alive until the block exits (reloads wait)."""
        served = self.get(name)
        served.acquire()
        try:
            yield served
        finally:
            served.release()

    def names(self) -> list[str]:
        return sorted(self._served)

    def models(self) -> list[ServedModel]:
        return [self._served[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._served

    def known(self, name: str) -> bool:
        """Served now or at some point since start-up (metrics label such names as themselves)."""
        return name in self._ever_served or name in self._loading

    @property
    def ready(self) -> bool:
        """Start-up loading is over and at least one served model is healthy (answered its
        warm-up, and its requests are not all failing)."""
        return (
            self.started
            and not self._loading
            and any(served.healthy for served in self._served.values())
        )

    # ----------------------------------------------------------------------------- loading

    async def start(self, specs: list[tuple[str, int | None]]) -> None:
        """Start-up: load every (name, pinned version or None); a failure is skipped, not fatal.

        When the newest version of an unpinned model fails (checksums, backend, warm-up), older
        versions are tried in turn, newest first, so a corrupt upload does not take the model
        offline.
        """
        self._loading = {name for name, _ in specs}
        self._planned = set(self._loading)
        try:
            for name, pinned in specs:
                try:
                    await self._load_startup(name, pinned)
                except EngineError as exc:
                    log.error("not serving %s: %s", name, exc.message)
                finally:
                    self._loading.discard(name)
        finally:
            self._loading.clear()
            self.started = True
        log.info("ready: serving %s", ", ".join(self.names()) or "no models")

    async def _load_startup(self, name: str, pinned: int | None) -> None:
        versions = [pinned] if pinned is not None else list(reversed(self._versions(name)))
        last: EngineError | None = None
        for version in versions:
            try:
                await self.load(name, version)
                return
            except ModelNotFound:
                raise
            except EngineError as exc:
                log.error("skipping %s/%s: %s", name, version, exc.message)
                last = exc
        if last is not None:
            raise last
        raise ModelNotFound(name, detail=f"model {name!r} has no version in {self.repo.root}")

    def _versions(self, name: str) -> list[int]:
        # Blocking directory listing, but a handful of entries: fine on the loop at start-up.
        try:
            return self.repo.list_versions(name)
        except Exception as exc:
            raise ModelNotFound(name, detail=str(exc)) from exc

    async def load(self, name: str, version: int | None = None) -> ServedModel:
        """Verify -> load -> start -> warm up -> swap. The old version serves until the swap."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # two concurrent loads of one name would race on the swap
            resolved = await asyncio.to_thread(resolve_version, self.repo, name, version)
            factory = self.factories.get(resolved.manifest.task)
            if factory is None:
                raise ModelLoadError(
                    name, resolved.version, f"no engine for task {resolved.manifest.task!r}"
                )
            # One intra-op thread budget for every model served at once (settings.thread_budget):
            # the models of start-up plus whatever else is served by then, this one included.
            sharing = len(self._planned | set(self._served) | {name})
            threads = self.settings.threads_per_model(sharing)
            loaded = await asyncio.to_thread(
                load_model, self.repo, name, resolved.version, self.settings, threads
            )
            engine = factory(loaded, self.settings, self.metrics)
            try:
                await engine.start()
                if self.settings.warmup:
                    await engine.warmup()
            except Exception as exc:
                await self._shutdown(ServedModel(loaded, engine))
                raise ModelLoadError(name, loaded.version, f"warm-up failed: {exc}") from exc
            served = ServedModel(loaded, engine)
            previous = self._served.get(name)
            self._served[name] = served  # the atomic swap
            self._ever_served.add(name)
            manifest = loaded.manifest
            self.metrics.set_model_info(
                name, loaded.version, manifest.architecture, manifest.format, manifest.precision,
                loaded.backend.provider,
            )  # fmt: skip
            if previous is not None:
                self._retire(previous)
            log.info("serving %s/%d (%s)", name, loaded.version, manifest.task)
            return served

    async def unload(self, name: str) -> ServedModel:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            served = self.get(name)
            del self._served[name]
            self.metrics.remove_model(name)
            self._retire(served)
            return served

    def _retire(self, served: ServedModel) -> None:
        task = asyncio.create_task(self._drain_and_stop(served), name=f"retire-{served.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain_and_stop(self, served: ServedModel) -> None:
        try:
            await asyncio.wait_for(served.drained(), timeout=self.settings.drain_timeout_seconds)
        except TimeoutError:
            log.warning("%s/%d: %d requests still in flight after %.0f s; stopping anyway",
                        served.name, served.version, served.in_flight,
                        self.settings.drain_timeout_seconds)  # fmt: skip
        await self._shutdown(served)
        log.info("retired %s/%d", served.name, served.version)

    async def _shutdown(self, served: ServedModel) -> None:
        try:
            await served.engine.stop()
        except Exception:
            log.exception("%s/%d: engine did not stop cleanly", served.name, served.version)
        await asyncio.to_thread(served.loaded.close)

    async def close(self) -> None:
        """Shutdown: stop every engine (finishing queued work) and wait for retirements."""
        served, self._served = list(self._served.values()), {}
        for model in served:
            self.metrics.remove_model(model.name)
            await self._shutdown(model)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
