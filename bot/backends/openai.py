"""Any OpenAI-compatible server: /v1/chat/completions (SSE streaming) and /v1/models."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from bot import fastjson
from bot.backends.base import (
    NO_OPTIONS,
    Chunk,
    Content,
    Done,
    Message,
    Options,
    Thinking,
    Timeouts,
    ToolCall,
    count,
    error_text,
    make_client,
    open_stream,
    rest_of_body,
    status_error,
    timed_lines,
    transport_error,
)
from bot.errors import BackendError, BackendStreamError
from bot.markdown import clean_text
from bot.settings import BackendConfig


class OpenAIBackend:
    def __init__(self, config: BackendConfig, timeouts: Timeouts | None = None) -> None:
        self.name = config.name
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.client = make_client(config, self.timeouts)
        # A base URL may or may not already end in /v1 (https://api.example.com/v1 is common).
        self.prefix = "" if config.url.rstrip("/").endswith("/v1") else "/v1"

    async def chat(
        self, model: str, messages: list[Message], options: Options = NO_OPTIONS
    ) -> AsyncIterator[Chunk]:
        body = request_body(model, messages, options)
        request = self.client.build_request("POST", f"{self.prefix}/chat/completions", json=body)
        response = await open_stream(
            self.client, request, self.name, model, within=self.timeouts.first_chunk
        )
        try:
            started = False
            reason: str | None = None
            usage: dict[str, Any] = {}
            calls = ToolCalls(self.name)  # arrive in pieces; given whole before Done
            pieces = 0  # text chunks: the completion's tokens when the server reports none
            lines = timed_lines(response, self.name, self.timeouts)
            try:
                async with contextlib.aclosing(lines):
                    async for line in lines:
                        if not line.startswith("data:"):
                            continue  # comments, event names, keep-alives
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            for call in calls.whole():
                                yield call
                            yield Done(
                                reason=reason or "stop",
                                prompt_tokens=count(usage.get("prompt_tokens")),
                                # a server that reports no usage (llama-cpp-python's) streams a
                                # token a chunk: counted so, budgets still count its replies
                                completion_tokens=count(usage.get("completion_tokens")) or pieces,
                            )
                            await rest_of_body(lines)
                            return
                        try:
                            data = fastjson.loads(payload)
                        except ValueError:
                            raise BackendStreamError(self.name, "malformed output") from None
                        if isinstance(data, dict) and "error" in data:
                            raise BackendStreamError(self.name, error_text(payload.encode()))
                        usage = usage_of(data, usage, self.name)
                        calls.add(data)
                        for chunk, finish in deltas_of(data, self.name):
                            started = started or chunk is not None
                            if chunk is not None:
                                pieces += 1
                                yield chunk
                            reason = finish or reason
            except httpx.TransportError as e:
                if started:
                    raise BackendStreamError(self.name, "the connection broke") from e
                raise transport_error(self.name, e) from e
            if reason:  # some servers end after the finish chunk without [DONE]
                for call in calls.whole():
                    yield call
                yield Done(reason=reason, completion_tokens=pieces)
                return
            raise BackendStreamError(self.name, "the stream ended without finishing")
        finally:
            await response.aclose()

    async def list_models(self) -> list[str]:
        try:
            response = await self.client.get(
                f"{self.prefix}/models", timeout=self.timeouts.connect * 2
            )
        except httpx.TransportError as e:
            raise transport_error(self.name, e) from e
        if response.status_code != 200:
            raise status_error(
                self.name, "", response.status_code, error_text(response.content), response.headers
            )
        try:
            data = response.json().get("data") or []  # Ollama answers `null` when empty
            return [str(m["id"]) for m in data]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BackendError(self.name, "unexpected /v1/models answer") from None

    async def aclose(self) -> None:
        await self.client.aclose()


def request_body(
    model: str, messages: list[Message], options: Options = NO_OPTIONS
) -> dict[str, Any]:
    """A /chat/completions request that streams with usage; Ollama's options in OpenAI's names
    (`num_ctx` and `keep_alive` have none: the server decides them)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [_message(m) for m in messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chosen = {
        "temperature": options.temperature,
        "top_p": options.top_p,
        "max_tokens": options.num_predict,
        "stop": list(options.stop) or None,
        "seed": options.seed,
        "reasoning_effort": reasoning_effort(options.think),
    }
    body.update({k: v for k, v in chosen.items() if v is not None})
    if options.tools:
        body["tools"] = [t.schema() for t in options.tools]
    return body


def reasoning_effort(think: bool | str | None) -> str | None:
    """`think` as OpenAI's reasoning_effort: off is "none", on is "medium", a level as is."""
    if think is None:
        return None
    if isinstance(think, bool):
        return "medium" if think else "none"
    return think


def _message(message: Message) -> dict[str, Any]:
    """A chat message; with images, its content is text and `image_url` parts (data URLs); an
    assistant's tool calls with their arguments as a JSON string; a tool's result with its
    call's id."""
    if message.tool_calls:
        return {
            "role": message.role,
            "content": message.content or None,
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments or {})},
                }
                for c in message.tool_calls
            ],
        }
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if not message.images:
        return {"role": message.role, "content": message.content}
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
    parts += [
        {"type": "image_url", "image_url": {"url": f"data:{i.media_type};base64,{i.data}"}}
        for i in message.images
    ]
    return {"role": message.role, "content": parts}


def usage_of(data: Any, usage: dict[str, Any], backend: str) -> dict[str, Any]:
    """The token counts a chunk reports (the last one, with stream_options.include_usage)."""
    if not isinstance(data, dict):
        raise BackendStreamError(backend, "malformed output")
    found = data.get("usage") or usage
    if not isinstance(found, dict):
        raise BackendStreamError(backend, "malformed output")
    return found


def deltas_of(data: dict[str, Any], backend: str) -> list[tuple[Chunk | None, str | None]]:
    """Each choice's new text (thinking, then content) and finish reason, checked: model output
    is untrusted, so another shape is BackendStreamError("malformed output")."""
    found: list[tuple[Chunk | None, str | None]] = []
    try:
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            if thought := delta.get("reasoning") or delta.get("reasoning_content"):
                found.append((Thinking(clean_text(str(thought))), None))
            if content := delta.get("content"):
                found.append((Content(clean_text(str(content))), None))
            if finish := choice.get("finish_reason"):
                found.append((None, str(finish)))
    except (AttributeError, TypeError):
        raise BackendStreamError(backend, "malformed output") from None
    return found


class ToolCalls:
    """A streamed reply's tool calls, put together from their pieces: the first piece of a call
    (by `index`) names it and its id, the next ones add to its arguments (a JSON string)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, data: dict[str, Any]) -> None:
        try:
            for choice in data.get("choices") or []:
                for piece in (choice.get("delta") or {}).get("tool_calls") or []:
                    index = int(piece.get("index", len(self._calls)))
                    call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
                    function = piece.get("function") or {}
                    call["id"] = str(piece.get("id") or call["id"])
                    call["name"] += str(function.get("name") or "")
                    call["arguments"] += str(function.get("arguments") or "")
        except (AttributeError, TypeError, ValueError):
            raise BackendStreamError(self.backend, "malformed output") from None

    def whole(self) -> list[ToolCall]:
        found = []
        for index, call in sorted(self._calls.items()):
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                arguments = None
            found.append(
                ToolCall(
                    id=call["id"] or f"call_{index}",
                    name=clean_text(call["name"]),
                    arguments=arguments if isinstance(arguments, dict) else None,
                )
            )
        self._calls.clear()
        return found
