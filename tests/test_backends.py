"""Both backends against the fake Ollama: chunks, typed errors, cancellation, timeouts, catalogs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.backends.base import Backend, Chunk, Content, Done, Message, Thinking, Timeouts
from bot.backends.ollama import chunks_of
from bot.backends.openai import deltas_of, usage_of
from bot.errors import (
    BackendBadRequest,
    BackendBusy,
    BackendError,
    BackendStreamError,
    BackendTimeout,
    BackendUnauthorized,
    BackendUnreachable,
    BackendUsageLimit,
    ModelNotFound,
    describe,
)
from bot.markdown import clean_text
from tests.fakes.model_server import FakeModelServer, Script
from tests.support import closed_url, make_backend, until

KEY = "sk-test-never-shown-4242"
HELLO = [Message("user", "hello")]
KINDS = ["ollama", "openai"]


@pytest.fixture(params=KINDS)
async def backend(
    request: pytest.FixtureRequest, model_server: FakeModelServer
) -> AsyncIterator[Backend]:
    made = make_backend(request.param, model_server.url)
    yield made
    await made.aclose()


async def collect(backend: Backend, model: str = "llama3.2") -> list[Chunk]:
    return [chunk async for chunk in backend.chat(model, HELLO)]


# --- streaming ------------------------------------------------------------------------------


async def test_content_chunks_arrive_in_order_then_done_with_token_counts(
    backend: Backend, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=["Hel", "lo", " there", "!"]))
    chunks = await collect(backend)
    assert chunks[:-1] == [Content("Hel"), Content("lo"), Content(" there"), Content("!")]
    done = chunks[-1]
    assert isinstance(done, Done)
    assert done.reason == "stop"
    assert done.prompt_tokens > 0
    assert done.completion_tokens == 4


async def test_done_carries_the_servers_finish_reason(
    backend: Backend, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=["cut"], done_reason="length"))
    chunks = await collect(backend)
    assert chunks[-1] == Done(
        reason="length",
        prompt_tokens=chunks[-1].prompt_tokens,  # type: ignore[union-attr]
        completion_tokens=1,
        eval_seconds=chunks[-1].eval_seconds,  # type: ignore[union-attr]
    )


async def test_thinking_chunks_come_before_content(
    backend: Backend, model_server: FakeModelServer
) -> None:
    model_server.script(Script(thinking=["Hmm", " let me see"], tokens=["Yes", "."]))
    chunks = await collect(backend)
    assert chunks[:-1] == [Thinking("Hmm"), Thinking(" let me see"), Content("Yes"), Content(".")]
    assert isinstance(chunks[-1], Done)


async def test_the_request_carries_model_messages_and_asks_for_a_stream(
    backend: Backend, model_server: FakeModelServer
) -> None:
    await collect(backend, "qwen3:8b")
    [body] = model_server.chat_requests
    assert body["model"] == "qwen3:8b"
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["stream"] is True


async def test_a_mid_stream_error_raises_after_the_partial_content(
    backend: Backend, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=["one", " two", " three"], fail_after=2))
    seen: list[Chunk] = []
    with pytest.raises(BackendStreamError) as caught:
        async for chunk in backend.chat("llama3.2", HELLO):
            seen.append(chunk)
    assert seen == [Content("one"), Content(" two")]
    assert caught.value.backend == backend.name
    assert describe(caught.value).startswith("The model stopped with an error")


async def test_ollama_mid_stream_error_keeps_the_servers_message(
    model_server: FakeModelServer,
) -> None:
    backend = make_backend("ollama", model_server.url)
    model_server.script(Script(tokens=["a", "b"], fail_after=1, error_message="CUDA out of memory"))
    try:
        with pytest.raises(BackendStreamError, match="CUDA out of memory"):
            await collect(backend)
    finally:
        await backend.aclose()


# --- errors before output -------------------------------------------------------------------


async def test_unknown_model_is_model_not_found(backend: Backend) -> None:
    with pytest.raises(ModelNotFound) as caught:
        await collect(backend, "no-such-model:1b")
    error = caught.value
    assert (error.backend, error.model) == (backend.name, "no-such-model:1b")
    text = describe(error)
    assert "`no-such-model:1b`" in text
    assert backend.name in text


async def test_scripted_404_is_model_not_found(
    backend: Backend, model_server: FakeModelServer
) -> None:
    model_server.script(Script(status=404))
    with pytest.raises(ModelNotFound):
        await collect(backend)


@pytest.mark.parametrize("plain_text", [False, True], ids=["json", "plain-text"])
async def test_401_is_unauthorized_and_the_sentence_hides_the_key(
    model_server: FakeModelServer, plain_text: bool, kind: str
) -> None:
    backend = make_backend(kind, model_server.url, api_key=KEY)
    model_server.script(Script(status=401, plain_text=plain_text))
    try:
        with pytest.raises(BackendUnauthorized) as caught:
            await collect(backend)
    finally:
        await backend.aclose()
    text = describe(caught.value)
    assert "rejected" in text
    assert backend.name in text
    assert KEY not in text
    assert KEY not in str(caught.value)
    assert KEY not in repr(caught.value)


async def test_429_is_usage_limit_with_the_servers_message_and_retry_after(
    backend: Backend, model_server: FakeModelServer
) -> None:
    message = "you (alice) have reached your weekly usage limit, upgrade for higher limits"
    model_server.script(Script(status=429, error=message, headers={"Retry-After": "120"}))
    with pytest.raises(BackendUsageLimit) as caught:
        await collect(backend)
    assert caught.value.message == message
    assert caught.value.retry_after == 120
    text = describe(caught.value)
    assert message in text
    assert "2 minutes" in text


async def test_402_empty_balance_is_a_usage_limit(
    backend: Backend, model_server: FakeModelServer
) -> None:
    model_server.script(Script(status=402))
    with pytest.raises(BackendUsageLimit, match="balance is empty"):
        await collect(backend)


async def test_503_is_busy(backend: Backend, model_server: FakeModelServer) -> None:
    model_server.script(Script(status=503))
    with pytest.raises(BackendBusy) as caught:
        await collect(backend)
    assert "busy" in describe(caught.value)


async def test_400_is_bad_request_with_the_servers_reason(
    backend: Backend, model_server: FakeModelServer
) -> None:
    reason = '"llama3.2" does not support thinking'
    model_server.script(Script(status=400, error=reason))
    with pytest.raises(BackendBadRequest) as caught:
        await collect(backend)
    assert caught.value.message == reason
    assert reason in describe(caught.value)


async def test_a_closed_port_is_unreachable(kind: str) -> None:
    backend = make_backend(kind, closed_url(), api_key=KEY)
    try:
        with pytest.raises(BackendUnreachable) as caught:
            await collect(backend)
        with pytest.raises(BackendUnreachable):
            await backend.list_models()
    finally:
        await backend.aclose()
    assert "can't reach" in describe(caught.value)
    assert KEY not in describe(caught.value)


async def test_each_error_gets_its_own_sentence_without_the_key(
    model_server: FakeModelServer, kind: str
) -> None:
    backend = make_backend(kind, model_server.url, api_key=KEY)
    model_server.api_key = KEY
    model_server.script(
        Script(status=404),
        Script(status=401),
        Script(status=429),
        Script(status=503),
        Script(status=400),
        Script(tokens=["a", "b"], fail_after=1),
    )
    sentences: dict[type[BaseException], str] = {}
    try:
        for _ in range(6):
            with pytest.raises(BackendError) as caught:
                await collect(backend)
            sentences[type(caught.value)] = describe(caught.value)
    finally:
        await backend.aclose()
    assert set(sentences) == {
        ModelNotFound,
        BackendUnauthorized,
        BackendUsageLimit,
        BackendBusy,
        BackendBadRequest,
        BackendStreamError,
    }
    assert len(set(sentences.values())) == 6
    assert all(KEY not in text for text in sentences.values())


# --- leaving early, timeouts ----------------------------------------------------------------


async def test_leaving_the_stream_early_disconnects_so_generation_stops(
    backend: Backend, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=[f"t{i} " for i in range(40)], delay=0.05))
    seen = []
    async with contextlib.aclosing(backend.chat("llama3.2", HELLO)) as chunks:  # type: ignore[type-var]
        async for chunk in chunks:
            seen.append(chunk)
            if len(seen) == 2:
                break
    assert seen == [Content("t0 "), Content("t1 ")]
    await until(lambda: model_server.disconnects == 1, within=2.0)
    assert model_server.completed == 0


async def test_no_first_chunk_in_time_is_a_timeout(
    model_server: FakeModelServer, kind: str
) -> None:
    backend = make_backend(
        kind, model_server.url, timeouts=Timeouts(connect=1, first_chunk=0.2, idle=5)
    )
    model_server.script(Script(first_delay=1))
    started = time.monotonic()
    try:
        with pytest.raises(BackendTimeout) as caught:
            await collect(backend)
    finally:
        await backend.aclose()
    assert time.monotonic() - started < 0.9
    assert "took too long" in describe(caught.value)


# --- catalogs and auth ----------------------------------------------------------------------


async def test_list_models_names_every_model(
    backend: Backend, model_server: FakeModelServer
) -> None:
    assert await backend.list_models() == ["llama3.2:latest", "qwen3:8b"]


async def test_list_models_of_an_empty_server_is_empty(kind: str) -> None:
    async with FakeModelServer(models=[]) as empty:  # /v1/models answers `"data": null`
        backend = make_backend(kind, empty.url)
        try:
            assert await backend.list_models() == []
        finally:
            await backend.aclose()


async def test_an_openai_server_that_reports_no_usage_is_counted_a_token_a_chunk(
    model_server: FakeModelServer,
) -> None:
    """llama-cpp-python's server sends no usage chunk even when asked: the completion's tokens
    are its chunks (a token each), so budgets and metrics still count its replies."""
    model_server.script(Script(tokens=["Hel", "lo", " there", "!"], usage=False))
    backend = make_backend("openai", model_server.url)
    try:
        done = (await collect(backend))[-1]
    finally:
        await backend.aclose()
    assert isinstance(done, Done)
    assert done.completion_tokens == 4 and done.prompt_tokens == 0


async def test_openai_url_that_already_ends_in_v1_is_not_doubled(
    model_server: FakeModelServer,
) -> None:
    backend = make_backend("openai", model_server.url + "/v1")
    try:
        assert await backend.list_models() == ["llama3.2:latest", "qwen3:8b"]
        chunks = await collect(backend)
        assert "".join(c.text for c in chunks if isinstance(c, Content)) == "You said: hello"
    finally:
        await backend.aclose()
    assert [r.path for r in model_server.requests] == ["/v1/models", "/v1/chat/completions"]


async def test_the_bearer_header_is_sent_only_with_an_api_key(
    model_server: FakeModelServer, kind: str
) -> None:
    keyless = make_backend(kind, model_server.url)
    keyed = make_backend(kind, model_server.url, api_key=KEY)
    try:
        await keyless.list_models()
        await collect(keyless)
        await keyed.list_models()
        await collect(keyed)
    finally:
        await keyless.aclose()
        await keyed.aclose()
    auth = [r.headers.get("authorization") for r in model_server.requests]
    assert auth == [None, None, f"Bearer {KEY}", f"Bearer {KEY}"]


async def test_a_server_that_wants_a_key_refuses_a_keyless_backend(kind: str) -> None:
    async with FakeModelServer(api_key=KEY) as locked:
        backend = make_backend(kind, locked.url)
        try:
            with pytest.raises(BackendUnauthorized):
                await backend.list_models()
            with pytest.raises(BackendUnauthorized):
                await collect(backend)
        finally:
            await backend.aclose()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- model output is untrusted --------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
OLLAMA_LINES = JSON | st.fixed_dictionaries(
    {},
    optional={
        "message": JSON | st.fixed_dictionaries({}, optional={"content": JSON, "thinking": JSON}),
        "done": JSON,
        "done_reason": JSON,
        "eval_count": JSON,
        "prompt_eval_count": JSON,
        "eval_duration": JSON,
    },
)
OPENAI_CHUNKS = JSON | st.fixed_dictionaries(
    {},
    optional={
        "choices": JSON
        | st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "delta": JSON
                    | st.fixed_dictionaries({}, optional={"content": JSON, "reasoning": JSON}),
                    "finish_reason": JSON,
                },
            ),
            max_size=2,
        ),
        "usage": JSON,
    },
)


def assert_clean(chunks: list[Chunk]) -> None:
    for chunk in chunks:
        if isinstance(chunk, Content | Thinking):
            assert chunk.text == clean_text(chunk.text)
            chunk.text.encode("utf-8")  # whatever the model sent, it can be sent on


@settings(max_examples=300, deadline=None)
@given(line=OLLAMA_LINES)
def test_any_ollama_line_is_clean_chunks_or_malformed_output(line: object) -> None:
    with contextlib.suppress(BackendStreamError):
        assert_clean(chunks_of(line, "local"))


@settings(max_examples=300, deadline=None)
@given(data=OPENAI_CHUNKS)
def test_any_openai_chunk_is_clean_chunks_or_malformed_output(data: object) -> None:
    with contextlib.suppress(BackendStreamError):
        usage_of(data, {}, "box")
        assert isinstance(data, dict)
        assert_clean([chunk for chunk, _ in deltas_of(data, "box") if chunk is not None])
