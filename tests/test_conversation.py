"""The one path every message takes, end to end: real Redis, real HTTP, a fake model server."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bot.app import Parley
from bot.conversation import Outcome, stop_token
from bot.embedded_redis import EmbeddedRedis
from bot.errors import StateUnavailable, describe
from bot.turn import ConversationKey, EditBudget, Turn
from tests.fakes.model_server import FakeModelServer, Script, count_tokens
from tests.sinks import RecordingSink
from tests.support import make_settings, redis_errors_told, until

KEY = ConversationKey("slack", "T1", "C1", "1700000000.000100")


def turn(text: str, *, user: str = "U1", name: str = "ada", key: ConversationKey = KEY) -> Turn:
    return Turn(key, user, name, text, uuid.uuid4().hex)


@pytest.fixture
async def model_server() -> AsyncIterator[FakeModelServer]:
    """This module's fake server has a third model, to switch to."""
    async with FakeModelServer(["llama3.2:latest", "qwen3:8b", "gemma3:4b"]) as fake:
        yield fake


@pytest.fixture
async def parley(redis_url: str, model_server: FakeModelServer) -> AsyncIterator[Parley]:
    app = await Parley.open(make_settings(redis_url, model_server))
    yield app
    await app.aclose()


async def test_a_message_is_answered_and_remembered(
    parley: Parley, model_server: FakeModelServer
) -> None:
    sink = RecordingSink(min_edit_interval=0.05)
    assert await parley.conversation.handle(turn("hello there"), sink) is Outcome.COMPLETE
    assert sink.messages == ["You said: hello there"]
    sink2 = RecordingSink(min_edit_interval=0.05)
    await parley.conversation.handle(turn("and again"), sink2)
    sent = model_server.chat_requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[0]["content"] == "Be brief."
    assert sent[1]["content"] == "hello there"
    assert sent[2]["content"] == "You said: hello there"


async def test_mid_stream_error_keeps_the_partial_text_and_says_what_happened(
    parley: Parley, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=["The ", "first ", "half ", "never ", "ends"], fail_after=3))
    sink = RecordingSink(min_edit_interval=0.05)
    assert await parley.conversation.handle(turn("go"), sink) is Outcome.ERROR
    (final,) = sink.messages
    assert final.startswith("The first half")
    assert "an error was encountered while running the model" in final
    history = await parley.state.history(KEY)
    assert history[-1].content == "The first half "  # the partial answer is kept


@pytest.mark.parametrize(
    ("script", "words"),
    [
        (Script(status=404), "isn't available"),
        (Script(status=401), "rejected Parley's API key"),
        (Script(status=429, headers={"Retry-After": "120"}), "usage limit"),
        (Script(status=503), "busy"),
    ],
)
async def test_each_backend_error_gets_its_own_clear_message(
    parley: Parley, model_server: FakeModelServer, script: Script, words: str
) -> None:
    model_server.script(script)
    sink = RecordingSink()
    assert await parley.conversation.handle(turn("hi"), sink) is Outcome.ERROR
    assert words in sink.messages[-1]
    assert "⚠️" in sink.messages[-1]


async def test_usage_limit_message_keeps_the_servers_words_and_the_retry_time(
    parley: Parley, model_server: FakeModelServer
) -> None:
    model_server.script(Script(status=429, headers={"Retry-After": "120"}))
    sink = RecordingSink()
    await parley.conversation.handle(turn("hi"), sink)
    assert "session usage limit" in sink.messages[-1]
    assert "2 minutes" in sink.messages[-1]


async def test_unknown_model_suggests_close_matches(
    parley: Parley, model_server: FakeModelServer
) -> None:
    await parley.state.set_preference(KEY, "model", "qwen3:4b")  # e.g. a model since removed
    sink = RecordingSink()
    await parley.conversation.handle(turn("hi"), sink)
    assert "`qwen3:8b`" in sink.messages[-1]
    assert "/model" in sink.messages[-1]


async def test_model_switch_is_validated_and_persists(
    redis_url: str, model_server: FakeModelServer
) -> None:
    first = await Parley.open(make_settings(redis_url, model_server))
    reply = await first.conversation.command(turn(""), "model", "qwen")
    assert "Did you mean `qwen3:8b`" in reply.text
    reply = await first.conversation.command(turn(""), "model", "qwen3:8b")
    assert reply.current == "qwen3:8b"
    await first.aclose()
    second = await Parley.open(make_settings(redis_url, model_server))  # a restart
    await second.conversation.handle(turn("hi"), RecordingSink())
    assert model_server.chat_requests[-1]["model"] == "qwen3:8b"
    listing = await second.conversation.command(turn(""), "model", "")
    assert "`qwen3:8b` ← current" in listing.text
    assert listing.models == ["llama3.2:latest", "qwen3:8b", "gemma3:4b"]
    await second.aclose()


