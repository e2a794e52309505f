"""Ollama's native API: /api/chat (NDJSON streaming) and /api/tags."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
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
    status_error,
    transport_error,
)
from bot.errors import BackendError, BackendStreamError, BackendTimeout
from bot.settings import BackendConfig


async def timed_lines(
    response: httpx.Response, backend: str, timeouts: Timeouts
) -> AsyncIterator[str]:
    """Non-empty lines of a streamed body; a long wait for the first, a shorter one after."""
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


class OllamaBackend:
    def __init__(self, config: BackendConfig, timeouts: Timeouts | None = None) -> None:
        self.name = config.name
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.client = make_client(config, self.timeouts)

    async def chat(self, model: str, messages: list[Message]) -> AsyncIterator[Chunk]:
        body = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
        }
        request = self.client.build_request("POST", "/api/chat", json=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as e:
            raise transport_error(self.name, e) from e
        try:
            if response.status_code != 200:
                text = error_text(await response.aread())
                raise status_error(self.name, model, response.status_code, text, response.headers)
            started = False
            try:
                async for line in timed_lines(response, self.name, self.timeouts):
                    try:
                        data: dict[str, Any] = json.loads(line)
                    except ValueError:
                        raise BackendStreamError(self.name, "malformed output") from None
                    if "error" in data:
                        raise BackendStreamError(self.name, str(data["error"]))
                    message = data.get("message") or {}
                    if thinking := message.get("thinking"):
                        started = True
                        yield Thinking(thinking)
                    if content := message.get("content"):
                        started = True
                        yield Content(content)
                    if data.get("done"):
                        yield Done(
                            reason=str(data.get("done_reason", "stop")),
                            prompt_tokens=int(data.get("prompt_eval_count", 0)),
                            completion_tokens=int(data.get("eval_count", 0)),
                            eval_seconds=int(data.get("eval_duration", 0)) / 1e9,
                        )
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
