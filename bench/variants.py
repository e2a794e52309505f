"""Readers of the backend's NDJSON stream to compare with the core's (see bench/profile.py).

The profile's hot path is reading the backend stream. Each class here implements the core's
Backend protocol (name, config, chat(), list_models(), aclose()) with the same typed chunks and
typed errors, so a Router can be handed one in place of the core's object (dependency injection,
no patching of core functions).

  previous     the core before the asyncio transport: httpx's default transport (anyio), httpx's
               byte → text → line decoders and an `asyncio.timeout()` around every line.
  core-anyio   today's core reader (raw bytes split into lines, one `StallTimer` per stream) on
               httpx's default transport: what the transport alone is worth (vs core) and what the
               line reader alone is worth (vs previous).
  aiohttp      aiohttp's client (already a Parley dependency; its HTTP parser is C) with the same
               line loop and one idle watchdog per stream; not the core's client (the ground rules
               name httpx), kept as the yardstick.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx

from bot.backends.base import (
    POOL_LIMITS,
    Chunk,
    Done,
    Message,
    Timeouts,
    error_text,
    make_client,
    open_stream,
    status_error,
    transport_error,
)
from bot.backends.ollama import OllamaBackend, chunks_of, request_body
from bot.errors import BackendStreamError, BackendTimeout, BackendUnreachable
from bot.settings import BackendConfig


class IdleWatchdog:
    """Cancels the reading task when no line arrived for `limit` seconds.

    One timer per stream that re-arms itself only when it fires (at most once per `limit`), so a
    line costs one attribute store instead of a timer created and cancelled.
    """

    def __init__(self, first: float, idle: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.idle = idle
        self.limit = first
        self.last = self.loop.time()
        self.expired = False
        self.handle = self.loop.call_at(self.last + first, self._check)

    def seen(self) -> None:
        self.last = self.loop.time()
        if self.limit != self.idle:  # the first line: from now on the (shorter) idle limit
            self.limit = self.idle
            self.handle.cancel()
            self.handle = self.loop.call_at(self.last + self.idle, self._check)

    def _check(self) -> None:
        due = self.last + self.limit
        if self.loop.time() >= due:
            self.expired = True
            if self.task is not None:
                self.task.cancel()
        else:
            self.handle = self.loop.call_at(due, self._check)

    def close(self) -> None:
        self.handle.cancel()


def anyio_client(config: BackendConfig, timeouts: Timeouts) -> httpx.AsyncClient:
    """`make_client` as it was: the same headers, timeouts and pool limits, httpx's transport."""
    return make_client(config, timeouts, transport=httpx.AsyncHTTPTransport(limits=POOL_LIMITS))


async def decoded_lines(
    response: httpx.Response, backend: str, timeouts: Timeouts
) -> AsyncIterator[str]:
    """The core's line reader before `StallTimer`: httpx's decoders, a timeout per line."""
    lines = response.aiter_lines()
    limit = timeouts.first_chunk
    while True:
        try:
            async with asyncio.timeout(limit):
                line = await anext(lines)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise BackendTimeout(backend, f"no output for {limit:.0f}s") from None
        limit = timeouts.idle
        if line.strip():
            yield line


class CoreAnyioOllama(OllamaBackend):
    """Today's `OllamaBackend`, unchanged, on httpx's default (anyio) transport."""

    def __init__(self, config: BackendConfig, timeouts: Timeouts | None = None) -> None:
        # not super().__init__: that would make (and leak) a client on the asyncio transport
        self.name = config.name
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.client = anyio_client(config, self.timeouts)


class PreviousOllama(CoreAnyioOllama):
    """`OllamaBackend` as it was before the asyncio transport (code 7e0b6aa): httpx's transport
    and decoders, a timeout per line, the connection closed after each reply."""

    async def chat(self, model: str, messages: list[Message]) -> AsyncIterator[Chunk]:
        request = self.client.build_request("POST", "/api/chat", json=request_body(model, messages))
        response = await open_stream(self.client, request, self.name, model)
        try:
            started = False
            try:
                async for line in decoded_lines(response, self.name, self.timeouts):
                    try:
                        data: dict[str, Any] = json.loads(line)
                    except ValueError:
                        raise BackendStreamError(self.name, "malformed output") from None
                    for chunk in chunks_of(data, self.name):
                        started = True
                        yield chunk
                        if isinstance(chunk, Done):
                            return
            except httpx.TransportError as e:
                if started:
                    raise BackendStreamError(self.name, "the connection broke") from e
                raise transport_error(self.name, e) from e
            raise BackendStreamError(self.name, "the stream ended without finishing")
        finally:
            await response.aclose()


class AiohttpOllama:
    """aiohttp's client (C HTTP parser), one session per backend, no cap on connections."""

    def __init__(self, config: BackendConfig, timeouts: Timeouts | None = None) -> None:
        self.name = config.name
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.headers = {"User-Agent": "parley/0.1"}
        if config.api_key is not None:
            self.headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                base_url=self.config.url + "/",
                headers=self.headers,
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect),
            )
        return self._session

    async def chat(self, model: str, messages: list[Message]) -> AsyncIterator[Chunk]:
        try:
            response = await self.session.post("api/chat", json=request_body(model, messages))
        except (aiohttp.ClientError, OSError) as e:
            raise BackendUnreachable(self.name, type(e).__name__) from e
        watchdog = IdleWatchdog(self.timeouts.first_chunk, self.timeouts.idle)
        started = False
        try:
            if response.status != 200:
                text = error_text(await response.read())
                headers = httpx.Headers(dict(response.headers))
                raise status_error(self.name, model, response.status, text, headers)
            async for line in response.content:  # one line at a time
                watchdog.seen()
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except ValueError:
                    raise BackendStreamError(self.name, "malformed output") from None
                for chunk in chunks_of(data, self.name):
                    started = True
                    yield chunk
                    if isinstance(chunk, Done):
                        return
            raise BackendStreamError(self.name, "the stream ended without finishing")
        except asyncio.CancelledError:
            if watchdog.expired and watchdog.task is not None:
                watchdog.task.uncancel()  # our own cancellation, turned into a typed error
                raise BackendTimeout(self.name, "no output in time") from None
            raise
        except (aiohttp.ClientError, OSError) as e:
            if started:
                raise BackendStreamError(self.name, "the connection broke") from e
            raise BackendUnreachable(self.name, type(e).__name__) from e
        finally:
            watchdog.close()
            response.release()

    async def list_models(self) -> list[str]:
        async with self.session.get("api/tags") as response:
            data = await response.json()
        return [str(m["name"]) for m in data.get("models") or []]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


VARIANTS: dict[str, type[Any]] = {
    "previous": PreviousOllama,
    "core-anyio": CoreAnyioOllama,
    "aiohttp": AiohttpOllama,
}


async def install(router: Any, variant: str) -> None:
    """Hand the router a variant backend object for every configured backend."""
    if variant == "core":
        return
    cls = VARIANTS[variant]
    for name, backend in list(router.backends.items()):
        router.backends[name] = cls(backend.config, backend.timeouts)
        await backend.aclose()