async def test_text_commands_work_where_slash_commands_cannot(
    parley: Parley, model_server: FakeModelServer
) -> None:
    await parley.conversation.handle(turn("remember me"), RecordingSink())
    sink = RecordingSink()
    assert await parley.conversation.handle(turn("model gemma3:4b"), sink) is Outcome.COMMAND
    assert "gemma3:4b" in sink.messages[0]
    assert await parley.conversation.handle(turn("reset"), RecordingSink()) is Outcome.COMMAND
    assert await parley.state.history(KEY) == []
    sink = RecordingSink()
    await parley.conversation.handle(turn("help me write a poem about help"), sink)
    assert sink.messages == ["You said: help me write a poem about help"]  # not a command


async def test_a_retried_event_is_answered_once(
    parley: Parley, model_server: FakeModelServer
) -> None:
    once = turn("hello")
    outcomes = await asyncio.gather(
        *(parley.conversation.handle(once, RecordingSink()) for _ in range(3))
    )
    assert sorted(outcomes) == sorted([Outcome.COMPLETE, Outcome.DUPLICATE, Outcome.DUPLICATE])
    assert len(model_server.chat_requests) == 1


async def test_a_user_over_the_rate_is_told_when_to_come_back(
    redis_url: str, model_server: FakeModelServer
) -> None:
    app = await Parley.open(make_settings(redis_url, model_server, rate_limit="2/minute"))
    try:
        for _ in range(2):
            await app.conversation.handle(turn("hi"), RecordingSink())
        sink = RecordingSink()
        assert await app.conversation.handle(turn("hi"), sink) is Outcome.REFUSED
        assert sink.messages == []
        (notice,) = sink.notices
        assert "Try again in" in notice and "seconds" in notice
        # someone else is not limited by it
        other = RecordingSink()
        await app.conversation.handle(turn("hi", user="U2", name="bob"), other)
        assert other.messages
    finally:
        await app.aclose()


async def test_an_oversized_message_gets_a_short_answer(
    redis_url: str, model_server: FakeModelServer
) -> None:
    app = await Parley.open(make_settings(redis_url, model_server, max_input_chars=100))
    try:
        sink = RecordingSink()
        assert await app.conversation.handle(turn("x" * 101), sink) is Outcome.REFUSED
        assert "101 characters; the limit is 100" in sink.notices[0]
        assert model_server.chat_requests == []
    finally:
        await app.aclose()


async def test_two_messages_in_one_thread_never_interleave_their_history(
    parley: Parley, model_server: FakeModelServer
) -> None:
    model_server.default = Script(delay=0.02)
    await asyncio.gather(
        parley.conversation.handle(turn("one", user="U1"), RecordingSink()),
        parley.conversation.handle(turn("two", user="U2", name="bob"), RecordingSink()),
    )
    roles = [e.role for e in await parley.state.history(KEY)]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert model_server.max_in_flight == 1


async def test_the_model_sees_who_said_what_in_a_thread_with_several_people(
    parley: Parley, model_server: FakeModelServer
) -> None:
    await parley.conversation.handle(turn("I like tea", user="U1", name="ada"), RecordingSink())
    await parley.conversation.handle(turn("I like coffee", user="U2", name="bob"), RecordingSink())
    sent = model_server.chat_requests[-1]["messages"]
    assert sent[1]["content"] == "ada: I like tea"
    assert sent[-1]["content"] == "bob: I like coffee"


async def test_history_is_trimmed_to_the_context_budget_keeping_system_and_newest(
    redis_url: str, model_server: FakeModelServer
) -> None:
    app = await Parley.open(
        make_settings(
            redis_url,
            model_server,
            context_tokens=400,
            reply_reserve_tokens=100,
            rate_limit="99/minute",
            summaries=False,  # (tests/test_summaries.py: what no longer fits, summarised)
        )
    )
    try:
        for i in range(12):
            await app.conversation.handle(turn(f"message {i} " + "x" * 200), RecordingSink())
        sent = model_server.chat_requests[-1]["messages"]
        assert sent[0]["role"] == "system"
        assert sent[-1]["content"].startswith("message 11")
        # what the model counts (its num_ctx less the reply's cap), at the rate it measured
        assert model_server.chat_requests[-1]["options"]["num_ctx"] == 400
        assert sum(count_tokens(m["content"]) + 4 for m in sent) <= 400 - 100
        assert len(sent) < 24
        assert model_server.truncated == 0
    finally:
        await app.aclose()


