"""What every backend yields and how it is reached: typed chunks, a shared HTTP client, errors,
and the timed reading of a streamed body."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

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


@dataclass(frozen=True)
class ToolCall:
    """A tool the model calls: its call id (the OpenAI kind answers with it), the tool's name,
    and its arguments; `arguments` is None when the model wrote arguments that are not a JSON
    object (it is told so, as the call's result)."""

    id: str
    name: str
    arguments: dict[str, Any] | None


@dataclass(frozen=True)
class Tool:
    """A tool offered to a model: its name, what it does, its arguments' JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any]

    def schema(self) -> dict[str, Any]:
        """As both Ollama and the OpenAI kind take it in `tools`."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": {**function, "parameters": self.parameters}}


Chunk = Content | Thinking | ToolCall | Done


def count(value: object) -> int:
    """A token count or duration a server reports; one of another shape counts as 0 (it is
    bookkeeping, never a reason to fail a reply)."""
    if not isinstance(value, int | float | str):
        return 0
    try:
        return max(0, int(value))
    except (ValueError, OverflowError):
        return 0


@dataclass(frozen=True)
class Image:
    """An image as models take it: its media type and its bytes in base64 (no `data:` prefix)."""

    media_type: str  # image/jpeg | image/png
    data: str


@dataclass(frozen=True)
class Message:
    """One chat message as sent to a model."""

    role: str  # system | user | assistant | tool
    content: str
    images: tuple[Image, ...] = ()  # for vision models, on user messages
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the tools it called
    tool_call_id: str = ""  # tool: the call this is the result of (the OpenAI kind)
    tool_name: str = ""  # tool: which tool answered (Ollama)


@dataclass(frozen=True)
class ModelInfo:
    """What a model can do and how much it reads: an Ollama's /api/show `capabilities`
    (`vision`, `tools`, `thinking`, …) and its trained context length (None: not said)."""

    capabilities: frozenset[str] = frozenset({"completion"})
    context_length: int | None = None


Think = bool | str  # off / on, or a level: low | medium | high | max


@dataclass(frozen=True)
class Options:
    """How a model is to answer: Ollama's `options`, `keep_alive` and `think`, which the OpenAI
    kind sends as its own fields (bot/options.py decides them; None: the server's default)."""

    temperature: float | None = None
    top_p: float | None = None
    num_ctx: int | None = None  # the context window (Ollama; the OpenAI API cannot set it)
    num_predict: int | None = None  # the reply's cap in tokens (OpenAI: max_tokens)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    think: Think | None = None  # OpenAI: reasoning_effort
    keep_alive: int | str | None = None  # Ollama: seconds, or a Go duration ("10m", "-1")
    tools: tuple[Tool, ...] = ()  # offered only to models that can call tools


NO_OPTIONS = Options()


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    first_chunk: float = 300.0  # a model may need minutes to load
    idle: float = 60.0  # between two chunks


class Backend(Protocol):
    name: str
    config: BackendConfig

    def chat(
        self, model: str, messages: list[Message], options: Options = NO_OPTIONS
    ) -> AsyncIterator[Chunk]:
        """Stream a reply. Leaving the iterator early closes the connection (stops generation)."""
        ...

    async def list_models(self) -> list[str]: ...

    async def aclose(self) -> None: ...


class BackendTransport(AiohttpTransport):
    """httpx's client API on aiohttp's connection pool and C HTTP parser (httpx-aiohttp).

    Put right here for httpx-aiohttp 0.2.0: it turns httpx's `max_connections=None` into
    aiohttp's default cap of 100, so the session is made here, with no cap (the router's
    per-backend cap limits generations; the pool must not refuse them first) and no cookie jar
    (httpx keeps cookies); and its error map calls every aiohttp connection error (refused,
    reset, DNS, certificate) a ConnectTimeout and lets a malformed answer out as an aiohttp
    error. httpx's timeouts become aiohttp's: connect → sock_connect, pool → connect (the whole
    connection, TLS included), read → sock_read (unset: see make_client). Bodies reach httpx
    undecoded, and httpx decodes their Content-Encoding.
    """

    def __init__(self) -> None:
        tls = httpx.create_ssl_context()  # certifi, or SSL_CERT_FILE / SSL_CERT_DIR, as httpx

        def session() -> aiohttp.ClientSession:  # made at the first request, in the loop
            connector = aiohttp.TCPConnector(limit=0, ssl=tls, keepalive_timeout=5.0)  # as httpx
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        super().__init__(verify=tls, client=session)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
            if isinstance(response.stream, AiohttpResponseStream):  # its reader: body_reader
                response.extensions[BODY] = response.stream._aiohttp_response.content
            return response
        except httpx.ConnectTimeout as e:
            if isinstance(e.__cause__, aiohttp.ServerTimeoutError):
                raise
            raise httpx.ConnectError(str(e)) from e.__cause__
        except aiohttp.ClientError as e:
            raise httpx.RemoteProtocolError(str(e) or type(e).__name__) from e


# A response's aiohttp StreamReader, when BackendTransport made it (see `body_reader`).
BODY = "parley.body"


def body_reader(response: httpx.Response) -> Callable[[], Awaitable[bytes]]:
    """What reads the body, the next bytes as they arrive (b"" at its end): aiohttp's own reader
    where the body came through BackendTransport and is not encoded; else httpx's decoded
    iterator. The first skips httpx's and httpx-aiohttp's four iterators per chunk (its errors
    are aiohttp's: `timed_lines` turns them into httpx's, as httpx-aiohttp would).
    """
    content = response.extensions.get(BODY)
    if content is not None and response.headers.get("content-encoding", "identity") == "identity":
        return content.readany  # type: ignore[no-any-return]
    chunks = response.aiter_bytes()  # not aiter_raw: a proxy may gzip the stream
    return functools.partial(anext, chunks, b"")


