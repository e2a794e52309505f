"""Model → backend: the merged catalog, a cap on generations per backend, failover."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from bot.backends.base import NO_OPTIONS, Backend, Chunk, Message, ModelInfo, Options, Timeouts
from bot.backends.ollama import OllamaBackend
from bot.backends.openai import OpenAIBackend
from bot.capacity import Capacity, Held, Place
from bot.errors import BackendError, BackendTimeout, BackendUnreachable
from bot.options import any_matches
from bot.settings import BackendConfig, Settings
from bot.state import RedisClient

log = logging.getLogger(__name__)

CLOUD_SUFFIXES = ("-cloud", ":cloud")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    backend: str


def same_model(a: str, b: str) -> bool:
    """Ollama treats `llama3.2` and `llama3.2:latest` as one model."""

    def norm(n: str) -> str:
        return n if ":" in n.rsplit("/", 1)[-1] else n + ":latest"

    return norm(a) == norm(b)


def strip_cloud_suffix(model: str) -> str | None:
    """`gpt-oss:120b-cloud` / `kimi-k2.6:cloud` → the cloud's own name; None if no suffix."""
    for suffix in CLOUD_SUFFIXES:
        if model.endswith(suffix) and len(model) > len(suffix):
            return model[: -len(suffix)]
    return None


def build_backend(config: BackendConfig, timeouts: Timeouts) -> Backend:
    if config.kind == "openai":
        return OpenAIBackend(config, timeouts)
    return OllamaBackend(config, timeouts)


@dataclass
class Generation:
    """A started generation: which backend answers, and its chunks (the first already read)."""

    backend: str
    model: str
    _chunks: AsyncIterator[Chunk]
    _first: Chunk | None
    _held: Held  # the backend place it holds
    _closed: bool = field(default=False)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            async for chunk in self._chunks:
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the stream (which stops generation upstream) and free the backend's slot."""
        if self._closed:
            return
        self._closed = True
        try:
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await self._held.release()


