"""Ollama's native API: /api/chat (NDJSON streaming) and /api/tags."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

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
    open_stream,
    status_error,
    transport_error,
)
from bot.errors import BackendError, BackendStreamError, BackendTimeout
from bot.settings import BackendConfig


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
    raw = response.aiter_bytes()  # not aiter_raw: a proxy may gzip the stream (Content-Encoding)
    pending = b""
    try:
        while True:
            timer.wait()
            try:
                data = await anext(raw)
            except StopAsyncIteration:
                break
            except asyncio.CancelledError:
                if timer.ours():
                    raise BackendTimeout(backend, f"no output for {timer.limit:.0f}s") from None
                raise
            finally:
                timer.since = None
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


def request_body(model: str, messages: list[Message]) -> dict[str, Any]:
    """An /api/chat request that streams."""
    return {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "stream": True,
    }


def chunks_of(data: dict[str, Any], backend: str) -> list[Chunk]:
    """The typed chunks of one parsed NDJSON line: thinking, content, then done (the last)."""
    if "error" in data:
        raise BackendStreamError(backend, str(data["error"]))
    chunks: list[Chunk] = []
    message = data.get("message") or {}
    if thinking := message.get("thinking"):
        chunks.append(Thinking(thinking))
    if content := message.get("content"):
        chunks.append(Content(content))
    if data.get("done"):
        chunks.append(
            Done(
                reason=str(data.get("done_reason", "stop")),
                prompt_tokens=int(data.get("prompt_eval_count", 0)),
                completion_tokens=int(data.get("eval_count", 0)),
                eval_seconds=int(data.get("eval_duration", 0)) / 1e9,
            )
        )
    return chunks


class OllamaBackend:
    def __init__(self, config: BackendConfig, timeouts: Timeouts | None = None) -> None:
        self.name = config.name
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.client = make_client(config, self.timeouts)

    async def chat(self, model: str, messages: list[Message]) -> AsyncIterator[Chunk]:
        request = self.client.build_request("POST", "/api/chat", json=request_body(model, messages))
        response = await open_stream(
            self.client, request, self.name, model, within=self.timeouts.first_chunk
        )
        try:
            started = False
            lines = timed_lines(response, self.name, self.timeouts)
            try:
                async with contextlib.aclosing(lines):
                    async for line in lines:
                        try:
                            data: dict[str, Any] = json.loads(line)
                        except ValueError:
                            raise BackendStreamError(self.name, "malformed output") from None
                        for chunk in chunks_of(data, self.name):
                            started = True
                            yield chunk
                            if isinstance(chunk, Done):
                                await rest_of_body(lines)
                                return
            except httpx.TransportError as e:
                if started:
                    raise BackendStreamError(self.name, "the connection broke") from e
                raise transport_error(self.name, e) from e
            raise BackendStreamError(self.name, "the stream ended without finishing")
        finally:
            await response.aclose()  # early exit closes the connection: Ollama stops generating

    async def list_models(self) -> list[str]:
        try:
            response = await self.client.get("/api/tags", timeout=self.timeouts.connect * 2)
        except httpx.TransportError as e:
            raise transport_error(self.name, e) from e
        if response.status_code != 200:
            raise status_error(
                self.name, "", response.status_code, error_text(response.content), response.headers
            )
        try:
            models = response.json().get("models") or []
            return [str(m["name"]) for m in models]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BackendError(self.name, "unexpected /api/tags answer") from None

    async def aclose(self) -> None:
        await self.client.aclose()
