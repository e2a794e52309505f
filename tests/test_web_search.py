"""Web search as a tool: offered (with PARLEY_WEB_SEARCH) only to models that call tools; the
calls a model makes are run against a fake of Ollama's web search API, their results fed back as
`tool` messages, the progress shown, the sources listed at the end, and all of it kept in the
thread's history — through both backend kinds of the fake model server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bot.app import Parley
from bot.backends.base import ToolCall
from bot.conversation import Outcome, stop_token
from bot.settings import Settings
from bot.tools import Source, progress, sources_note, web_url
from bot.turn import ConversationKey, Turn
from tests.fakes.model_server import FakeModelServer, Script
from tests.fakes.search_server import FakeSearchServer
from tests.sinks import RecordingSink
from tests.support import make_settings

KEY = ConversationKey("slack", "T1", "C1", "1700000000.000200")
REPORT = "https://example.org/penguins"
ANSWER = ["The", " colony", " counts", " 312", " birds."]


def turn(text: str) -> Turn:
    return Turn(KEY, "U1", "ada", text, uuid.uuid4().hex)


@pytest.fixture
async def model_server() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer(["llama3.2:latest", "gemma3:latest", "qwen3:8b"]) as fake:
        yield fake


@pytest.fixture
async def search() -> AsyncIterator[FakeSearchServer]:
    async with FakeSearchServer() as fake:
        fake.add(REPORT, "Penguin colony report", "The southern penguin colony counts 312 birds.")
        fake.add("https://example.org/seals", "Seals", "Seals rest on the ice.")
        yield fake


async def open_app(
    redis_url: str, server: FakeModelServer, search: FakeSearchServer, **values: Any
) -> Parley:
    chosen: dict[str, Any] = {
        "web_search": True,
        "web_search_api_key": search.api_key,
        "web_search_url": search.url,
        "default_model": "llama3.2:latest",
        "rate_limit": "99/minute",
        **values,
    }
    return await Parley.open(make_settings(redis_url, server, **chosen))


def tool_names(request: dict[str, Any]) -> list[str]:
    return [t["function"]["name"] for t in request.get("tools") or []]


async def test_a_tool_capable_models_search_is_run_and_fed_back_with_sources(
    redis_url: str, model_server: FakeModelServer, search: FakeSearchServer
) -> None:
    search.delay = 0.3  # long enough for the reply to show what it is doing
    model_server.script(
        Script(tokens=[], tool_calls=[("web_search", {"query": "penguin colony"})]),
        Script(tokens=ANSWER),
    )
    app = await open_app(redis_url, model_server, search)
    try:
        sink = RecordingSink(min_edit_interval=0.05)
        assert await app.conversation.handle(turn("How many penguins?"), sink) == (Outcome.COMPLETE)
        first, second = model_server.chat_requests
        assert tool_names(first) == ["web_search", "web_fetch"]
        asked = {"query": "penguin colony", "max_results": 5}
        assert search.requests == [("/api/web_search", asked)]

        # the call and its result go back to the model, in Ollama's shape
        called, result = second["messages"][-2:]
        assert called["role"] == "assistant"
        assert called["tool_calls"][0]["function"] == {
            "name": "web_search",
            "arguments": {"query": "penguin colony"},
        }
        assert result["role"] == "tool" and result["tool_name"] == "web_search"
        assert REPORT in result["content"] and "312 birds" in result["content"]
        assert "Seals" not in result["content"]

        # the person saw the search while it ran, then the answer and its sources
        assert any("Searching: penguin colony" in c.text for c in sink.calls if not c.final)
        final = sink.messages[-1]
        assert final.startswith("The colony counts 312 birds.")
        assert "**Sources**\n1. [Penguin colony report](https://example.org/penguins)" in final
        assert "Searching" not in final
        assert app.metrics.tool_calls.labels("web_search", "ok")._value.get() == 1

        # a follow-up reads the calls and results from the thread's history
        model_server.script(Script(tokens=["Yes."]))
        await app.conversation.handle(turn("Is that the southern one?"), RecordingSink())
        follow = model_server.chat_requests[-1]["messages"]
        roles = [m["role"] for m in follow]
        assert roles == ["system", "user", "assistant", "tool", "assistant", "user"]
        assert follow[3]["content"] == result["content"]
        assert follow[4]["content"] == "The colony counts 312 birds."  # (no sources list)
    finally:
        await app.aclose()


async def test_an_openai_server_gets_tools_and_answers_in_its_own_shape(
    redis_url: str, model_server: FakeModelServer, search: FakeSearchServer
) -> None:
    model_server.script(
        Script(tokens=[], tool_calls=[("web_fetch", {"url": REPORT})]),
        Script(tokens=ANSWER),
    )
    app = await open_app(
        redis_url,
        model_server,
        search,
        backends=[{"name": "oai", "kind": "openai", "url": model_server.url}],
        tool_models=["llama3*"],
    )
    try:
        sink = RecordingSink(min_edit_interval=0.05)
        assert await app.conversation.handle(turn("Read the report"), sink) == Outcome.COMPLETE
        first, second = model_server.chat_requests
        assert tool_names(first) == ["web_search", "web_fetch"]
        assert search.requests == [("/api/web_fetch", {"url": REPORT})]
        called, result = second["messages"][-2:]
        (call,) = called["tool_calls"]  # arrived in pieces, sent back whole
        assert call["type"] == "function" and call["function"]["name"] == "web_fetch"
        assert call["function"]["arguments"] == '{"url": "https://example.org/penguins"}'
        assert result == {"role": "tool", "tool_call_id": call["id"], "content": result["content"]}
        assert result["content"].startswith("Penguin colony report\nURL: " + REPORT)
        assert "1. [Penguin colony report](https://example.org/penguins)" in sink.messages[-1]
    finally:
        await app.aclose()


async def test_a_model_without_tools_is_never_offered_them_nor_sent_their_history(
    redis_url: str, model_server: FakeModelServer, search: FakeSearchServer
) -> None:
    model_server.script(
        Script(tokens=[], tool_calls=[("web_search", {"query": "penguin"})]),
        Script(tokens=ANSWER),
        Script(tokens=["Seen."]),
        Script(tokens=["Plain."]),
    )
    app = await open_app(
        redis_url,
        model_server,
        search,
        backends=[
            {"name": "local", "kind": "ollama", "url": model_server.url},
            {"name": "oai", "kind": "openai", "url": model_server.url + "/v1"},
        ],
        tool_models=["gpt-*"],
    )
    try:
        await app.conversation.handle(turn("How many penguins?"), RecordingSink())
        # a model whose profile has no `tools` (Ollama would refuse them with a 400)
        await app.conversation.command(turn("model gemma3:latest"), "model", "gemma3:latest")
        sink = RecordingSink()
        assert await app.conversation.handle(turn("And seals?"), sink) == Outcome.COMPLETE
        asked = model_server.chat_requests[-1]
        assert asked["model"] == "gemma3:latest" and "tools" not in asked
        assert [m["role"] for m in asked["messages"]] == ["system", "user", "assistant", "user"]
        assert asked["messages"][2]["content"] == "The colony counts 312 birds."
        # an OpenAI-kind model no glob names
        await app.conversation.command(turn("model oai/qwen3:8b"), "model", "oai/qwen3:8b")
        await app.conversation.handle(turn("And whales?"), RecordingSink())
        asked = model_server.chat_requests[-1]
        assert "tools" not in asked
        assert all(m["role"] != "tool" for m in asked["messages"])
    finally:
        await app.aclose()


async def test_web_search_off_offers_nothing(
    redis_url: str, model_server: FakeModelServer, search: FakeSearchServer
) -> None:
    app = await open_app(redis_url, model_server, search, web_search=False)
    try:
        await app.conversation.handle(turn("hi"), RecordingSink())
        assert "tools" not in model_server.chat_requests[-1]
    finally:
        await app.aclose()


async def test_calls_stop_at_parley_tool_steps_and_the_model_answers_with_what_it_found(
    redis_url: str, model_server: FakeModelServer, search: FakeSearchServer
) -> None:
    again = Script(tokens=[], tool_calls=[("web_search", {"query": "penguin"})])
    model_server.script(again, again, again, Script(tokens=ANSWER))
    app = await open_app(redis_url, model_server, search, tool_steps=2)
    try:
        sink = RecordingSink()
        assert await app.conversation.handle(turn("Search forever"), sink) == Outcome.COMPLETE
        offered = [bool(r.get("tools")) for r in model_server.chat_requests]
        assert offered == [True, True, False]  # after two calls, asked to answer
        assert len(search.requests) == 2
        assert sink.messages[-1].startswith("Searching") is False
        assert "[Penguin colony report]" in sink.messages[-1]
    finally:
        await app.aclose()


async def test_a_failing_search_service_is_the_calls_result_and_the_reply_completes(
    redis_url: str, model_server: FakeModelServer, search: FakeSearchServer
) -> None:
    search.status = 500
    model_server.script(
        Script(tokens=[], tool_calls=[("web_search", {"query": "penguin"})]),
        Script(tokens=["I", " could", " not", " search."]),
    )
    app = await open_app(redis_url, model_server, search)
    try:
        sink = RecordingSink()
        assert await app.conversation.handle(turn("Search"), sink) == Outcome.COMPLETE
        fed = model_server.chat_requests[-1]["messages"][-1]
        assert fed["role"] == "tool"
        assert fed["content"] == "error: the search service answered HTTP 500"
        assert sink.messages[-1] == "I could not search."  # no sources, no traceback
        assert app.metrics.tool_calls.labels("web_search", "error")._value.get() == 1
    finally:
        await app.aclose()


async def test_a_refused_key_and_odd_calls_become_results_the_model_reads(
    redis_url: str, model_server: FakeModelServer, search: FakeSearchServer
) -> None:
    model_server.script(
        Script(
            tokens=[],
            tool_calls=[
                ("web_search", {"query": "penguin"}),
                ("launch_rockets", {}),
                ("web_fetch", {"url": "file:///etc/passwd"}),
                ("web_search", {"query": "   "}),
            ],
        ),
        Script(tokens=["Done."]),
    )
    app = await open_app(redis_url, model_server, search, web_search_api_key="wrong", tool_steps=10)
    try:
        await app.conversation.handle(turn("Go"), RecordingSink())
        results = [m["content"] for m in model_server.chat_requests[-1]["messages"][-4:]]
        assert results == [
            "error: web search is unavailable (its key was refused)",
            "error: there is no tool named 'launch_rockets'",
            "error: `url` must be an http(s) URL",
            "error: `query` is required",
        ]
        assert len(search.requests) == 0  # (refused before it was read)
    finally:
        await app.aclose()


def test_web_search_without_a_key_stops_start_up_naming_the_setting() -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, web_search=True)  # type: ignore[call-arg]
    assert "PARLEY_WEB_SEARCH: needs an Ollama API key" in str(raised.value)
    with pytest.raises(ValidationError, match="PARLEY_WEB_SEARCH_URL"):
        Settings(_env_file=None, web_search_url="ftp://x")  # type: ignore[call-arg]
    chosen = Settings(_env_file=None, web_search=True, ollama_api_key="k")  # type: ignore[call-arg]
    assert chosen.search_key() is not None  # OLLAMA_API_KEY serves


def test_progress_names_the_query_or_the_site() -> None:
    assert progress(ToolCall("c", "web_search", {"query": "a  b\nc"})) == "🔎 Searching: a b c…"
    assert progress(ToolCall("c", "web_fetch", {"url": REPORT})) == "🌐 Reading example.org…"
    assert progress(ToolCall("c", "web_fetch", None)) == "🌐 Reading a page…"


@settings(max_examples=150, deadline=None)
@given(title=st.text(max_size=120), path=st.text(max_size=40))
def test_a_sources_list_of_any_titles_is_one_clean_link_each(title: str, path: str) -> None:
    url = web_url("https://example.org/" + path.replace(" ", "%20"))
    sources = [Source(title, url)] if url else []
    note = sources_note([*sources, Source("Other", "https://example.com/x(1)")])
    lines = note.splitlines()
    assert lines[0] == "**Sources**"
    for line in lines[1:]:
        label, _, target = line.partition("](")
        assert label.count("[") == 1 and "]" not in label
        assert target.endswith(")") and "(" not in target[:-1] and ")" not in target[:-1]


async def test_regenerate_replaces_the_whole_exchange_with_its_tool_calls(
    redis_url: str, model_server: FakeModelServer, search: FakeSearchServer
) -> None:
    model_server.script(
        Script(tokens=[], tool_calls=[("web_search", {"query": "penguin"})]),
        Script(tokens=ANSWER),
        Script(tokens=["Again", " without", " searching."]),
    )
    app = await open_app(redis_url, model_server, search)
    try:
        asked = turn("How many penguins?")
        await app.conversation.handle(asked, RecordingSink())
        assert len(await app.state.history(KEY)) == 4  # question, call, result, answer
        again = RecordingSink()
        outcome = await app.conversation.regenerate(stop_token(asked), turn(""), again)
        assert outcome == Outcome.COMPLETE
        history = await app.state.history(KEY)
        assert [e.role for e in history] == ["user", "assistant"]
        assert history[1].content == "Again without searching."
        sent = model_server.chat_requests[-1]["messages"]
        assert [m["role"] for m in sent] == ["system", "user"]  # asked afresh
    finally:
        await app.aclose()
