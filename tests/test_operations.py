"""Stopping a reply, draining on shutdown, metrics: through the real pipeline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bot.app import Parley
from bot.conversation import Outcome, stop_token
from tests.fakes.model_server import FakeModelServer, Script
from tests.sinks import RecordingSink
from tests.support import make_settings, turn, until


@pytest.fixture
def model_server(model_server: FakeModelServer) -> FakeModelServer:
    """The shared fake server, answering every question at length: long enough to stop."""
    model_server.default = Script(tokens=["word "] * 400, delay=0.01)
    return model_server


@pytest.fixture
async def open_parley(
    redis_url: str, model_server: FakeModelServer
) -> AsyncIterator[Callable[..., Awaitable[Parley]]]:
    opened: list[Parley] = []

    async def factory(**extra: object) -> Parley:
        app = await Parley.open(make_settings(redis_url, model_server, **extra))
        opened.append(app)
        return app

    yield factory
    for app in opened:
        await app.aclose()


async def test_the_asker_can_stop_a_reply_and_generation_stops_upstream(
    open_parley: Callable[..., Awaitable[Parley]], model_server: FakeModelServer
) -> None:
    parley = await open_parley()
    sink = RecordingSink(min_edit_interval=0.05)
    asked = turn("long please")
    task = asyncio.create_task(parley.conversation.handle(asked, sink))
    await until(lambda: len(sink.edits) >= 1)
    refused = await parley.conversation.stop(stop_token(asked), user_id="U2")
    assert refused == "Only the person who asked (or an admin) can stop this reply."
    assert await parley.conversation.stop(stop_token(asked), user_id="U1") is None
    assert await task is Outcome.STOPPED
    assert sink.messages[-1].endswith("_⏹ Stopped._")
    await until(lambda: model_server.disconnects == 1)
    history = await parley.state.history(asked.key)
    assert history[-1].role == "assistant" and history[-1].content.startswith("word")
    again = await parley.conversation.stop(stop_token(asked), user_id="U1")
    assert again == "That reply has already finished."


async def test_a_stop_pressed_on_another_replica_reaches_the_reply(
    open_parley: Callable[..., Awaitable[Parley]], model_server: FakeModelServer
) -> None:
    replica_a, replica_b = await open_parley(), await open_parley()
    await asyncio.sleep(0.1)  # both stop listeners subscribed
    sink = RecordingSink(min_edit_interval=0.05)
    asked = turn("long please")
    task = asyncio.create_task(replica_a.conversation.handle(asked, sink))
    await until(lambda: len(sink.edits) >= 1)
    assert await replica_b.conversation.stop(stop_token(asked), user_id="UX", is_admin=True) is None
    assert await asyncio.wait_for(task, 5) is Outcome.STOPPED


async def test_drain_lets_short_replies_finish_and_stops_the_rest_within_the_grace(
    open_parley: Callable[..., Awaitable[Parley]], model_server: FakeModelServer
) -> None:
    parley = await open_parley(rate_limit="100/minute", max_in_flight=50, backend_concurrency=50)
    sinks = [RecordingSink(min_edit_interval=0.2) for _ in range(20)]
    short = Script(tokens=["done"], delay=0.01)
    model_server.script(*([short] * 5))  # five finish at once, fifteen would take 4 s
    tasks = [
        asyncio.create_task(
            parley.conversation.handle(turn("go", user=f"U{i}", thread=f"t{i}"), sinks[i])
        )
        for i in range(20)
    ]
    await until(lambda: all(s.calls for s in sinks))
    started = time.monotonic()
    await parley.conversation.drain(grace=1.5)
    assert time.monotonic() - started < 1.5
    outcomes = await asyncio.gather(*tasks)
    assert outcomes.count(Outcome.COMPLETE) == 5
    assert outcomes.count(Outcome.STOPPED) == 15
    for sink in sinks:
        assert sink.calls[-1].final  # every message reached its final state
    late = RecordingSink()
    assert await parley.conversation.handle(turn("hello?"), late) is Outcome.REFUSED
    assert "restarting" in late.notices[0]


async def test_metrics_count_a_scripted_conversation(
    open_parley: Callable[..., Awaitable[Parley]], model_server: FakeModelServer
) -> None:
    parley = await open_parley(rate_limit="2/minute")
    model_server.script(Script(tokens=["a ", "b"]), Script(status=503))
    await parley.conversation.handle(turn("one"), RecordingSink())
    await parley.conversation.handle(turn("two"), RecordingSink())
    await parley.conversation.handle(turn("three"), RecordingSink())  # over the rate
    text = parley.metrics.render().decode()
    assert 'parley_replies_total{outcome="complete",platform="slack"} 1.0' in text
    assert 'parley_replies_total{outcome="error",platform="slack"} 1.0' in text
    assert 'parley_backend_errors_total{backend="local",kind="BackendBusy"} 1.0' in text
    assert 'parley_user_rate_limited_total{platform="slack"} 1.0' in text
    assert "parley_time_to_first_token_seconds_count 1.0" in text
    assert "parley_time_to_first_visible_seconds_count 1.0" in text
    assert "parley_edits_per_reply_count 2.0" in text
    assert "parley_generations_in_flight 0.0" in text


def test_log_lines_are_json_with_the_turn_id_when_not_on_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json
    import logging

    from bot.logs import setup_logging, turn_id

    setup_logging("INFO", json_lines=True)
    token = turn_id.set("abc123")
    try:
        logging.getLogger("parley.test").info("replied")
    finally:
        turn_id.reset(token)
        logging.getLogger().handlers.clear()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["msg"] == "replied" and line["turn"] == "abc123" and line["level"] == "info"
