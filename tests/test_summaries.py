"""Summaries of long threads: what no longer fits the window is folded into a summary after the
reply, kept in Redis with the thread and sent ahead of the remaining turns; one fold per span,
on any replica; a failed fold leaves the history as it was."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from bot.app import Parley
from bot.conversation import Outcome
from bot.prompt import SUMMARY_HEADING
from bot.state import HistoryEntry, Summary
from bot.summary import INSTRUCTIONS, RETRY_AFTER, Fold, span, summary_cap
from bot.turn import ConversationKey, Turn
from tests.fakes.model_server import FakeModelServer, Script, count_tokens
from tests.sinks import RecordingSink
from tests.support import make_settings, until

KEY = ConversationKey("slack", "T1", "C1", "1700000000.000100")
FILLER = "the penguins of the southern colony walk to the sea every morning " * 4
SUMMARY = ["Ada", " asked", " about", " the", " penguins", " (ticket", " P-17)."]


def turn(text: str, key: ConversationKey = KEY) -> Turn:
    return Turn(key, "U1", "ada", text, uuid.uuid4().hex)


async def open_app(redis_url: str, server: FakeModelServer, **values: Any) -> Parley:
    settings = make_settings(
        redis_url,
        server,
        context_tokens=700,
        reply_reserve_tokens=100,
        rate_limit="99/minute",
        **values,
    )
    return await Parley.open(settings)


def folds(server: FakeModelServer) -> list[dict[str, Any]]:
    """The summary requests the model server saw."""
    return [
        r
        for r in server.chat_requests
        if any(INSTRUCTIONS in str(m.get("content")) for m in r["messages"])
    ]


def answers(server: FakeModelServer) -> list[dict[str, Any]]:
    return [r for r in server.chat_requests if r not in folds(server)]


async def six_exchanges(app: Parley) -> None:
    """A thread of six long exchanges, stored as the turns would have stored them."""
    for i in range(6):
        said = f"question {i}: {FILLER}"
        await app.state.append(
            KEY, HistoryEntry("user", said, "U1", "ada"), HistoryEntry("assistant", said)
        )


async def stored(app: Parley, key: ConversationKey = KEY) -> tuple[list[bytes], Summary]:
    return await app.state.whole_history(key)


async def test_a_thread_longer_than_its_window_keeps_a_summary_and_the_request_carries_it(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.when(INSTRUCTIONS, Script(tokens=SUMMARY))
    app = await open_app(redis_url, model_server)
    try:
        for i in range(8):
            sink = RecordingSink()
            assert await app.conversation.handle(turn(f"question {i}: {FILLER}"), sink) == (
                Outcome.COMPLETE
            )
            await app.conversation.summaries.wait()
        raw, summary = await stored(app)
        assert summary.text == "".join(SUMMARY)
        assert summary.folded > 0 and summary.model == "llama3.2:latest"
        assert len(raw) + summary.folded == 16  # every turn is kept, or stands in the summary
        assert len(raw) < 16

        # the first fold read the oldest turns, and its own reply was capped
        first = folds(model_server)[0]
        assert "question 0:" in first["messages"][-1]["content"]
        assert first["options"]["num_predict"] == summary_cap(700)

        # every later request carries the summary ahead of the turns that remain
        last = answers(model_server)[-1]["messages"]
        assert last[0]["role"] == "system"
        assert SUMMARY_HEADING in last[0]["content"]
        assert "".join(SUMMARY) in last[0]["content"]
        assert "question 7:" in last[-1]["content"]
        assert last[1]["role"] == "user"
        # and fits the window it declares
        window = answers(model_server)[-1]["options"]["num_ctx"]
        assert sum(count_tokens(m["content"]) + 4 for m in last) <= window - 100
        assert model_server.truncated == 0
        # the last exchange before the question is never folded away
        assert "question 6:" in "".join(m["content"] for m in last)
    finally:
        await app.aclose()


async def test_a_later_fold_builds_on_the_summary_so_far(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.when(INSTRUCTIONS, Script(tokens=SUMMARY))
    app = await open_app(redis_url, model_server)
    try:
        for i in range(12):
            await app.conversation.handle(turn(f"question {i}: {FILLER}"), RecordingSink())
            await app.conversation.summaries.wait()
        asked = folds(model_server)
        assert len(asked) >= 2
        assert "The summary so far:\n" + "".join(SUMMARY) in asked[-1]["messages"][-1]["content"]
        assert "question 0:" not in asked[-1]["messages"][-1]["content"]  # folded once only
    finally:
        await app.aclose()


async def test_the_reply_never_waits_for_its_summary(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.when(INSTRUCTIONS, Script(tokens=SUMMARY, first_delay=1.5))
    app = await open_app(redis_url, model_server)
    try:
        asked = 0
        while not app.conversation.summaries.running:  # until a reply starts a fold
            assert asked < 8
            await app.conversation.handle(turn(f"question {asked}: {FILLER}"), RecordingSink())
            asked += 1
        await until(lambda: bool(folds(model_server)))  # the summary is being written
        sink = RecordingSink()
        started = time.monotonic()
        assert await app.conversation.handle(turn(f"question {asked}: {FILLER}"), sink) == (
            Outcome.COMPLETE
        )
        assert time.monotonic() - started < 1.0  # the thread was not held by the fold
        assert app.conversation.summaries.running > 0
        assert f"question {asked}:" in sink.text
        await app.conversation.summaries.wait()
        raw, summary = await stored(app)
        assert summary.text == "".join(SUMMARY)
        # the fold did not lose the turn answered while it ran
        assert any(f"question {asked}:".encode() in r for r in raw)
    finally:
        await app.aclose()


async def test_a_failed_summary_leaves_the_history_as_it_was_and_lets_the_thread_rest(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.when(INSTRUCTIONS, Script(status=500))
    app = await open_app(redis_url, model_server)
    try:
        for i in range(7):
            await app.conversation.handle(turn(f"question {i}: {FILLER}"), RecordingSink())
            await app.conversation.summaries.wait()
        raw, summary = await stored(app)
        assert summary == Summary()
        assert len(raw) == 14  # nothing dropped, nothing folded
        # the model that failed was asked once: the thread's later turns let it rest
        assert len(folds(model_server)) == 1
        rest = await app.state.redis.pttl(app.state.folding_key(KEY))
        assert 0 < rest <= RETRY_AFTER * 1000
        # once the rest is over (here: at once), the next turn tries again, and succeeds
        await app.state.redis.delete(app.state.folding_key(KEY))
        model_server.when(INSTRUCTIONS, Script(tokens=SUMMARY))
        await app.conversation.handle(turn(f"question 7: {FILLER}"), RecordingSink())
        await app.conversation.summaries.wait()
        assert (await stored(app))[1].text == "".join(SUMMARY)
    finally:
        await app.aclose()


async def test_two_replicas_never_fold_the_same_span_twice(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.when(INSTRUCTIONS, Script(tokens=SUMMARY, first_delay=0.3))
    one = await open_app(redis_url, model_server, summaries=False)
    two = await open_app(redis_url, model_server, summaries=False)
    try:
        await six_exchanges(one)
        fold = Fold(KEY, "llama3.2:latest", budget_tokens=400)
        done = await asyncio.gather(
            one.conversation.summaries.fold(fold), two.conversation.summaries.fold(fold)
        )
        assert sorted(done) == [False, True]
        assert len(folds(model_server)) == 1
        raw, summary = await stored(one)
        assert len(raw) + summary.folded == 12
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_history_that_moved_on_during_the_fold_is_not_folded(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.when(INSTRUCTIONS, Script(tokens=SUMMARY, first_delay=0.5))
    app = await open_app(redis_url, model_server, summaries=False)
    try:
        await six_exchanges(app)
        folding = asyncio.create_task(
            app.conversation.summaries.fold(Fold(KEY, "llama3.2:latest", budget_tokens=400))
        )
        await until(lambda: bool(folds(model_server)))
        await app.state.forget(KEY)  # `forget` while the summary is written
        await app.state.append(KEY, HistoryEntry("user", "a new start", "U1", "ada"))
        assert await folding is False
        raw, summary = await stored(app)
        assert summary == Summary() and len(raw) == 1
    finally:
        await app.aclose()


async def test_parley_summary_model_writes_the_summaries(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.when(INSTRUCTIONS, Script(tokens=SUMMARY))
    app = await open_app(redis_url, model_server, summary_model="qwen3:8b")
    try:
        for i in range(6):
            await app.conversation.handle(turn(f"question {i}: {FILLER}"), RecordingSink())
            await app.conversation.summaries.wait()
        (asked, *_) = folds(model_server)
        assert asked["model"] == "qwen3:8b"
        assert asked.get("think") is False  # a thinking model is asked not to, for a summary
        assert (await stored(app))[1].model == "qwen3:8b"
    finally:
        await app.aclose()


def test_a_fold_keeps_the_newest_exchange_and_starts_the_rest_with_a_question() -> None:
    said = "x" * 400  # 104 tokens at 4 characters a token
    entries = [HistoryEntry("user" if i % 2 == 0 else "assistant", said) for i in range(10)]
    fold = Fold(KEY, "m", budget_tokens=450)  # room for two entries
    n = span(entries, fold)
    assert n == 8 and entries[n].role == "user"
    assert span(entries[:2], Fold(KEY, "m", budget_tokens=10)) == 0  # never the last exchange
    uneven = [HistoryEntry("assistant", said), *entries]
    assert uneven[span(uneven, fold)].role == "user"
