"""Ollama's native API: /api/chat (NDJSON streaming) and /api/tags."""

from __future__ import annotations

import contextlib
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
    ModelInfo,
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


def request_body(
    model: str, messages: list[Message], options: Options = NO_OPTIONS
) -> dict[str, Any]:
    """An /api/chat request that streams; images as plain base64 (Ollama refuses data URLs);
    the options Parley sets, and only those (an unset one is the model's own default)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [_message(m) for m in messages],
        "stream": True,
    }
    if options.tools:
        body["tools"] = [t.schema() for t in options.tools]
    sampling = {
        "temperature": options.temperature,
        "top_p": options.top_p,
        "num_ctx": options.num_ctx,
        "num_predict": options.num_predict,
        "stop": list(options.stop) or None,
        "seed": options.seed,
    }
    if chosen := {k: v for k, v in sampling.items() if v is not None}:
        body["options"] = chosen
    if options.keep_alive is not None:
        body["keep_alive"] = options.keep_alive
    if options.think is not None:
        body["think"] = options.think
    return body


def _message(m: Message) -> dict[str, Any]:
    said: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.images:
        said["images"] = [i.data for i in m.images]
    if m.tool_calls:
        said["tool_calls"] = [
            {"id": c.id, "function": {"name": c.name, "arguments": c.arguments or {}}}
            for c in m.tool_calls
        ]
    if m.tool_name:
        said["tool_name"] = m.tool_name
    return said


def tool_calls_of(found: Any) -> list[ToolCall]:
    """A message's `tool_calls`: whole calls, arguments an object (TypeError if not a list of
    calls; arguments of another shape are None, for the model to be told)."""
    if not isinstance(found, list):
        raise TypeError("tool_calls")
    calls: list[ToolCall] = []
    for call in found:
        function = call["function"]
        arguments = function.get("arguments")
        calls.append(
            ToolCall(
                id=str(call.get("id") or f"call_{len(calls)}"),
                name=clean_text(str(function["name"])),
                arguments=arguments if isinstance(arguments, dict) else None,
            )
        )
    return calls


def chunks_of(data: Any, backend: str) -> list[Chunk]:
    """The typed chunks of one parsed NDJSON line: thinking, content, then done (the last).

    Model output is untrusted: a line of another shape is BackendStreamError("malformed
    output"), and text is cleaned (`clean_text`) before anything shows or stores it.
    """
    if not isinstance(data, dict):
        raise BackendStreamError(backend, "malformed output")
    if "error" in data:
        raise BackendStreamError(backend, str(data["error"]))
    try:
        chunks: list[Chunk] = []
        message = data.get("message") or {}
        if thinking := message.get("thinking"):
            chunks.append(Thinking(clean_text(thinking)))
        if content := message.get("content"):
            chunks.append(Content(clean_text(content)))
        if calls := message.get("tool_calls"):
            chunks.extend(tool_calls_of(calls))
        if data.get("done"):
            chunks.append(
                Done(
                    reason=str(data.get("done_reason", "stop")),
                    prompt_tokens=count(data.get("prompt_eval_count")),
                    completion_tokens=count(data.get("eval_count")),
                    eval_seconds=count(data.get("eval_duration")) / 1e9,
                )
            )
    except (AttributeError, TypeError, ValueError, KeyError):
        raise BackendStreamError(backend, "malformed output") from None
    return chunks


class OllamaBackend:
    def __init__(self, config: BackendConfig, timeouts: Timeouts | None = None) -> None:
        self.name = config.name
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.client = make_client(config, self.timeouts)

    async def chat(
        self, model: str, messages: list[Message], options: Options = NO_OPTIONS
    ) -> AsyncIterator[Chunk]:
        body = request_body(model, messages, options)
        request = self.client.build_request("POST", "/api/chat", json=body)
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
                            data: dict[str, Any] = fastjson.loads(line)
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

    async def show(self, model: str) -> ModelInfo:
        """What the model can do, as /api/show says (`vision` for images, `tools`, `thinking`),
        and its context length (`<architecture>.context_length` in model_info). An Ollama too
        old to list capabilities is read from the model's families (a CLIP projector sees)."""
        try:
            response = await self.client.post(
                "/api/show", json={"model": model}, timeout=self.timeouts.connect * 2
            )
        except httpx.TransportError as e:
            raise transport_error(self.name, e) from e
        if response.status_code != 200:
            raise status_error(
                self.name,
                model,
                response.status_code,
                error_text(response.content),
                response.headers,
            )
        try:
            return model_info(response.json())
        except (ValueError, AttributeError, TypeError):
            raise BackendError(self.name, "unexpected /api/show answer") from None

    async def aclose(self) -> None:
        await self.client.aclose()


def model_info(data: Any) -> ModelInfo:
    """An /api/show answer read (ValueError, AttributeError or TypeError if not one)."""
    found = data.get("capabilities")
    if isinstance(found, list):
        capabilities = frozenset(str(c) for c in found)
    else:
        families = (data.get("details") or {}).get("families") or []
        seeing = any(f in ("clip", "mllama") for f in families) or "projector_info" in data
        capabilities = frozenset({"completion", "vision"} if seeing else {"completion"})
    info = data.get("model_info") or {}
    architecture = info.get("general.architecture")
    length = info.get(f"{architecture}.context_length")
    if length is None:  # an architecture not named: any context_length it lists
        length = next((v for k, v in info.items() if str(k).endswith(".context_length")), None)
    context = count(length) if isinstance(length, int | float) else 0
    return ModelInfo(capabilities, context if context >= 256 else None)
