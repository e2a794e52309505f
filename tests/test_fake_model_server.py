"""Wire-level tests of the fake model server, with raw httpx (no Ollama client in between)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.fakes.model_server import FakeModelServer, Script, word_pieces

CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
METRICS = {
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
}
HELLO = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello world"}]}


@pytest.fixture
async def client(model_server: FakeModelServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=model_server.url, timeout=5.0) as client:
        yield client


async def ndjson(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """POST /api/chat and split the body strictly: every line ends in \\n, none is blank."""
    response = await client.post("/api/chat", json=body)
    raw = response.content
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert all(line.strip() for line in lines), raw
    return response, [json.loads(line) for line in lines]


async def sse(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    """POST /v1/chat/completions; return the `data:` payloads of the events."""
    response = await client.post("/v1/chat/completions", json=body)
    text = response.text
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events), text
    return response, [event.removeprefix("data: ") for event in events]


def assert_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.json() == {"error": message}


def assert_openai_error(response: httpx.Response, status: int, kind: str, message: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "error": {"message": message, "type": kind, "param": None, "code": None}
    }


# -- /api/chat streaming ------------------------------------------------------------------------


def test_word_pieces_keep_spaces() -> None:
    assert word_pieces("You said: hello world") == ["You", " said:", " hello", " world"]
    assert "".join(word_pieces("You said: ")) == "You said: "


async def test_ndjson_framing_defaults_to_stream(
    model_server: FakeModelServer, client: httpx.AsyncClient
) -> None:
    response, chunks = await ndjson(client, HELLO)  # no "stream" key: streams
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    *parts, final = chunks
    assert [c["message"]["content"] for c in parts] == ["You", " said:", " hello", " world"]
    for chunk in parts:
        assert set(chunk) == {"model", "created_at", "message", "done"}
        assert chunk["model"] == "llama3.2"
        assert CREATED_AT.match(chunk["created_at"]), chunk["created_at"]
        assert chunk["done"] is False
        assert set(chunk["message"]) == {"role", "content"}
        assert chunk["message"]["role"] == "assistant"
    assert final["done"] is True
    assert final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert set(final) == {"model", "created_at", "message", "done", "done_reason"} | METRICS
    assert all(isinstance(final[k], int) and final[k] > 0 for k in METRICS)
    assert final["eval_count"] == 4
    assert model_server.completed == 1
    assert model_server.in_flight == 0
    assert model_server.chat_requests == [HELLO]


async def test_thinking_chunks_come_first(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.script(Script(thinking=["Hmm", ", ok"], tokens=["Hi", "!"], done_reason="length"))
    _, chunks = await ndjson(client, {**HELLO, "model": "qwen3:8b"})
    messages = [c["message"] for c in chunks[:-1]]
    assert messages == [
        {"role": "assistant", "content": "", "thinking": "Hmm"},
        {"role": "assistant", "content": "", "thinking": ", ok"},
        {"role": "assistant", "content": "Hi"},
        {"role": "assistant", "content": "!"},
    ]
    assert chunks[-1]["done_reason"] == "length"
    assert chunks[-1]["eval_count"] == 4


async def test_zero_metrics_are_omitted(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=[]))
    _, chunks = await ndjson(client, HELLO)
    assert len(chunks) == 1
    assert chunks[0]["done"] is True
    assert "eval_count" not in chunks[0]


async def test_stream_false_is_one_json_object(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.script(Script(thinking=["a", "b"], tokens=["x", "y"]))
    response = await client.post("/api/chat", json={**HELLO, "stream": False})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["message"] == {"role": "assistant", "content": "xy", "thinking": "ab"}
    assert body["done"] is True
    assert body["done_reason"] == "stop"
    assert body["eval_count"] == 4
    assert set(body) >= METRICS


async def test_mid_stream_error_keeps_status_200(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=["a", "b", "c"], fail_after=2))
    response, chunks = await ndjson(client, HELLO)
    assert response.status_code == 200
    assert [c["message"]["content"] for c in chunks[:2]] == ["a", "b"]
    assert chunks[2] == {"error": "an error was encountered while running the model"}
    assert len(chunks) == 3
    assert not any(c.get("done") for c in chunks)
    assert model_server.failed == 1
    assert model_server.completed == 0


async def test_failure_before_any_output_is_a_real_500(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=["a"], fail_after=0, error_message="boom"))
    assert_error(await client.post("/api/chat", json=HELLO), 500, "boom")


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "invalid request"),
        (401, "unauthorized"),
        (402, "extra usage balance is empty, add extra usage"),
        (
            403,
            "this model requires a subscription, upgrade for access: https://ollama.com/upgrade",
        ),
        (404, "model 'llama3.2' not found"),
        (
            429,
            "you (user) have reached your session usage limit, upgrade for higher limits: "
            "https://ollama.com/upgrade",
        ),
        (500, "internal error"),
        (502, "dial tcp: lookup ollama.com: no such host"),
        (503, "server busy, please try again.  maximum pending requests exceeded"),
    ],
)
async def test_scripted_status_before_output(
    client: httpx.AsyncClient, model_server: FakeModelServer, status: int, message: str
) -> None:
    model_server.script(Script(status=status, headers={"Retry-After": "7"}))
    response = await client.post("/api/chat", json={**HELLO, "stream": True})
    assert_error(response, status, message)
    assert response.headers["retry-after"] == "7"
    assert model_server.errors == 1


async def test_scripts_are_consumed_in_order(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.script(Script(status=429, error="slow down"), Script(tokens=["ok"]))
    assert_error(await client.post("/api/chat", json=HELLO), 429, "slow down")
    _, chunks = await ndjson(client, HELLO)
    assert chunks[0]["message"]["content"] == "ok"
    _, chunks = await ndjson(client, HELLO)  # queue empty: default echo
    assert chunks[0]["message"]["content"] == "You"


async def test_plain_text_401(client: httpx.AsyncClient, model_server: FakeModelServer) -> None:
    model_server.script(Script(status=401, plain_text=True))
    response = await client.post("/api/chat", json=HELLO)
    assert response.status_code == 401
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.content == b"unauthorized\n"


async def test_request_validation(client: httpx.AsyncClient) -> None:
    assert_error(
        await client.post("/api/chat", json={**HELLO, "model": "nope"}),
        404,
        "model 'nope' not found",
    )
    assert_error(
        await client.post("/api/chat", json={**HELLO, "model": ""}), 400, "model is required"
    )
    assert_error(await client.post("/api/chat"), 400, "missing request body")
    assert_error(
        await client.post("/api/chat", content=b"{nope"),
        400,
        "invalid character 'n' looking for beginning of value",
    )
    assert_error(
        await client.post("/api/chat", json={**HELLO, "think": "huge"}),
        400,
        'invalid think value: "huge" (must be "high", "medium", "low", "max", true, or false)',
    )
    # "llama3.2" and "llama3.2:latest" are the same model.
    response = await client.post("/api/chat", json={**HELLO, "model": "llama3.2:latest"})
    assert response.status_code == 200


async def test_empty_messages_loads_the_model(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat", json={"model": "llama3.2", "messages": []})
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["done"] is True
    assert body["done_reason"] == "load"
    assert body["message"] == {"role": "assistant", "content": ""}
    response = await client.post("/api/chat", json={"model": "llama3.2", "keep_alive": 0})
    assert response.json()["done_reason"] == "unload"


# -- cancellation, concurrency ------------------------------------------------------------------


async def test_client_disconnect_is_counted(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=[f" t{i}" for i in range(100)], delay=0.02))
    async with client.stream("POST", "/api/chat", json=HELLO) as response:
        lines = response.aiter_lines()
        assert json.loads(await anext(lines))["message"]["content"] == " t0"
        assert json.loads(await anext(lines))["message"]["content"] == " t1"
    for _ in range(200):  # poll up to 2 s
        if model_server.disconnects == 1:
            break
        await asyncio.sleep(0.01)
    assert model_server.disconnects == 1
    assert model_server.completed == 0
    assert model_server.in_flight == 0


async def test_stop_ends_streams_promptly_without_counting_disconnects() -> None:
    server = FakeModelServer()
    await server.start()
    server.script(Script(tokens=["a", "b"], delay=5.0))
    async with (
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("POST", "/api/chat", json=HELLO) as response,
    ):
        lines = response.aiter_lines()
        assert json.loads(await anext(lines))["message"]["content"] == "a"
        async with asyncio.timeout(1):
            await server.stop()
        with pytest.raises(httpx.RemoteProtocolError):
            await anext(lines)
    assert server.disconnects == 0
    assert server.in_flight == 0


async def test_in_flight_is_tracked(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.default = Script(tokens=["x"], first_delay=0.1)
    responses = await asyncio.gather(*(client.post("/api/chat", json=HELLO) for _ in range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert model_server.max_in_flight == 3
    assert model_server.in_flight == 0
    assert model_server.completed == 3


# -- info endpoints -----------------------------------------------------------------------------


async def test_tags_shape(client: httpx.AsyncClient, model_server: FakeModelServer) -> None:
    response = await client.get("/api/tags")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    models = response.json()["models"]
    assert [m["name"] for m in models] == ["llama3.2:latest", "qwen3:8b"]
    for entry in models:
        assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
        assert entry["model"] == entry["name"]
        assert isinstance(entry["size"], int)
        assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"])
        details = entry["details"]
        assert set(details) == {
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        }
        assert details["parent_model"] == ""
        assert details["format"] == "gguf"
        assert details["families"] == [details["family"]]
    head = await client.head("/api/tags")
    assert head.status_code == 200
    assert head.content == b""

    model_server.models = ["mistral"]
    assert [m["name"] for m in (await client.get("/api/tags")).json()["models"]] == [
        "mistral:latest"
    ]
    model_server.models.clear()
    assert (await client.get("/api/tags")).json() == {"models": []}


async def test_version_and_root(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/version")).json() == {"version": "0.12.6"}
    root = await client.get("/")
    assert root.text == "Ollama is running"
    missing = await client.get("/api/nothing")
    assert missing.status_code == 404


# -- OpenAI-compatible API ----------------------------------------------------------------------


async def test_v1_sse_shape(client: httpx.AsyncClient, model_server: FakeModelServer) -> None:
    model_server.script(Script(thinking=["Hmm"], tokens=["Hi", " there"]))
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    response, events = await sse(client, body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert re.fullmatch(r"chatcmpl-\d{1,3}", chunks[0]["id"])
    assert len({c["created"] for c in chunks}) == 1
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "llama3.2"
        assert chunk["system_fingerprint"] == "fp_ollama"
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas == [
        {"role": "assistant", "content": "", "reasoning": "Hmm"},
        {"content": "Hi"},
        {"content": " there"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "stop"]
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 3
    assert usage["usage"]["total_tokens"] == (
        usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    )


async def test_v1_sse_without_usage(client: httpx.AsyncClient) -> None:
    _, events = await sse(client, {**HELLO, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "usage" not in chunks[-1]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "You"}


async def test_v1_mid_stream_error_has_no_finish_or_done(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=["a", "b", "c"], fail_after=1))
    response, events = await sse(client, {**HELLO, "stream": True})
    assert response.status_code == 200
    assert "[DONE]" not in events
    chunks = [json.loads(event) for event in events]
    assert chunks[0]["choices"][0]["delta"]["content"] == "a"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["delta"] == {}


async def test_v1_non_streaming_is_default(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.script(Script(thinking=["r"], tokens=["Hi"]))
    response = await client.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["system_fingerprint"] == "fp_ollama"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi", "reasoning": "r"},
            "finish_reason": "stop",
        }
    ]
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


async def test_v1_errors(client: httpx.AsyncClient, model_server: FakeModelServer) -> None:
    assert_openai_error(
        await client.post("/v1/chat/completions", json={**HELLO, "model": "nope"}),
        404,
        "not_found_error",
        'model "nope" not found, try pulling it first',
    )
    assert_openai_error(
        await client.post("/v1/chat/completions", json={"model": "llama3.2", "messages": []}),
        400,
        "invalid_request_error",
        "[] is too short - 'messages'",
    )
    model_server.script(Script(status=429, headers={"Retry-After": "30"}))
    response = await client.post("/v1/chat/completions", json={**HELLO, "stream": True})
    assert_openai_error(
        response,
        429,
        "api_error",
        "you (user) have reached your session usage limit, upgrade for higher limits: "
        "https://ollama.com/upgrade",
    )
    assert response.headers["retry-after"] == "30"


async def test_v1_models(client: httpx.AsyncClient, model_server: FakeModelServer) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["llama3.2:latest", "qwen3:8b"]
    for model in body["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert model["owned_by"] == "library"
    model_server.models = []
    response = await client.get("/v1/models")
    assert response.json() == {"object": "list", "data": None}
    assert b'"data":null' in response.content


# -- auth, recording ----------------------------------------------------------------------------


async def test_api_key_is_enforced() -> None:
    async with (
        FakeModelServer(api_key="sekrit") as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        assert_error(await client.get("/api/tags"), 401, "unauthorized")
        assert_error(await client.post("/api/chat", json=HELLO), 401, "unauthorized")
        assert_openai_error(await client.get("/v1/models"), 401, "api_error", "unauthorized")
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.get("/api/tags", headers=wrong)).status_code == 401
        good = {"Authorization": "Bearer sekrit"}
        assert (await client.get("/api/tags", headers=good)).status_code == 200
        assert (await client.post("/api/chat", json=HELLO, headers=good)).status_code == 200
        assert server.requests[-1].headers["authorization"] == "Bearer sekrit"
        assert server.completed == 1