async def test_a_cancelled_turn_is_finalised_as_stopped(
    parley: Parley, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=["word "] * 200, delay=0.02))
    sink = RecordingSink(min_edit_interval=0.05)
    task = asyncio.create_task(parley.conversation.handle(turn("long"), sink))
    for _ in range(200):
        if sink.edits:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sink.messages[-1].endswith("_⏹ Stopped._")
    assert sink.calls[-1].final
    for _ in range(100):
        if model_server.disconnects:
            break
        await asyncio.sleep(0.01)
    assert model_server.disconnects == 1  # closing the stream stopped generation upstream


async def test_a_question_with_lone_surrogates_and_control_characters_gets_a_normal_answer(
    parley: Parley, model_server: FakeModelServer
) -> None:
    # valid JSON escapes a platform may deliver: a lone surrogate, NUL, other control characters
    sink = RecordingSink(min_edit_interval=0.05)
    asked = turn("broken \ud800 text\x00 with\x07 bells\r\nand a new line")
    assert await parley.conversation.handle(asked, sink) is Outcome.COMPLETE
    assert sink.messages == ["You said: broken \ufffd text with bells\nand a new line"]
    sent = model_server.chat_requests[-1]["messages"][-1]["content"]
    assert sent == "broken \ufffd text with bells\nand a new line"


async def test_a_failure_nobody_anticipated_still_frees_the_thread_slot_and_stop_owner(
    parley: Parley, redis_client: aioredis.Redis
) -> None:
    # a key of the wrong type where the thread's history should be: the first round trip takes
    # the de-dup mark, the thread lock and the Stop owner, then reading the history fails
    await redis_client.set(f"parley:hist:{{{KEY.tag}}}", "not a list")
    sink = RecordingSink(min_edit_interval=0.05)
    assert await parley.conversation.handle(turn("hello"), sink) is Outcome.ERROR
    assert sink.messages and sink.calls[-1].final  # the person is told
    for pattern in ("parley:lock:*", "parley:busy:*", "parley:turn:*"):
        assert await redis_client.keys(pattern) == [], pattern
    await redis_client.delete(f"parley:hist:{{{KEY.tag}}}")
    again = RecordingSink(min_edit_interval=0.05)
    assert await parley.conversation.handle(turn("next"), again) is Outcome.COMPLETE


