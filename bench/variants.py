"""Backend readers to measure the core's against (bench/profile.py, `bench.concurrency --variant`).

Each implements the core's Backend protocol (name, config, chat(), list_models(), aclose()) with
the same typed chunks and errors, so a Router can be handed one in place of the core's object
(dependency injection, no patching of core functions).

  asyncio-transport  the core before httpx-aiohttp: today's `OllamaBackend` on the transport it
                     had at BEFORE (httpcore's pool and h11 on asyncio's own sockets, with its
                     process-wide `sniffio` entry), read from git history at run time, so that
                     before and after are measured in one run without a copy of it in the tree.
  aiohttp            aiohttp's client used directly, with the same line loop and one idle
                     watchdog per stream: the yardstick for what httpx's own layers still cost
                     on top of aiohttp.
  floor              no HTTP library: a raw asyncio Protocol per request, orjson and the core's
                     `chunks_of` per line. Not a client (no pool, no timeouts, minimal HTTP):
                     what the socket, the loop and the JSON alone cost per token.
"""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bot.backends.base import (
    NO_OPTIONS,
    Chunk,
    Done,
    Message,
    Options,
    Timeouts,
    error_text,
    make_client,
    status_error,
)
from bot.backends.ollama import OllamaBackend, chunks_of, request_body
from bot.errors import BackendStreamError, BackendTimeout, BackendUnreachable
from bot.settings import BackendConfig

# The last commit whose core read through bot/backends/transport.py, and its pool limits.
BEFORE = "8abd922"
BEFORE_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=50)


@functools.cache
def before_transport() -> types.ModuleType:
    """bot/backends/transport.py as it was at BEFORE, as a module of its own (needs git)."""
    root = Path(__file__).resolve().parent.parent
    path = f"{BEFORE}:bot/backends/transport.py"
    source = subprocess.run(
        ["git", "show", path], cwd=root, capture_output=True, check=True, text=True
    ).stdout
    module = types.ModuleType("bench_before_transport")
    sys.modules[module.__name__] = module
    exec(compile(source, path, "exec"), module.__dict__)
    return module


class BeforeOllama(OllamaBackend):
    """Today's `OllamaBackend`, unchanged, on the transport of BEFORE."""

    def __init__(self, config: BackendConfig, timeouts: Timeouts | None = None) -> None:
        # not super().__init__: that would make a client on the core's transport
        self.name = config.name
        self.config = config
        self.timeouts = timeouts or Timeouts()
        transport = before_transport().AsyncioTransport(limits=BEFORE_LIMITS)
        self.client = make_client(config, self.timeouts, transport=transport)


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

    async def chat(
        self, model: str, messages: list[Message], options: Options = NO_OPTIONS
    ) -> AsyncIterator[Chunk]:
        try:
            response = await self.session.post(
                "api/chat", json=request_body(model, messages, options)
            )
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


class _NdjsonLines(asyncio.Protocol):
    """One /api/chat answer on its own connection: the JSON lines of its chunked body, handed to
    the reader once per packet. Only what a floor needs: status 200 or not, lines that start with
    `{`, the last chunk `0\r\n\r\n`; no pool, no timeouts, no other framing."""

    def __init__(self) -> None:
        self.head = b""
        self.status = 0
        self.pending = b""
        self.lines: list[bytes] = []
        self.ended = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head.split(b" ", 2)[1])
            data, self.head = self.head[end + 4 :], b""
        data = self.pending + data
        parts = data.split(b"\n")
        self.pending = parts.pop()
        self.lines += [p for p in parts if p.startswith(b"{")]
        if data.endswith(b"0\r\n\r\n"):
            self.ended = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class FloorOllama:
    """A floor, not a client: a raw asyncio Protocol per request, minimal HTTP/1.1, orjson and
    the core's `chunks_of` per line. What reading a token costs with no HTTP library at all:
    the socket, the loop, one wake-up per packet, the JSON and the typed chunk."""

    def __init__(self, config: BackendConfig, timeouts: Timeouts | None = None) -> None:
        self.name = config.name
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.url = httpx.URL(config.url)

    async def chat(
        self, model: str, messages: list[Message], options: Options = NO_OPTIONS
    ) -> AsyncIterator[Chunk]:
        import orjson

        loop = asyncio.get_running_loop()
        host, port = self.url.host, self.url.port or 80
        try:
            transport, lines = await loop.create_connection(_NdjsonLines, host, port)
        except OSError as e:
            raise BackendUnreachable(self.name, type(e).__name__) from e
        body = orjson.dumps(request_body(model, messages, options))
        transport.write(
            f"POST /api/chat HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            while True:
                while not lines.lines and not lines.ended:
                    lines.waiter = loop.create_future()
                    await lines.waiter
                if lines.status != 200:
                    raise status_error(self.name, model, lines.status, "", httpx.Headers())
                batch, lines.lines = lines.lines, []
                for line in batch:
                    for chunk in chunks_of(orjson.loads(line), self.name):
                        yield chunk
                        if isinstance(chunk, Done):
                            return
                if lines.ended:
                    raise BackendStreamError(self.name, "the stream ended without finishing")
        finally:
            transport.close()

    async def list_models(self) -> list[str]:
        async with httpx.AsyncClient(base_url=self.config.url) as client:
            data = (await client.get("/api/tags")).json()
        return [str(m["name"]) for m in data.get("models") or []]

    async def aclose(self) -> None:
        pass


VARIANTS: dict[str, type[Any]] = {
    "asyncio-transport": BeforeOllama,
    "aiohttp": AiohttpOllama,
    "floor": FloorOllama,
}


async def install(router: Any, variant: str) -> None:
    """Hand the router a variant backend object for every configured backend."""
    if variant == "core":
        return
    cls = VARIANTS[variant]
    for name, backend in list(router.backends.items()):
        router.backends[name] = cls(backend.config, backend.timeouts)
        await backend.aclose()