def make_client(
    config: BackendConfig,
    timeouts: Timeouts,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """One pooled client per backend; the bearer header only when a key is configured.

    `transport`: another one than `BackendTransport`, to measure against (bench/variants.py).
    """
    headers = {"User-Agent": "parley/0.1"}
    if config.api_key is not None:
        headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
    return httpx.AsyncClient(
        base_url=config.url,
        headers=headers,
        # no read timeout: open_stream times the answer, timed_lines the body
        timeout=httpx.Timeout(
            connect=timeouts.connect, read=None, write=30.0, pool=timeouts.connect
        ),
        transport=transport or BackendTransport(),
    )


async def open_stream(
    client: httpx.AsyncClient, request: httpx.Request, backend: str, model: str, *, within: float
) -> httpx.Response:
    """Send a streaming request: the response to read (and close), or the typed error of an
    unreachable server, of no answer `within` seconds, or of any answer but 200.

    The wait for the answer is timed here, once per request, and the body by `timed_lines`: not
    by a read timeout, which aiohttp re-arms on every packet (docs/benchmarks.md §4).
    """
    try:
        async with asyncio.timeout(within):
            try:
                response = await client.send(request, stream=True)
            except httpx.TransportError as e:
                raise transport_error(backend, e) from e
            if response.status_code == 200:
                return response
            try:
                text = error_text(await response.aread())
            finally:
                await response.aclose()
    except TimeoutError:
        raise BackendTimeout(backend, "no answer in time") from None
    raise status_error(backend, model, response.status_code, text, response.headers)


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


# --- reading a streamed body (both kinds of backend) ------------------------------------


class StallTimer:
    """Cancels the reading task when one wait for the next line outlasts its limit.

    What an `asyncio.timeout(limit)` around every line would do (the first-chunk limit until the
    first line, the idle limit after), with one timer per stream that re-arms itself only when it
    fires, instead of a timer made and cancelled per line. Only a wait is timed: while the consumer
    holds a line, nothing is cancelled.
    """

    def __init__(self, first: float, idle: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = first
        self.idle = idle
        self.since: float | None = None  # when the current wait began; None: not waiting
        self.task: asyncio.Task[Any] | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.due = 0.0  # when the armed timer fires
        self.fired = False
        self.cancelling = 0

    def wait(self) -> None:
        self.task = asyncio.current_task()  # the generator may be driven by another task later
        now = self.since = self.loop.time()
        if self.handle is None or self.due > now + self.limit:
            if self.handle is not None:
                self.handle.cancel()
            self.due = now + self.limit
            self.handle = self.loop.call_at(self.due, self._check)

    def _check(self) -> None:
        self.handle = None
        if self.since is None or self.task is None:
            return  # not waiting: the next wait arms the timer again
        due = self.since + self.limit
        if self.loop.time() >= due:
            self.fired = True
            self.cancelling = self.task.cancelling()
            self.task.cancel()
        else:
            self.due = due
            self.handle = self.loop.call_at(due, self._check)

    def ours(self) -> bool:
        """After a CancelledError: was it this timer's, and only its (as asyncio.timeout asks)?"""
        return self.fired and self.task is not None and self.task.uncancel() <= self.cancelling

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


async def timed_lines(
    response: httpx.Response, backend: str, timeouts: Timeouts
) -> AsyncGenerator[str, None]:
    """Non-empty lines of a streamed body; a long wait for the first, a shorter one after.

    Split from the body's bytes (at \\n, \\r\\n or \\r, decoded as UTF-8) rather than through
    httpx's text and line decoders, and timed by one `StallTimer` per stream.
    """
    timer = StallTimer(timeouts.first_chunk, timeouts.idle)
    read = body_reader(response)
    pending = b""
    try:
        while True:
            timer.wait()
            try:
                data = await read()
            except asyncio.CancelledError:
                if timer.ours():
                    raise BackendTimeout(backend, f"no output for {timer.limit:.0f}s") from None
                raise
            except aiohttp.ClientError as e:  # from aiohttp's reader: as httpx-aiohttp maps it
                raise httpx.ReadError(str(e) or type(e).__name__) from e
            finally:
                timer.since = None
            if not data:
                break
            if pending:
                data = pending + data
            lines = data.splitlines()
            pending = b"" if not data or data.endswith((b"\n", b"\r")) else lines.pop()
            if lines:
                timer.limit = timer.idle
            for line in lines:
                if line.strip():
                    yield line.decode("utf-8", "replace")
        if pending.strip():  # a last line without its newline
            yield pending.decode("utf-8", "replace")
    finally:
        timer.close()


# After the last chunk, how long the end of the body may take to arrive (see `rest_of_body`).
END_OF_BODY = 0.5


async def rest_of_body(lines: AsyncIterator[str]) -> None:
    """After the last chunk: read the end of the body, so that the connection goes back to the
    pool for the next request instead of being closed (a new TCP and TLS connection per reply).

    The end follows the last line at once; more output, a wait or an error instead just leaves
    the connection to be closed, as before.
    """
    with contextlib.suppress(BackendError, httpx.TransportError, TimeoutError):
        async with asyncio.timeout(END_OF_BODY):
            async for _ in lines:
                return
