"""Candidate replacements for the hot path the profile finds: reading the backend's NDJSON stream.

These are *proposals*, kept in bench/ so the same run can compare them with the core's
`bot.backends.ollama.OllamaBackend` (see bench/profile.py). Each implements the core's Backend
protocol (name, config, chat(), list_models(), aclose()) with the same typed chunks and typed
errors, so a Router can be handed one in place of the core's object (dependency injection, no
patching of core functions).

  httpx-lean   the core's httpx client, but raw bytes split on b"\\n" and parsed as bytes, and one
               idle watchdog per stream instead of an `asyncio.timeout()` around every line.
  aiohttp      aiohttp's client (already a Parley dependency; its HTTP parser is C) with the same
               line loop and watchdog.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx

from bot.backends.base import (
    Chunk,
    Content,
    Done,
    Message,
    Thinking,
    Timeouts,
    error_text,
    make_client,
    status_error,
)
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
        self.limit = self.idle

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


def chunks_of(data: dict[str, Any], name: str) -> list[Chunk]:
    """The typed chunks of one parsed NDJSON line (same rules as the core's backend)."""
    if "error" in data:
        raise BackendStreamError(name, str(data["error"]))
    out: list[Chunk] = []
    message = data.get("message") or {}
    if thinking := message.get("thinking"):
        out.append(Thinking(thinking))
    if content := message.get("content"):
        out.append(Content(content))
    if data.get("done"):
        out.append(
            Done(
                reason=str(data.get("done_reason", "stop")),
                prompt_tokens=int(data.get("prompt_eval_count", 0)),
                completion_tokens=int(data.get("eval_count", 0)),
                eval_seconds=int(data.get("eval_duration", 0)) / 1e9,
            )
        )
    return out


def body_of(model: str, messages: list[Message]) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "stream": True,
    }


class HttpxLeanOllama:
    """The core's client; raw bytes, split and parsed without the text/line decoders."""

    def __init__(self, config: BackendConfig, timeouts: Timeouts | None = None) -> None:
        self.name = config.name
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.client = make_client(config, self.timeouts)

    async def chat(self, model: str, messages: list[Message]) -> AsyncIterator[Chunk]:
        request = self.client.build_request("POST", "/api/chat", json=body_of(model, messages))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as e:
            raise BackendUnreachable(self.name, type(e).__name__) from e
        watchdog = IdleWatchdog(self.timeouts.first_chunk, self.timeouts.idle)
        started = False
        try:
            if response.status_code != 200:
                text = error_text(await response.aread())
                raise status_error(self.name, model, response.status_code, text, response.headers)
            pending = b""
            async for raw in response.aiter_raw():
                watchdog.seen()
                *lines, pending = (pending + raw).split(b"\n")
                for line in lines:
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
        except httpx.TransportError as e:
            if started:
                raise BackendStreamError(self.name, "the connection broke") from e
            raise BackendUnreachable(self.name, type(e).__name__) from e
        finally:
            watchdog.close()
            await response.aclose()

    async def list_models(self) -> list[str]:
        response = await self.client.get("/api/tags", timeout=self.timeouts.connect * 2)
        return [str(m["name"]) for m in response.json().get("models") or []]

    async def aclose(self) -> None:
        await self.client.aclose()


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
            response = await self.session.post("api/chat", json=body_of(model, messages))
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


VARIANTS: dict[str, type[Any]] = {"httpx-lean": HttpxLeanOllama, "aiohttp": AiohttpOllama}


async def install(router: Any, variant: str) -> None:
    """Hand the router a variant backend object for every configured backend."""
    if variant == "core":
        return
    cls = VARIANTS[variant]
    for name, backend in list(router.backends.items()):
        router.backends[name] = cls(backend.config, backend.timeouts)
        await backend.aclose()
