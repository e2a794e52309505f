"""What every backend yields and how it is reached: typed chunks, a shared HTTP client, errors."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from bot.backends.transport import AsyncioTransport
from bot.errors import (
    BackendBadRequest,
    BackendBusy,
    BackendError,
    BackendTimeout,
    BackendUnauthorized,
    BackendUnreachable,
    BackendUsageLimit,
    ModelNotFound,
)
from bot.settings import BackendConfig


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Thinking:
    text: str


@dataclass(frozen=True)
class Done:
    reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    eval_seconds: float = 0.0  # time the model spent generating (0 if the server doesn't say)


Chunk = Content | Thinking | Done


@dataclass(frozen=True)
class Message:
    """One chat message as sent to a model."""

    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    first_chunk: float = 300.0  # a model may need minutes to load
    idle: float = 60.0  # between two chunks


class Backend(Protocol):
    name: str
    config: BackendConfig

    def chat(self, model: str, messages: list[Message]) -> AsyncIterator[Chunk]:
        """Stream a reply. Leaving the iterator early closes the connection (stops generation)."""
        ...

    async def list_models(self) -> list[str]: ...

    async def aclose(self) -> None: ...


# the router's per-backend cap limits generations; the pool must not refuse them first
POOL_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=50)


def make_client(
    config: BackendConfig,
    timeouts: Timeouts,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """One pooled client per backend; the bearer header only when a key is configured.

    Its transport reads sockets through asyncio's protocol callbacks rather than anyio (see
    bot/backends/transport.py; the same httpx client, connection pool and errors). `transport`:
    another one, e.g. httpx's default, to measure against (bench/variants.py).
    """
    headers = {"User-Agent": "parley/0.1"}
    if config.api_key is not None:
        headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
    return httpx.AsyncClient(
        base_url=config.url,
        headers=headers,
        timeout=httpx.Timeout(
            connect=timeouts.connect, read=timeouts.first_chunk, write=30.0, pool=timeouts.connect
        ),
        transport=transport or AsyncioTransport(limits=POOL_LIMITS),
    )


async def open_stream(
    client: httpx.AsyncClient, request: httpx.Request, backend: str, model: str
) -> httpx.Response:
    """Send a streaming request: the response to read (and close), or the typed error of an
    unreachable server or of any answer but 200."""
    try:
        response = await client.send(request, stream=True)
    except httpx.TransportError as e:
        raise transport_error(backend, e) from e
    if response.status_code != 200:
        try:
            text = error_text(await response.aread())
        finally:
            await response.aclose()
        raise status_error(backend, model, response.status_code, text, response.headers)
    return response


def error_text(body: bytes) -> str:
    """The server's message: `{"error": "…"}`, `{"error": {"message": …}}`, or plain text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data: Any = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(data, dict):
        err = data.get("error", data.get("message", text))
        if isinstance(err, dict):
            err = err.get("message", json.dumps(err))
        return str(err)[:500]
    return text[:500]


_RETRY_IN = re.compile(
    r"(?:try again|retry) in (\d+(?:\.\d+)?)\s*(s|sec|second|m|min|minute)", re.I
)


def retry_after_seconds(headers: httpx.Headers, message: str) -> float | None:
    if value := headers.get("retry-after"):
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
    if match := _RETRY_IN.search(message):
        return float(match[1]) * (60 if match[2].lower().startswith("m") else 1)
    return None


def status_error(
    backend: str, model: str, status: int, message: str, headers: httpx.Headers
) -> BackendError:
    """Map an error status before any output to a typed error."""
    match status:
        case 401 | 403:
            # 403 "requires a subscription" is not about the key but still an access refusal
            if "subscription" in message or "upgrade" in message:
                return BackendUsageLimit(backend, message)
            return BackendUnauthorized(backend, "unauthorized")
        case 402 | 429:
            return BackendUsageLimit(backend, message, retry_after_seconds(headers, message))
        case 404:
            return ModelNotFound(backend, model, message)
        case 503:
            return BackendBusy(backend, message)
        case 502 | 504:
            return BackendUnreachable(backend, message)
        case 400 | 422:
            return BackendBadRequest(backend, message)
        case _:
            return BackendError(backend, f"HTTP {status}: {message}")


def transport_error(backend: str, error: httpx.TransportError) -> BackendError:
    if isinstance(error, httpx.ReadTimeout):  # no status line yet: the model is still loading
        return BackendTimeout(backend, "no answer in time")
    return BackendUnreachable(backend, type(error).__name__)
