"""A scriptable fake Ollama server for tests: the native API and the OpenAI-compatible API.

Written from the protocol reference (/work/shared/protocols/ollama.md, sections 1, 2, 3 and 5),
not from what any particular client sends. It listens on 127.0.0.1 on a free port.

Wire details that are deliberate (they are what a real Ollama does):

* JSON is compact, as Go's ``encoding/json`` writes it, including its HTML escaping of
  ``<``, ``>`` and ``&`` (``\\u003c`` ...). Parsers cannot tell the difference; raw-text
  matching can.
* ``created_at`` is Go's RFC3339Nano in UTC: nanosecond precision with trailing zeros
  trimmed (``...21.196249123Z``, ``...21.19Z``).
* Responses written by gin's ``c.JSON`` (``/api/*``, errors raised before the OpenAI writer
  is involved) use ``application/json; charset=utf-8`` and no trailing newline. Bodies that
  the OpenAI middleware re-encodes (``/v1`` completions, lists and handler errors) use
  ``application/json`` and end in ``\\n`` (Go's ``json.Encoder``).
* Headers of a streamed response are sent together with its first chunk, so ``first_delay``
  delays the status line too, like a model load does.
* An error before any byte of output gets its real status and a JSON body; once output has
  started the status stays 200 (section 2).

Usage::

    async with FakeModelServer() as server:
        server.script(Script(tokens=["Hi", " there"]), Script(status=429))
        ...  # point the client at server.url
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import string
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any, Literal

from aiohttp import web

__all__ = ["DEFAULT_MODELS", "FakeModelServer", "Request", "Script", "word_pieces"]

DEFAULT_MODELS: list[str] = ["llama3.2:latest", "qwen3:8b"]

CT_NDJSON = "application/x-ndjson"
CT_JSON_GIN = "application/json; charset=utf-8"  # gin's c.JSON
CT_JSON_OPENAI = "application/json"  # the OpenAI middleware's writers
CT_SSE = "text/event-stream"
CT_TEXT = "text/plain; charset=utf-8"

CHAT_PATHS = ("/api/chat", "/v1/chat/completions")

# Default `error` text for a scripted `status` (reference section 2 tables). 404 is built from
# the requested model name, see `_default_error`.
DEFAULT_ERRORS: dict[int, str] = {
    400: "invalid request",
    401: "unauthorized",
    402: "extra usage balance is empty, add extra usage",
    403: "this model requires a subscription, upgrade for access: https://ollama.com/upgrade",
    429: (
        "you (user) have reached your session usage limit, "
        "upgrade for higher limits: https://ollama.com/upgrade"
    ),
    499: "request canceled",
    500: "internal error",
    502: "dial tcp: lookup ollama.com: no such host",
    503: "server busy, please try again.  maximum pending requests exceeded",
}

THINK_LEVELS = ("high", "medium", "low", "max")

# One modification time for every listed model, in the local-offset form Ollama prints.
MODIFIED_AT = "2025-05-04T17:37:44.706015396-07:00"
MODIFIED_UNIX = int(datetime.fromisoformat("2025-05-04T17:37:44.706015-07:00").timestamp())

# base name -> (family, parameter_size, quantization_level, size, context_length, capabilities)
_KNOWN_MODELS: dict[str, tuple[str, str, str, int, int, tuple[str, ...]]] = {
    "llama3.2": ("llama", "3.2B", "Q4_K_M", 2019393189, 131072, ("completion", "tools")),
    "llama3.1": ("llama", "8.0B", "Q4_K_M", 4920753328, 131072, ("completion", "tools")),
    "qwen3": ("qwen3", "8.2B", "Q4_K_M", 5225388164, 40960, ("completion", "tools", "thinking")),
    "gpt-oss": (
        "gptoss",
        "20.9B",
        "MXFP4",
        13780173734,
        131072,
        ("completion", "tools", "thinking"),
    ),
    "gemma3": ("gemma3", "4.3B", "Q4_K_M", 3338801804, 131072, ("completion", "vision")),
}


@dataclass
class Script:
    """What the fake model does for one chat request."""

    tokens: list[str] | None = None  # content pieces; None = echo reply, see `word_pieces`
    thinking: list[str] = field(default_factory=list)  # streamed BEFORE content
    delay: float = 0.0  # seconds between chunks
    first_delay: float = 0.0  # before the first chunk (model load); delays headers and `status`
    fail_after: int | None = None  # after this many content chunks: mid-stream error, close
    error_message: str = "an error was encountered while running the model"
    status: int | None = None  # respond with this HTTP error status before any output
    error: str | None = None  # error text for `status`; default from DEFAULT_ERRORS
    plain_text: bool = False  # error body as "<error>\n" text/plain instead of JSON
    headers: dict[str, str] = field(default_factory=dict)  # extra headers on every response
    done_reason: str = "stop"
    # tools the model calls after its content: (name, arguments) each; Ollama sends them whole
    # in one chunk, the OpenAI kind in pieces (as OpenAI, vLLM and llama.cpp do) and ends with
    # finish_reason "tool_calls"
    tool_calls: list[tuple[str, Any]] = field(default_factory=list)
    usage: bool = True  # False: no usage chunk even when asked for (llama-cpp-python's server)


@dataclass
class Request:
    """One request as the fake saw it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    json: Any  # parsed body, None when there is no body or it is not JSON
    body: bytes = b""  # raw body