class Router:
    def __init__(
        self,
        backends: list[Backend],
        *,
        concurrency: int | dict[str, int] = 4,
        catalog_ttl: float = 30.0,
        capability_globs: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is required")
        self.backends = {b.name: b for b in backends}
        self.order = [b.name for b in backends]
        self.cloud = next((b for b in backends if b.config.cloud), None)
        self.catalog_ttl = catalog_ttl
        caps = concurrency
        if not isinstance(caps, dict):
            caps = dict.fromkeys(self.order, caps)
        # per process until the app gives it Redis (`share_caps`): then shared by every replica
        self.capacity = Capacity(caps)
        self._models: dict[str, list[str]] = {}  # last good catalog of each backend
        self._fetched_at = -1e18
        self._refresh = asyncio.Lock()
        self.errors: dict[str, BackendError] = {}  # why a backend's catalog is missing
        # what non-Ollama backends' models can do, by the operator's globs: capability → globs
        self.capability_globs = capability_globs or {}
        self._profiles: dict[tuple[str, str], tuple[ModelInfo, float]] = {}  # → (info, until)
        self._asking: dict[tuple[str, str], asyncio.Future[ModelInfo]] = {}  # /api/show in flight

    @classmethod
    def from_settings(cls, settings: Settings, *, ttl: float | None = None) -> Router:
        """Every configured backend, with the configured timeouts, cap and catalog cache
        (`ttl`: another cache lifetime, 0 for a one-off command)."""
        timeouts = Timeouts(
            connect=settings.connect_timeout,
            first_chunk=settings.first_token_timeout,
            idle=settings.idle_timeout,
        )
        return cls(
            [build_backend(c, timeouts) for c in settings.backend_configs()],
            concurrency=settings.backend_caps(),
            catalog_ttl=settings.catalog_ttl if ttl is None else ttl,
            capability_globs={
                "vision": tuple(settings.vision_models),
                "tools": tuple(settings.tool_models),
            },
        )

    async def catalog(self, *, refresh: bool = False) -> list[CatalogEntry]:
        """Every backend's models, in backend order; cached for catalog_ttl seconds."""
        async with self._refresh:
            if refresh or time.monotonic() - self._fetched_at > self.catalog_ttl:
                results = await asyncio.gather(
                    *(self.backends[n].list_models() for n in self.order), return_exceptions=True
                )
                for name, result in zip(self.order, results, strict=True):
                    if isinstance(result, BackendError):
                        log.warning("backend %s: cannot list models: %s", name, result)
                        self.errors[name] = result
                    elif isinstance(result, BaseException):
                        raise result
                    else:
                        self._models[name] = result
                        self.errors.pop(name, None)
                self._fetched_at = time.monotonic()
        return [CatalogEntry(m, n) for n in self.order for m in self._models.get(n, [])]

    async def model_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for entry in await self.catalog():
            seen.setdefault(entry.name)
        return list(seen)

    async def find(self, model: str) -> str | None:
        """The catalog's spelling of `model`, if any backend serves it (or it names one)."""
        await self.catalog()  # `backend/model` skips it in candidates(), but is checked here
        candidates = await self.candidates(model)
        for backend, name in candidates:
            if any(same_model(name, m) for m in self._models.get(backend.name, [])):
                return model
        if strip_cloud_suffix(model) and self.cloud is not None:
            return model
        return None

    async def profile(self, model: str) -> ModelInfo:
        """What `model` can do and how much it reads, from the backend that would answer it: an
        Ollama says (/api/show); for other servers the operator's globs say which see images
        (PARLEY_VISION_MODELS) and which call tools (PARLEY_TOOL_MODELS). Cached like the
        catalog, for at least five minutes; turns that ask while it is being asked wait for that
        one answer; an answer that could not be had is not cached (asked again next time)."""
        backend, name = (await self.candidates(model))[0]
        cached = self._profiles.get((backend.name, name))
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        if isinstance(backend, OllamaBackend):
            key = (backend.name, name)
            asking = self._asking.get(key)
            if asking is None:  # one /api/show at a time: a burst of turns waits for the same
                asking = self._asking[key] = asyncio.ensure_future(backend.show(name))
                asking.add_done_callback(functools.partial(self._asked, key))
            try:
                info = await asyncio.shield(asking)
            except BackendError as e:
                log.warning("backend %s: cannot tell what %s can do: %s", backend.name, name, e)
                return ModelInfo()
        else:
            can = {c for c, globs in self.capability_globs.items() if any_matches(name, globs)}
            info = ModelInfo(frozenset({"completion", *can}))
        until = time.monotonic() + max(self.catalog_ttl, 300)
        self._profiles[(backend.name, name)] = (info, until)
        return info

    def _asked(self, key: tuple[str, str], asking: asyncio.Future[ModelInfo]) -> None:
        del self._asking[key]
        if not asking.cancelled():
            asking.exception()  # retrieved here too: every waiter may have gone meanwhile

    async def sees_images(self, model: str) -> bool:
        """Whether `model` takes images (`vision` in its profile)."""
        return "vision" in (await self.profile(model)).capabilities

    async def vision_models(self) -> list[str]:
        """The catalog's models that take images."""
        names = await self.model_names()
        sight = await asyncio.gather(*(self.sees_images(n) for n in names))
        return [n for n, sees in zip(names, sight, strict=True) if sees]

    async def candidates(self, model: str) -> list[tuple[Backend, str]]:
        """Backends to try for `model`, in order, with the name each one knows it by."""
        prefix, sep, rest = model.partition("/")
        if sep and prefix in self.backends:
            return [(self.backends[prefix], rest)]
        await self.catalog()
        serving = [
            (self.backends[n], model)
            for n in self.order
            if any(same_model(model, m) for m in self._models.get(n, []))
        ]
        if serving:
            return serving
        if (bare := strip_cloud_suffix(model)) is not None:
            if self.cloud is not None:
                return [(self.cloud, bare)]
            # a signed-in local Ollama proxies cloud models itself
            local = [
                self.backends[n] for n in self.order if self.backends[n].config.kind == "ollama"
            ]
            if local:
                return [(local[0], model)]
        return [(self.backends[self.order[0]], model)]

    def share_caps(self, redis: RedisClient, prefix: str) -> None:
        """Hold the backends' caps in Redis: one cap for every replica, and a fair queue."""
        self.capacity = Capacity(self.capacity.caps, redis, prefix)

    async def open(
        self,
        model: str,
        messages: list[Message],
        options: Options = NO_OPTIONS,
        *,
        person: str = "",
        place: Place | None = None,
    ) -> Generation:
        """Start a generation, failing over while a backend is unreachable before output. At a
        backend with a cap, wait for a place first (`place` is told how many are ahead of
        `person`'s turn while it waits)."""
        failure: BackendError | None = None
        for backend, name in await self.candidates(model):
            slot = await self.capacity.enter(backend.name, person, place)
            chunks = backend.chat(name, messages, options)
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                await slot.release()
                failure = BackendError(backend.name, "empty answer")
                continue
            except (BackendUnreachable, BackendTimeout) as e:
                await slot.release()
                with contextlib.suppress(Exception):
                    await chunks.aclose()  # type: ignore[attr-defined]
                log.warning(
                    "backend %s unreachable for %s, trying the next: %s", backend.name, name, e
                )
                failure = e
                continue
            except BaseException:
                await asyncio.shield(slot.release())
                with contextlib.suppress(Exception):
                    await chunks.aclose()  # type: ignore[attr-defined]
                raise
            return Generation(backend.name, name, chunks, first, slot)
        assert failure is not None
        raise failure

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()
