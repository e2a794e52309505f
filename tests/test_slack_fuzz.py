"""Hostile and malformed input on Slack, generated: unsigned and forged HTTP requests, signed
bodies of every shape, broken events, Socket Mode envelopes — against the real slack-bolt app.

Whatever arrives: no traceback in the logs, no 5xx, nothing posted for an invalid request, the
process still answers /healthz and a normal mention, and no lock, in-flight slot or Stop owner
is left in Redis. One Parley per test, many examples each; PARLEY_FUZZ_EXAMPLES sets how many
(the suite's default keeps it to seconds).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.slack import MODEL_SELECT, STOP_ACTION
from bot.markdown import CURSOR, PLACEHOLDER, clean_text
from tests.fakes.model_server import FakeModelServer
from tests.fakes.slack import BOT_USER_ID, TEAM_ID, FakeSlack
from tests.support import Bot, slack_bot, until

EXAMPLES = int(os.environ.get("PARLEY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CHANNEL = "C0GENERAL"
HELD = ("parley:lock:*", "parley:busy:*", "parley:turn:*")
# one person asks every example, in one workspace: the per-person rate and the workspace's
# chat.update budget are not what is tested here (a long run would spend them)
UNLIMITED = {"rate_limit": "100000/minute", "max_in_flight": 50, "slack_update_budget": 100000}

# any Unicode, lone surrogates, NUL and control characters included
ODD_TEXT = st.text(st.characters(exclude_categories=[]), max_size=60) | st.sampled_from(
    ["\ud800", "a\x00b", "\x1b[2J", "\r\n", "‮evil", "<!here>", "@channel", "x" * 5000]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=16,
)
_ts = itertools.count(1)


def new_ts() -> str:
    return f"1800000000.{next(_ts):06d}"


def body_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()  # lone surrogates travel as JSON escapes, as they may


def mention(text: str = "hello") -> dict[str, Any]:
    return {
        "type": "app_mention",
        "channel": CHANNEL,
        "ts": new_ts(),
        "user": "U0ALICE",
        "team": TEAM_ID,
        "text": f"<@{BOT_USER_ID}> {text}",
    }


def callback(event: Any) -> dict[str, Any]:
    return {"type": "event_callback", "team_id": TEAM_ID, "event_id": "Ev1", "event": event}


@st.composite
def broken_mentions(draw: st.DrawFn) -> dict[str, Any]:
    """A mention with one field Parley needs missing or of the wrong type or size."""
    event = mention()
    field = draw(st.sampled_from(["channel", "ts", "type", "user", "text", "thread_ts"]))
    if field in ("channel", "ts", "type") and draw(st.booleans()):
        del event[field]
        return event
    wrong = JSON.filter(lambda v: not isinstance(v, str) and v is not None)
    if field == "ts":
        wrong = wrong | st.sampled_from(["", "abc", "1.2.3", "9" * 40])
    if field == "channel":
        wrong = wrong | st.sampled_from(["", "C 1", "C" * 100, "<!here>"])
    if field == "text":
        wrong = st.just("x" * 40_001) | JSON.filter(lambda v: not isinstance(v, str | None))
    event[field] = draw(wrong)
    return event


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake


async def nothing_held(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:

        async def clear() -> bool:
            return all([not await client.keys(pattern) for pattern in HELD])

        await until(clear, within=10)
    finally:
        await client.aclose()


async def still_serving(slack: FakeSlack, bot: Bot, base_url: str) -> None:
    """/healthz answers and a normal mention is answered, after everything else."""
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{base_url}/healthz")).status_code == 200
    asked = mention("are you still there?")
    status, _ = await slack.post_event(bot.events_url, callback(asked))
    assert status == 200
    await slack.wait_for(
        lambda: (
            [m.text for m in slack.thread(CHANNEL, asked["ts"])]
            == ["You said: are you still there?"]
        ),
        within=10,
    )


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage()[:200] for r in caplog.records if r.exc_info] == []


@pytest.fixture
async def http_bot(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> AsyncIterator[tuple[Bot, str]]:
    async with slack_bot(slack, model_server, redis_url, "http", **UNLIMITED) as bot:
        yield bot, bot.events_url.removesuffix("/slack/events")


# --- HTTP mode ------------------------------------------------------------------------------


@FUZZ
@given(
    body=st.binary(max_size=3000) | JSON.map(body_bytes),
    content_type=st.sampled_from(
        ["application/json", "application/x-www-form-urlencoded", "text/plain", ""]
    ),
    signing=st.sampled_from(
        ["none", "wrong secret", "stale", "future", "garbage timestamp", "odd signature"]
    ),
)
async def test_unsigned_or_forged_requests_get_a_4xx_and_nothing_else(
    http_bot: tuple[Bot, str],
    slack: FakeSlack,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    content_type: str,
    signing: str,
) -> None:
    bot, _ = http_bot
    caplog.set_level(logging.DEBUG)
    now = int(time.time())
    headers = {"Content-Type": content_type}
    stamps = {"stale": now - 301, "future": now + 301}
    match signing:
        case "wrong secret":
            headers["X-Slack-Request-Timestamp"] = str(now)
            headers["X-Slack-Signature"] = slack.signature(body, secret="x", timestamp=str(now))
        case "stale" | "future":
            stamp = str(stamps[signing])
            headers["X-Slack-Request-Timestamp"] = stamp
            headers["X-Slack-Signature"] = slack.signature(body, timestamp=stamp)
        case "garbage timestamp":
            headers["X-Slack-Request-Timestamp"] = "12ab"
            headers["X-Slack-Signature"] = slack.signature(body, timestamp="12ab")
        case "odd signature":
            headers["X-Slack-Request-Timestamp"] = str(now)
            headers["X-Slack-Signature"] = "v0=ünïcödé"
    status, _ = await slack.post_raw(bot.events_url, body, headers)
    assert 400 <= status < 500
    assert slack.calls_to("chat.postMessage") == []
    no_tracebacks(caplog)
    # the request's body never reaches the log (one line: the reason and the size)
    if len(body) > 20:
        assert all(repr(body[:20])[2:-1] not in r.getMessage() for r in caplog.records)


@FUZZ
@given(
    value=JSON
    | st.builds(callback, JSON)
    | st.builds(callback, broken_mentions())
    | st.builds(lambda e: {**callback(e), "authorizations": "x", "team": 7}, broken_mentions()),
    form=st.booleans(),
)
async def test_signed_bodies_of_any_shape_are_refused_or_acknowledged_never_a_5xx(
    http_bot: tuple[Bot, str],
    slack: FakeSlack,
    caplog: pytest.LogCaptureFixture,
    value: Any,
    form: bool,
) -> None:
    bot, _ = http_bot
    if form:  # an interaction or a slash command of any shape
        fields = {"payload" if isinstance(value, dict) else "x": json.dumps(value)}
        status, _ = await slack.post_form(bot.events_url, fields)
    else:
        status, _ = await slack.post_http(bot.events_url, json.dumps(value), "application/json")
    assert status < 500
    assert slack.calls_to("chat.postMessage") == []
    no_tracebacks(caplog)


@FUZZ
@given(
    command=st.sampled_from(["/model", "/reset", "/parley", "/other"]),
    fields=st.dictionaries(
        st.sampled_from(["text", "channel_id", "user_id", "team_id", "response_url"]), ODD_TEXT
    ),
)
async def test_signed_slash_commands_with_odd_fields_never_fail(
    http_bot: tuple[Bot, str],
    slack: FakeSlack,
    caplog: pytest.LogCaptureFixture,
    command: str,
    fields: dict[str, str],
) -> None:
    bot, _ = http_bot
    form = {"command": command, "channel_id": CHANNEL, "user_id": "U0ALICE", **fields}
    raw = urlencode({k: v.encode("utf-8", "surrogatepass") for k, v in form.items()})
    status, _ = await slack.post_http(bot.events_url, raw, "application/x-www-form-urlencoded")
    assert status < 500
    no_tracebacks(caplog)


async def test_after_a_fuzz_run_nothing_is_held_and_parley_still_answers(
    http_bot: tuple[Bot, str],
    slack: FakeSlack,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Broken events of each kind, then a normal mention: answered, and nothing left held."""
    bot, base_url = http_bot
    broken = [
        {k: v for k, v in mention().items() if k != "channel"},
        {**mention(), "ts": "abc"},
        {**mention(), "user": ["U0ALICE"]},
        {**mention(), "text": {"a": 1}},
        {**mention(), "text": "x" * 40_001},
        {**mention(), "thread_ts": 5},
    ]
    for value in [[], 42, None, "text", {"type": 5}, callback([]), *map(callback, broken)]:
        status, _ = await slack.post_http(bot.events_url, json.dumps(value), "application/json")
        assert status < 500
    await still_serving(slack, bot, base_url)
    await nothing_held(redis_url)
    no_tracebacks(caplog)