def word_pieces(text: str) -> list[str]:
    """Split into word pieces that keep their leading spaces: "a b" -> ["a", " b"]."""
    pieces: list[str] = re.findall(r"\s*\S+", text)
    tail = text[sum(len(p) for p in pieces) :]
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces.append(tail)
    return pieces


_TOKEN = re.compile(r"[^\W\d_]{1,5}|\d{1,3}|[^\w\s]|_")


def count_tokens(text: str) -> int:
    """A tokenizer's count, roughly as BPE vocabularies split text: runs of up to five letters,
    up to three digits, each other symbol (English prose comes to about 4.5 characters a
    token, as with Llama's and Qwen's tokenizers)."""
    return len(_TOKEN.findall(text))


def go_json(obj: Any) -> str:
    """Compact JSON the way Go's encoding/json writes it (UTF-8, HTML-safe escapes)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def rfc3339_nano(ns: int | None = None) -> str:
    """UTC time in Go's RFC3339Nano layout (trailing zeros of the fraction trimmed)."""
    if ns is None:
        ns = time.time_ns()
    seconds, fraction = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{fraction:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else f"{base}Z"


def _normalize(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"


def _base_name(name: str) -> str:
    return name.rsplit("/", 1)[-1].split(":", 1)[0]


def _namespace(name: str) -> str:
    parts = name.split(":", 1)[0].split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def _model_meta(name: str) -> tuple[str, str, str, int, int, tuple[str, ...]]:
    base = _base_name(name)
    known = _KNOWN_MODELS.get(base)
    if known is not None:
        return known
    tag = _normalize(name).rsplit(":", 1)[-1]
    match = re.match(r"(\d+(?:\.\d+)?)b\b", tag)
    size_label = f"{match.group(1)}B" if match else "7.2B"
    family = re.sub(r"[^a-z0-9]", "", base.lower()) or "llama"
    digest_size = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) + 1_000_000_000
    return (family, size_label, "Q4_K_M", digest_size, 32768, ("completion",))


def _details(name: str) -> dict[str, Any]:
    family, parameter_size, quantization, _, _, _ = _model_meta(name)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": parameter_size,
        "quantization_level": quantization,
    }


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _json_error_text(error: json.JSONDecodeError) -> str:
    """Approximate Go's encoding/json syntax error text."""
    doc = error.doc
    if error.pos >= len(doc.rstrip()):
        return "unexpected EOF"
    return f"invalid character '{doc[error.pos]}' looking for beginning of value"


def _content_text(content: Any) -> str:
    """Text of a message content: a string, or OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


NO_VISION = "this model is missing data required for image input"  # what Ollama answers
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_DATA_URL = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,([A-Za-z0-9+/]*={0,2})$")


def native_images(messages: list[Any]) -> list[str] | str:
    """The images of an /api/chat request (raw base64, as Ollama takes them), or why Ollama
    would refuse them: a data URL or anything not base64 fails to decode."""
    found: list[str] = []
    for message in messages:
        images = message.get("images") if isinstance(message, dict) else None
        if images is None:
            continue
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            return "json: cannot unmarshal into Go struct field Message.messages.images"
        for image in images:
            if len(image) % 4 or not _BASE64.match(image):
                return "illegal base64 data at input byte 4"
            found.append(image)
    return found


def openai_images(messages: list[Any]) -> list[str] | str:
    """The images of a /v1/chat/completions request (`image_url` parts with data URLs), or why
    Ollama's OpenAI layer would refuse them (a remote URL, another part type)."""
    found: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                continue
            if kind != "image_url":
                return f"invalid message content type: {kind}"
            url = (part.get("image_url") or {}).get("url")
            match = _DATA_URL.match(url) if isinstance(url, str) else None
            if match is None:
                return "invalid image input"
            found.append(match[2])
    return found