async def test_redis_lost_while_a_reply_streams_the_reply_ends_and_says_it_is_not_remembered(
    model_server: FakeModelServer, own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    parley = await Parley.open(make_settings(own_redis.url, model_server))
    try:
        model_server.script(Script(tokens=["word "] * 40, delay=0.02))
        budget = EditBudget("slack:chat.update:T1", 50, 60.0)
        sink = RecordingSink(min_edit_interval=0.05, budget=budget)
        answering = asyncio.create_task(parley.conversation.handle(turn("go on"), sink))
        await until(lambda: len(sink.edits) >= 1)
        await own_redis.stop()  # the edit budget and then the history are out of reach
        assert await answering is Outcome.COMPLETE
        assert sink.messages == [("word " * 40).rstrip()]  # the whole reply, in its final state
        assert sink.notices == [describe(StateUnavailable(after_reply=True))]

        await own_redis.start()
        again = RecordingSink(min_edit_interval=0.05, budget=budget)
        assert await parley.conversation.handle(turn("back?"), again) is Outcome.COMPLETE
    finally:
        await parley.aclose()
    # the edit budget, the buttons' record, then saving: one line each, no traceback
    assert redis_errors_told(caplog.records) == 3


# --- channel and user controls --------------------------------------------------------------


async def test_a_channels_prompt_is_set_shown_and_reset_and_reaches_the_model(
    parley: Parley, model_server: FakeModelServer
) -> None:
    said = RecordingSink()
    await parley.conversation.handle(turn("prompt You are a pirate.\nAnswer in rhymes."), said)
    assert said.messages == [
        "This channel's prompt is now:\n\n> You are a pirate.\n> Answer in rhymes."
    ]
    await parley.conversation.handle(turn("ahoy"), RecordingSink())
    system = model_server.chat_requests[-1]["messages"][0]
    assert system == {"role": "system", "content": "You are a pirate.\nAnswer in rhymes."}
    shown = RecordingSink()
    await parley.conversation.handle(turn("prompt"), shown)
    assert "> You are a pirate." in shown.messages[0]
    await parley.conversation.handle(turn("prompt default"), RecordingSink())
    await parley.conversation.handle(turn("hello"), RecordingSink())
    assert model_server.chat_requests[-1]["messages"][0]["content"] == "Be brief."
    long = RecordingSink()
    await parley.conversation.handle(turn("prompt " + "x" * 5000), long)
    assert "the limit is 4,000" in long.messages[0]


async def test_a_person_over_their_token_budget_is_refused_until_it_resets(
    redis_url: str, model_server: FakeModelServer
) -> None:
    app = await Parley.open(make_settings(redis_url, model_server, token_budget="10/day"))
    try:
        first = RecordingSink()
        assert await app.conversation.handle(turn("tell me a story"), first) is Outcome.COMPLETE
        over = RecordingSink()
        assert await app.conversation.handle(turn("and another"), over) is Outcome.REFUSED
        usage = await app.conversation.command(turn(""), "usage", "")
        other = RecordingSink()
        asked_by_bob = turn("hello", user="U2", name="bob")
        assert await app.conversation.handle(asked_by_bob, other) is Outcome.COMPLETE
        metrics = app.metrics.render().decode()
    finally:
        await app.aclose()
    done = model_server.chat_requests  # two requests: ada's first, then bob's
    assert len(done) == 2
    assert over.notices[0].startswith("You've used your 10 tokens for this day. It resets in")
    assert usage.text.startswith("You've used ") and "of your 10 tokens for this day" in usage.text
    assert 'parley_tokens_total{backend="local",kind="completion",model="llama3.2:latest"}' in (
        metrics
    )


async def test_other_bots_are_ignored_unless_allowed_and_then_only_a_few_turns_in_a_row(
    redis_url: str, model_server: FakeModelServer
) -> None:
    def from_a_bot(text: str) -> Turn:
        return Turn(KEY, "B0OTHER", "otherbot", text, uuid.uuid4().hex, from_bot=True)

    ignoring = await Parley.open(make_settings(redis_url, model_server))
    try:
        assert await ignoring.conversation.handle(from_a_bot("hi"), RecordingSink()) is (
            Outcome.IGNORED
        )
    finally:
        await ignoring.aclose()
    app = await Parley.open(make_settings(redis_url, model_server, allow_bots=True, bot_turns=2))
    try:
        outcomes = [
            await app.conversation.handle(from_a_bot(f"bot {n}"), RecordingSink()) for n in range(3)
        ]
        assert outcomes == [Outcome.COMPLETE, Outcome.COMPLETE, Outcome.IGNORED]
        # a person in the thread ends the run: the bot is answered again
        await app.conversation.handle(turn("a person here"), RecordingSink())
        again = await app.conversation.handle(from_a_bot("bot 3"), RecordingSink())
    finally:
        await app.aclose()
    assert again is Outcome.COMPLETE
    assert len(model_server.chat_requests) == 4


async def test_regenerate_answers_the_last_question_again_in_place_of_its_answer(
    parley: Parley, model_server: FakeModelServer, redis_client: aioredis.Redis
) -> None:
    first, second = turn("what is Redis?"), turn("and Valkey?")
    sink = RecordingSink()
    await parley.conversation.handle(first, sink)
    await parley.conversation.handle(second, RecordingSink())
    assert sink.calls[-1].frame is not None and sink.calls[-1].frame.controls  # the buttons

    older = RecordingSink()
    refused = await parley.conversation.regenerate(stop_token(first), turn(""), older)
    assert refused is Outcome.REFUSED
    assert older.notices == ["Only the newest answer in a thread can be regenerated."]

    again = RecordingSink()
    outcome = await parley.conversation.regenerate(stop_token(second), turn(""), again)
    assert outcome is Outcome.COMPLETE and again.messages == ["You said: and Valkey?"]
    asked = model_server.chat_requests[-1]["messages"]
    assert [m["content"] for m in asked[1:]] == [
        "what is Redis?",
        "You said: what is Redis?",
        "and Valkey?",
    ]
    stored = await redis_client.lrange(f"parley:hist:{{{KEY.tag}}}", 0, -1)
    assert len(stored) == 4  # replaced, not appended


async def test_feedback_is_one_vote_per_person_and_reply_counted_by_model(
    parley: Parley,
) -> None:
    asked = turn("rate me")
    await parley.conversation.handle(asked, RecordingSink())
    token = stop_token(asked)
    for user, vote in (("U1", "up"), ("U1", "down"), ("U2", "up"), ("U2", "up")):
        assert await parley.conversation.feedback(token, user_id=user, vote=vote) is None
    assert await parley.conversation.feedback("slack:gone", user_id="U1", vote="up") == (
        "That answer is too old for feedback."
    )
    metrics = parley.metrics.render().decode()
    model = 'model="llama3.2:latest"'
    assert f'parley_feedback_total{{{model},vote="up"}} 2.0' in metrics
    assert f'parley_feedback_total{{{model},vote="down"}} 1.0' in metrics
    assert f'parley_feedback_retracted_total{{{model},vote="up"}} 1.0' in metrics