@settings(
    max_examples=max(10, EXAMPLES // 10),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=ODD_TEXT.filter(lambda t: clean_text(t).strip() and len(t) < 2000), extra=JSON)
async def test_a_valid_question_in_an_odd_shape_is_answered(
    http_bot: tuple[Bot, str],
    slack: FakeSlack,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    text: str,
    extra: Any,
) -> None:
    bot, _ = http_bot
    asked = {**mention(text), "unknown_field": extra, "blocks": extra}
    status, _ = await slack.post_event(bot.events_url, callback(asked))
    assert status == 200

    def final() -> bool:
        shown = [m.text for m in slack.thread(CHANNEL, asked["ts"])]
        return bool(shown) and shown[-1] != PLACEHOLDER and not shown[-1].endswith(CURSOR)

    await slack.wait_for(final, within=10)
    await nothing_held(redis_url)
    no_tracebacks(caplog)


# --- Socket Mode ----------------------------------------------------------------------------


@pytest.fixture
async def socket_bot(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> AsyncIterator[Bot]:
    async with slack_bot(slack, model_server, redis_url, "socket", **UNLIMITED) as bot:
        yield bot


@FUZZ
@given(
    kind=st.sampled_from(["events_api", "slash_commands", "interactive"]),
    payload=JSON
    | st.builds(callback, broken_mentions())
    | st.fixed_dictionaries(
        {"type": st.just("block_actions")},
        optional={
            "user": JSON,
            "actions": st.lists(
                st.fixed_dictionaries(
                    {"action_id": st.sampled_from([MODEL_SELECT, STOP_ACTION, "other"])},
                    optional={"value": JSON, "selected_option": JSON},
                ),
                max_size=2,
            ),
            "channel": JSON,
            "container": JSON,
        },
    )
    | st.fixed_dictionaries(
        {"command": st.sampled_from(["/model", "/reset", "/x"])},
        optional={"channel_id": JSON, "user_id": JSON, "text": JSON},
    ),
)
async def test_socket_mode_envelopes_of_any_shape_are_acknowledged_and_never_fail(
    socket_bot: Bot,
    slack: FakeSlack,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    payload: Any,
) -> None:
    envelope = await slack.send_envelope(kind, payload, connection=socket_bot.connection)
    await slack.acked(envelope)
    assert slack.calls_to("chat.postMessage") == []
    no_tracebacks(caplog)


async def test_after_socket_mode_junk_parley_still_answers_and_holds_nothing(
    socket_bot: Bot, slack: FakeSlack, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    for value in [[], None, "x", {"type": "event_callback", "event": 3}, callback({"type": 1})]:
        await slack.acked(await slack.send_envelope("events_api", value))  # type: ignore[arg-type]
    asked = mention("still there?")
    await slack.acked(await slack.send_envelope("events_api", callback(asked)))
    await slack.wait_for(
        lambda: [m.text for m in slack.thread(CHANNEL, asked["ts"])] == ["You said: still there?"]
    )
    await nothing_held(redis_url)
    no_tracebacks(caplog)