def _cap(value: Any) -> int | None:
    """num_predict / max_tokens as the server takes it: a positive count, else no cap (Ollama's
    -1 and -2 mean "until done" and "fill the context")."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _unsupported(model: str, *, think: Any, tools: Any) -> str | None:
    """Why Ollama refuses a request the model cannot serve: tools offered to a model without
    the `tools` capability, thinking asked of one without `thinking` (`think: false` is fine)."""
    capabilities = _model_meta(model)[5]
    if tools and "tools" not in capabilities:
        return f"registry.ollama.ai/library/{_normalize(model)} does not support tools"
    if think not in (None, False) and "thinking" not in capabilities:
        return f'"{model}" does not support thinking'
    return None


def _orphan_tool_result(messages: list[Any]) -> str | None:
    """OpenAI-kind servers refuse a `tool` message that answers no call of the assistant message
    before it (OpenAI: "messages with role 'tool' must be a response to a preceding message with
    'tool_calls'"); the call ids must match."""
    open_ids: set[str] = set()
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if role == "assistant":
            open_ids = {str(c.get("id")) for c in m.get("tool_calls") or [] if isinstance(c, dict)}
        elif role == "tool":
            if str(m.get("tool_call_id")) not in open_ids:
                return (
                    "messages with role 'tool' must be a response to a preceding message "
                    "with 'tool_calls'"
                )
        else:
            open_ids = set()
    return None


def _native_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """`{"error": "..."}` as gin's c.JSON writes it."""
    return web.Response(
        status=status,
        body=go_json({"error": message}).encode(),
        headers={**(headers or {}), "Content-Type": CT_JSON_GIN},
    )


def _openai_error(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    middleware: bool = False,
) -> web.Response:
    """The OpenAI error shape; type from status (reference section 5).

    `middleware=True`: raised by the middleware itself (bad body, empty messages), written
    by gin's c.JSON. Otherwise re-encoded by the OpenAI writer with json.Encoder.
    """
    if status == 400:
        kind = "invalid_request_error"
    elif status == 404:
        kind = "not_found_error"
    else:
        kind = "api_error"
    payload = go_json({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return web.Response(
        status=status,
        body=(payload if middleware else payload + "\n").encode(),
        headers={**(headers or {}), "Content-Type": CT_JSON_GIN if middleware else CT_JSON_OPENAI},
    )


def _default_error(status: int, model: str, *, openai: bool) -> str:
    if status == 404:
        if openai:
            return f'model "{model}" not found, try pulling it first'
        return f"model '{model}' not found"
    if status in DEFAULT_ERRORS:
        return DEFAULT_ERRORS[status]
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


Outcome = Literal["completed", "failed", "error", "disconnect"]


class _Run:
    """One scripted generation: timing, chunk encoding for both APIs, outcome accounting."""

    def __init__(
        self,
        server: FakeModelServer,
        request: web.Request,
        script: Script,
        model: str,
        messages: list[Any],
        *,
        openai: bool,
        stream: bool,
        include_usage: bool,
        cap: int | None = None,
        window: int | None = None,
    ) -> None:
        self.server = server
        self.cap = cap  # num_predict / max_tokens: at most this many tokens (pieces) generated
        self.cut = False  # the cap ended the generation: done_reason / finish_reason "length"
        self.request = request
        self.script = script
        self.model = model
        self.openai = openai
        self.stream = stream
        self.include_usage = include_usage
        self.response: web.StreamResponse | None = None
        self.settled = False
        self.t0 = time.perf_counter_ns()
        self.load_ns = 0
        self.chunks = 0
        self.thinking_parts: list[str] = []
        self.content_parts: list[str] = []
        self.created: int | None = None  # OpenAI `created`, pinned by the first chunk
        self.role_sent = False
        self.called: list[dict[str, Any]] = []  # the tool calls this generation made
        self.completion_id = server._next_completion_id()

        last_user = ""
        prompt_tokens = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            text = _content_text(message.get("content"))
            prompt_tokens += count_tokens(text) + 4  # the template's role markers
            if str(message.get("role", "")).lower() == "user":
                last_user = text
        if window is not None and prompt_tokens > window:
            # Ollama cuts the front of a prompt longer than num_ctx (keeping the system
            # message and the newest turn) and counts what is left
            server.truncated += 1
            prompt_tokens = window
        self.prompt_tokens = prompt_tokens
        self.tokens = (
            list(script.tokens)
            if script.tokens is not None
            else word_pieces(f"You said: {last_user}")
        )

    # -- accounting -------------------------------------------------------------------------

    def settle(self, outcome: Outcome) -> None:
        if self.settled:
            return
        self.settled = True
        server = self.server
        server.in_flight -= 1
        if outcome == "completed":
            server.completed += 1
        elif outcome == "failed":
            server.failed += 1
        elif outcome == "error":
            server.errors += 1
        elif not server._stopping:
            server.disconnects += 1

    # -- driver -----------------------------------------------------------------------------

    async def execute(self) -> web.StreamResponse:
        script = self.script
        if script.first_delay > 0:
            await asyncio.sleep(script.first_delay)
        self.load_ns = time.perf_counter_ns() - self.t0
        if script.status is not None:
            self.settle("error")
            return self._error_response(script.status, script.error)

        pieces = [("thinking", t) for t in script.thinking] + [("content", t) for t in self.tokens]
        if self.cap is not None and len(pieces) > self.cap:  # thinking counts towards the cap
            pieces, self.cut = pieces[: self.cap], True
        fail_at: int | None = None
        if script.fail_after is not None:
            # Fewer tokens than fail_after: the stream fails where it would have finished.
            fail_at = min(max(script.fail_after, 0), len(self.tokens))
        sent_content = 0
        for index, (kind, text) in enumerate(pieces):
            if kind == "content" and sent_content == fail_at:
                break
            if index > 0 and script.delay > 0:
                await asyncio.sleep(script.delay)
            await self._piece(kind, text)
            if kind == "content":
                sent_content += 1
        if self.chunks > 0 and script.delay > 0:
            await asyncio.sleep(script.delay)
        if fail_at is not None:
            return await self._fail()
        if script.tool_calls and not self.cut:
            await self._tool_calls()
        return await self._finish()

    async def _tool_calls(self) -> None:
        self.chunks += 1
        calls = [
            ("call_" + "".join(random.choices(string.ascii_lowercase + string.digits, k=8)), n, a)
            for n, a in self.script.tool_calls
        ]
        self.called = [{"id": i, "name": n, "arguments": a} for i, n, a in calls]
        if not self.stream:
            return
        if self.openai:
            for index, (call_id, name, arguments) in enumerate(calls):
                text = arguments if isinstance(arguments, str) else go_json(arguments)
                first = {"index": index, "id": call_id, "type": "function"}
                first["function"] = {"name": name, "arguments": ""}
                delta = {**self._role_delta(), "tool_calls": [first]}
                await self._write_sse(self._chunk(delta, None))
                for at in range(0, len(text), 7):
                    piece = {"index": index, "function": {"arguments": text[at : at + 7]}}
                    await self._write_sse(self._chunk({"tool_calls": [piece]}, None))
            return
        message = {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": i, "function": {"index": k, "name": n, "arguments": a}}
                for k, (i, n, a) in enumerate(calls)
            ],
        }
        line = {"model": self.model, "created_at": rfc3339_nano(), "message": message}
        await self._write(go_json({**line, "done": False}) + "\n")

    # -- output -----------------------------------------------------------------------------

    async def _write(self, data: str) -> None:
        if self.response is None:
            content_type = CT_SSE if self.openai else CT_NDJSON
            response = web.StreamResponse(
                status=200, headers={**self.script.headers, "Content-Type": content_type}
            )
            self.response = response
            await response.prepare(self.request)
        await self.response.write(data.encode())

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        if self.created is None:
            self.created = int(time.time())
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    async def _write_sse(self, payload: dict[str, Any]) -> None:
        await self._write(f"data: {go_json(payload)}\n\n")

    def _role_delta(self) -> dict[str, Any]:
        if self.role_sent:
            return {}
        self.role_sent = True
        return {"role": "assistant"}

    async def _piece(self, kind: str, text: str) -> None:
        self.chunks += 1
        (self.thinking_parts if kind == "thinking" else self.content_parts).append(text)
        if not self.stream:
            return
        if self.openai:
            delta = self._role_delta()
            if kind == "thinking":
                # A chunk never carries both: reasoning chunks have content "".
                delta.update({"content": "", "reasoning": text})
            else:
                delta["content"] = text
            await self._write_sse(self._chunk(delta, None))
            return
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        if kind == "thinking":
            message["thinking"] = text
        else:
            message["content"] = text
        line = {
            "model": self.model,
            "created_at": rfc3339_nano(),
            "message": message,
            "done": False,
        }
        await self._write(go_json(line) + "\n")

    def _metrics(self) -> dict[str, int]:
        elapsed = time.perf_counter_ns() - self.t0
        prompt_eval_duration = self.prompt_tokens * 250_000
        eval_duration = max(elapsed - self.load_ns, 0)
        metrics = {
            "total_duration": self.load_ns + prompt_eval_duration + eval_duration,
            "load_duration": self.load_ns,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": prompt_eval_duration,
            "eval_count": self.chunks,
            "eval_duration": eval_duration,
        }
        return {key: value for key, value in metrics.items() if value}  # omitempty

    def _usage(self, metrics: dict[str, int]) -> dict[str, int]:
        prompt = metrics.get("prompt_eval_count", 0)
        completion = metrics.get("eval_count", 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _error_response(self, status: int, error: str | None) -> web.Response:
        script = self.script
        message = (
            error if error is not None else _default_error(status, self.model, openai=self.openai)
        )
        if script.plain_text:
            return web.Response(
                status=status,
                body=f"{message}\n".encode(),
                headers={**script.headers, "Content-Type": CT_TEXT},
            )
        if self.openai:
            return _openai_error(status, message, script.headers)
        return _native_error(status, message, script.headers)

    async def _fail(self) -> web.StreamResponse:
        message = self.script.error_message
        if self.response is None:
            # Nothing written yet (or stream:false): the error gets a real status, 500.
            self.settle("failed")
            return self._error_response(500, message)
        if self.openai:
            # Reference section 5: the `{"error"}` line is re-encoded by the OpenAI writer as a
            # chunk of an (empty) api.ChatResponse: empty delta, no finish_reason, and the
            # error text is lost (ChatResponse has no error field), `model` is "" because the
            # error line has none. Then the stream ends: no finish chunk, no [DONE].
            chunk = self._chunk({}, None)
            chunk["model"] = ""
            await self._write_sse(chunk)
        else:
            await self._write(go_json({"error": message}) + "\n")
        self.settle("failed")
        assert self.response is not None
        await self.response.write_eof()
        return self.response

    async def _finish(self) -> web.StreamResponse:
        metrics = self._metrics()
        done_reason = "length" if self.cut else self.script.done_reason
        if self.openai:
            reason = "tool_calls" if self.called and not self.cut else done_reason
            return await self._finish_openai(metrics, reason or "stop")
        if self.stream:
            final: dict[str, Any] = {
                "model": self.model,
                "created_at": rfc3339_nano(),
                "message": {"role": "assistant", "content": ""},
                "done": True,
            }
            if done_reason:
                final["done_reason"] = done_reason
            final.update(metrics)
            await self._write(go_json(final) + "\n")
            self.settle("completed")
            assert self.response is not None
            await self.response.write_eof()
            return self.response
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content_parts)}
        if self.thinking_parts:
            message["thinking"] = "".join(self.thinking_parts)
        whole: dict[str, Any] = {
            "model": self.model,
            "created_at": rfc3339_nano(),
            "message": message,
            "done": True,
        }
        if done_reason:
            whole["done_reason"] = done_reason
        whole.update(metrics)
        self.settle("completed")
        return web.Response(
            body=go_json(whole).encode(),
            headers={**self.script.headers, "Content-Type": CT_JSON_GIN},
        )

    async def _finish_openai(self, metrics: dict[str, int], reason: str) -> web.StreamResponse:
        usage = self._usage(metrics)
        if self.stream:
            if not self.role_sent:
                # A wholly empty completion still opens with a role chunk.
                await self._write_sse(self._chunk({**self._role_delta(), "content": ""}, None))
            finish = self._chunk({}, reason)
            await self._write_sse(finish)
            if self.include_usage and self.script.usage:
                finish["choices"] = []
                finish["usage"] = usage
                await self._write_sse(finish)
            await self._write("data: [DONE]\n\n")
            self.settle("completed")
            assert self.response is not None
            await self.response.write_eof()
            return self.response
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content_parts)}
        if self.thinking_parts:
            message["reasoning"] = "".join(self.thinking_parts)
        completion = {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": message, "finish_reason": reason}],
            "usage": usage,
        }
        self.settle("completed")
        return web.Response(
            body=(go_json(completion) + "\n").encode(),
            headers={**self.script.headers, "Content-Type": CT_JSON_OPENAI},
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeModelServer:
    """A fake Ollama on 127.0.0.1 serving /api/* (NDJSON) and /v1/* (SSE), driven by Scripts.

    Counters (over generations, streamed or not; a scripted `status` error is not one):
    `completed` written to the natural end, `disconnects` client gone before the end,
    `failed` ended by a scripted mid-stream error, `errors` answered with a scripted status,
    `in_flight` / `max_in_flight` generations running now / at most at once (from the moment
    the script is taken, so `first_delay` counts).
    """

    def __init__(self, models: list[str] | None = None, *, api_key: str | None = None) -> None:
        self.models: list[str] = list(DEFAULT_MODELS) if models is None else list(models)
        self.default_num_ctx = 4096  # an Ollama on a machine with less than 24 GiB of VRAM
        self.truncated = 0  # prompts longer than their num_ctx (Ollama cut their front)
        self.images_seen: list[list[str]] = []  # each chat request's images (base64), in order
        self.api_key = api_key
        self.url = ""
        self.requests: list[Request] = []
        self.default = Script()
        self.disconnects = 0
        self.completed = 0
        self.failed = 0
        self.errors = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._queue: deque[Script] = deque()
        self._rules: list[tuple[str, Script]] = []
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self._completion_ids = 0
        self._generations: set[asyncio.Task[Any]] = set()

    # -- public API -------------------------------------------------------------------------

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        """Parsed JSON bodies of /api/chat and /v1/chat/completions requests, in order."""
        return [
            r.json
            for r in self.requests
            if r.method == "POST" and r.path in CHAT_PATHS and isinstance(r.json, dict)
        ]

    def script(self, *scripts: Script) -> None:
        """Queue scripts; each chat request that reaches the model takes the next one."""
        self._queue.extend(scripts)

    def when(self, needle: str, script: Script) -> None:
        """Every chat request with `needle` in one of its messages gets `script` (before the
        queue; a newer rule goes before older ones): a model that answers one kind of request
        the same way each time."""
        self._rules.insert(0, (needle, script))

    @property
    def pending_scripts(self) -> int:
        return len(self._queue)

    async def start(self) -> str:
        if self._runner is not None:
            return self.url
        app = web.Application(middlewares=[self._middleware])
        router = app.router
        router.add_get("/", self._root)
        router.add_get("/api/version", self._version)
        router.add_get("/api/tags", self._tags)
        router.add_post("/api/chat", self._api_chat)
        router.add_post("/api/show", self._api_show)
        router.add_post("/v1/chat/completions", self._v1_chat)
        router.add_get("/v1/models", self._v1_models)
        router.add_get("/v1/models/{model:.+}", self._v1_model)
        runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=0.25, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._stopping = False
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        # End running generations now rather than after aiohttp's graceful-shutdown wait.
        for task in list(self._generations):
            task.cancel()
        if self._generations:
            await asyncio.wait(list(self._generations), timeout=1.0)
        await runner.cleanup()

    async def __aenter__(self) -> FakeModelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- plumbing ---------------------------------------------------------------------------

    def _next_completion_id(self) -> str:
        value = self._completion_ids
        self._completion_ids = (value + 1) % 999
        return f"chatcmpl-{value}"

    def _next_script(self, messages: list[Any]) -> Script:
        said = [_content_text(m.get("content")) for m in messages if isinstance(m, dict)]
        for needle, script in self._rules:
            if any(needle in text for text in said):
                return script
        return self._queue.popleft() if self._queue else self.default

    def _has_model(self, name: str) -> bool:
        wanted = _normalize(name)
        return any(m == name or _normalize(m) == wanted for m in self.models)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        parsed: Any = None
        if body.strip():
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        self.requests.append(
            Request(
                method=request.method,
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                json=parsed,
                body=body,
            )
        )
        authorized = self.api_key is None or (
            request.headers.get("Authorization") == f"Bearer {self.api_key}"
        )
        if not authorized:
            if request.path.startswith("/v1/"):
                return _openai_error(401, "unauthorized")
            return _native_error(401, "unauthorized")
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            # gin's default for unknown routes (and, without HandleMethodNotAllowed, methods).
            return web.Response(status=404, body=b"404 page not found", content_type="text/plain")

    async def _generate(
        self,
        request: web.Request,
        model: str,
        messages: list[Any],
        *,
        openai: bool,
        stream: bool,
        include_usage: bool = False,
        cap: int | None = None,
        window: int | None = None,
    ) -> web.StreamResponse:
        script = self._next_script(messages)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        run = _Run(
            self,
            request,
            script,
            model,
            messages,
            openai=openai,
            stream=stream,
            include_usage=include_usage,
            cap=cap,
            window=window,
        )
        task = asyncio.current_task()
        if task is not None:
            self._generations.add(task)
        try:
            return await run.execute()
        except asyncio.CancelledError:
            # handler_cancellation: the client went away while we slept between chunks.
            run.settle("disconnect")
            raise
        except ConnectionResetError:
            # The write noticed first ("Cannot write to closing transport").
            run.settle("disconnect")
            return run.response if run.response is not None else web.Response(status=499)
        finally:
            run.settle("disconnect")  # no-op unless something unexpected escaped
            if task is not None:
                self._generations.discard(task)

    # -- native API -------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"Ollama is running", headers={"Content-Type": CT_TEXT})

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=go_json({"version": "0.12.6"}).encode(), headers={"Content-Type": CT_JSON_GIN}
        )

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        entries = []
        for name in self.models:
            full = _normalize(name)
            size = _model_meta(name)[3]
            entries.append(
                {
                    "name": full,
                    "model": full,
                    "modified_at": MODIFIED_AT,
                    "size": size,
                    "digest": hashlib.sha256(full.encode()).hexdigest(),
                    "details": _details(name),
                }
            )
        return web.Response(
            body=go_json({"models": entries}).encode(), headers={"Content-Type": CT_JSON_GIN}
        )

    async def _read_native_body(
        self, request: web.Request, go_type: str
    ) -> dict[str, Any] | web.Response:
        body = await request.read()
        if not body.strip():
            return _native_error(400, "missing request body")
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            return _native_error(400, _json_error_text(exc))
        if data is None:
            return {}
        if not isinstance(data, dict):
            return _native_error(
                400, f"json: cannot unmarshal {_go_type(data)} into Go value of type {go_type}"
            )
        return data

    async def _api_chat(self, request: web.Request) -> web.StreamResponse:
        data = await self._read_native_body(request, "api.ChatRequest")
        if isinstance(data, web.Response):
            return data
        for key, expected, go_name in (
            ("model", str, "string"),
            ("stream", bool, "bool"),
            ("messages", list, "[]api.Message"),
        ):
            value = data.get(key)
            if value is not None and not isinstance(value, expected):
                return _native_error(
                    400,
                    f"json: cannot unmarshal {_go_type(value)} into Go struct field "
                    f"ChatRequest.{key} of type {go_name}",
                )
        model: str = data.get("model") or ""
        if not model:
            return _native_error(400, "model is required")
        think = data.get("think")
        if isinstance(think, str) and think not in THINK_LEVELS:
            return _native_error(
                400,
                f'invalid think value: "{think}" '
                '(must be "high", "medium", "low", "max", true, or false)',
            )
        top_logprobs = data.get("top_logprobs")
        if isinstance(top_logprobs, int) and not 0 <= top_logprobs <= 20:
            return _native_error(400, "top_logprobs must be between 0 and 20")
        if not self._has_model(model):
            return _native_error(404, f"model '{model}' not found")
        if refusal := _unsupported(model, think=think, tools=data.get("tools")):
            return _native_error(400, refusal)
        messages: list[Any] = data.get("messages") or []
        if not messages:
            # Load (or, with keep_alive 0, unload) the model; one c.JSON object, no script.
            keep_alive = data.get("keep_alive")
            unload = keep_alive == 0 or (
                isinstance(keep_alive, str)
                and re.fullmatch(r"0+(\.0+)?[a-z]*", keep_alive) is not None
            )
            reply = {
                "model": model,
                "created_at": rfc3339_nano(),
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "unload" if unload else "load",
            }
            return web.Response(body=go_json(reply).encode(), headers={"Content-Type": CT_JSON_GIN})
        stream = data.get("stream") is not False  # defaults to true when omitted
        images = native_images(messages)
        if isinstance(images, str):
            return _native_error(400, images)
        if images and "vision" not in _model_meta(model)[5]:
            return _native_error(400, NO_VISION)
        self.images_seen.append(images)
        options = data.get("options")
        options = options if isinstance(options, dict) else {}
        return await self._generate(
            request,
            model,
            messages,
            openai=False,
            stream=stream,
            cap=_cap(options.get("num_predict")),
            window=_cap(options.get("num_ctx")) or self.default_num_ctx,
        )

    async def _api_show(self, request: web.Request) -> web.StreamResponse:
        data = await self._read_native_body(request, "api.ShowRequest")
        if isinstance(data, web.Response):
            return data
        model = data.get("model") or data.get("name") or ""
        if not isinstance(model, str) or not model:
            return _native_error(400, "model is required")
        if not self._has_model(model):
            return _native_error(404, f"model '{model}' not found")
        family, parameter_size, _, _, context_length, capabilities = _model_meta(model)
        show = {
            "license": "",
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM {_normalize(model)}\n',
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": _details(model),
            "model_info": {
                "general.architecture": family,
                "general.parameter_count": int(float(parameter_size.rstrip("B")) * 1e9),
                f"{family}.context_length": context_length,
            },
            "capabilities": list(capabilities),
            "modified_at": MODIFIED_AT,
        }
        return web.Response(body=go_json(show).encode(), headers={"Content-Type": CT_JSON_GIN})

    # -- OpenAI-compatible API --------------------------------------------------------------

    async def _v1_chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not body.strip():
            return _openai_error(400, "EOF", middleware=True)
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            return _openai_error(400, _json_error_text(exc), middleware=True)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            return _openai_error(
                400,
                f"json: cannot unmarshal {_go_type(data)} into Go value of type "
                "openai.ChatCompletionRequest",
                middleware=True,
            )
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            return _openai_error(400, "[] is too short - 'messages'", middleware=True)
        model = data.get("model")
        if not isinstance(model, str) or not model:
            return _openai_error(400, "model is required")
        if not self._has_model(model):
            return _openai_error(404, f'model "{model}" not found, try pulling it first')
        effort = data.get("reasoning_effort")
        think = effort not in ("none", None)
        if refusal := _unsupported(model, think=think, tools=data.get("tools")):
            return _openai_error(400, refusal)
        if orphan := _orphan_tool_result(messages):
            return _openai_error(400, orphan)
        stream = data.get("stream") is True  # defaults to false here
        images = openai_images(messages)
        if isinstance(images, str):
            return _openai_error(400, images)
        if images and "vision" not in _model_meta(model)[5]:
            return _openai_error(400, NO_VISION)
        self.images_seen.append(images)
        options = data.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        cap = data.get("max_completion_tokens") or data.get("max_tokens")
        return await self._generate(
            request,
            model,
            messages,
            openai=True,
            stream=stream,
            include_usage=include_usage,
            cap=_cap(cap),
        )

    async def _v1_models(self, request: web.Request) -> web.StreamResponse:
        data = [
            {
                "id": _normalize(name),
                "object": "model",
                "created": MODIFIED_UNIX,
                "owned_by": _namespace(name),
            }
            for name in self.models
        ]
        listing = {"object": "list", "data": data or None}  # a nil slice in Go: null
        return web.Response(
            body=(go_json(listing) + "\n").encode(), headers={"Content-Type": CT_JSON_OPENAI}
        )

    async def _v1_model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        if not self._has_model(name):
            return _openai_error(404, f"model '{name}' not found")
        model = {
            "id": name,
            "object": "model",
            "created": MODIFIED_UNIX,
            "owned_by": _namespace(name),
        }
        return web.Response(
            body=(go_json(model) + "\n").encode(), headers={"Content-Type": CT_JSON_OPENAI}
        )
