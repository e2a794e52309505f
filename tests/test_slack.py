"""The Slack adapter end to end: the real slack-bolt app, in Socket Mode and in HTTP mode,
against a fake Slack Web API and a fake Ollama on loopback, with a real Redis."""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import PIL.Image
import pytest
import yaml

from adapters.slack import MAX_CHARS, MODEL_SELECT, SLASH_COMMANDS, STOP_ACTION
from adapters.slack_text import JOINER
from bot.embedded_redis import EmbeddedRedis
from bot.errors import StateUnavailable, describe
from bot.markdown import CURSOR, PLACEHOLDER, STOPPED
from bot.turn import ConversationKey
from tests.fakes.model_server import FakeModelServer, Script, word_pieces
from tests.fakes.slack import (
    BOT_TOKEN,
    BOT_USER_ID,
    TEAM_ID,
    ApiCall,
    FakeSlack,
    PostedMessage,
)
from tests.support import SLACK_INTERVAL, Bot, could_ping, redis_errors_told, slack_bot, until

CHANNEL = "C0GENERAL"
MANIFEST = Path(__file__).parent.parent / "adapters" / "slack_manifest.yaml"
REPLY = (
    "Redis keeps data in memory and writes it to disk in the background. It answers most "
    "commands in well under a millisecond, which is why it suits caches, queues, counters "
    "and locks. Lists, hashes, sets and sorted sets are built in, and Lua scripts run "
    "atomically next to the data."
)


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake


async def send_event(
    slack: FakeSlack,
    bot: Bot,
    event: dict[str, Any],
    *,
    retry: int | None = None,
    event_id: str | None = None,
) -> None:
    """Deliver one Events API event to `bot` the way its transport does, and see it acked."""
    body = slack.event_body(event, event_id=event_id)
    if bot.mode == "socket":
        envelope = await slack.send_envelope(
            "events_api",
            body,
            connection=bot.connection,
            retry_attempt=retry,
            retry_reason="timeout" if retry else None,
        )
        assert await slack.acked(envelope) == {}
    else:
        status, _ = await slack.post_event(bot.events_url, body, retry_num=retry)
        assert status == 200


async def send_command(slack: FakeSlack, bot: Bot, command: str, text: str = "") -> dict[str, Any]:
    """Run a slash command; returns the immediate (ack) response body."""
    payload = slack.command_payload(command, text)
    if bot.mode == "socket":
        envelope = await slack.send_envelope("slash_commands", payload, connection=bot.connection)
        return await slack.acked(envelope)
    status, body = await slack.post_form(bot.events_url, payload)
    assert status == 200
    result: dict[str, Any] = json.loads(body)
    return result


async def send_action(slack: FakeSlack, bot: Bot, payload: dict[str, Any]) -> None:
    if bot.mode == "socket":
        envelope = await slack.send_envelope("interactive", payload, connection=bot.connection)
        await slack.acked(envelope)
    else:
        status, _ = await slack.post_form(bot.events_url, {"payload": json.dumps(payload)})
        assert status == 200


def thread_text(slack: FakeSlack, thread_ts: str, channel: str = CHANNEL) -> str:
    return "\n\n".join(m.text for m in slack.thread(channel, thread_ts))


async def reply_in_thread(
    slack: FakeSlack, thread_ts: str, text: str, *, within: float = 5.0
) -> None:
    try:
        await slack.wait_for(lambda: thread_text(slack, thread_ts) == text, within)
    except TimeoutError:
        assert thread_text(slack, thread_ts) == text  # shows what the thread holds instead
        raise


def shown(call: ApiCall) -> str:
    """The text a post or edit shows: `markdown_text`, else its markdown blocks."""
    blocks = call.params.get("blocks") or []
    markdown = [str(b["text"]) for b in blocks if b["type"] == "markdown"]
    return str(call.params.get("markdown_text") or "\n".join(markdown))


CONTROLS = ["parley_regenerate", "parley_up", "parley_down"]


def actions_of(message: PostedMessage) -> list[str]:
    """The action ids of the buttons a message shows now."""
    return [str(e.get("action_id")) for _, e in message.buttons()]


def stop_buttons(call: ApiCall) -> list[dict[str, Any]]:
    """The Stop buttons a post or edit puts on its message."""
    return [
        e
        for b in call.params.get("blocks") or []
        if b["type"] == "actions"
        for e in b["elements"]
        if e.get("action_id") == STOP_ACTION
    ]


def sent_texts(slack: FakeSlack) -> list[str]:
    """Every text the bot made Slack show: posts, edits, streams, notices, fallbacks."""
    texts: list[str] = []
    for c in slack.calls:
        if c.method.startswith("chat."):
            texts += [str(c.params.get("markdown_text") or ""), str(c.params.get("text") or "")]
            texts += [str(b["text"]) for b in c.params.get("blocks") or [] if "text" in b]
    return texts


def updates_of(slack: FakeSlack, ts: str) -> list[ApiCall]:
    return [c for c in slack.ok_calls_to("chat.update") if c.params["ts"] == ts]


# --- streaming a reply ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_mention_streams_into_a_placeholder_and_ends_with_the_reply(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str, mode: str
) -> None:
    tokens = word_pieces(REPLY)
    model_server.script(Script(tokens=tokens, delay=0.01))
    slack.echo = True  # Slack sends our own posts and edits back to us as events
    async with slack_bot(slack, model_server, redis_url, mode) as bot:
        slack.http_event_url = bot.events_url
        mention = slack.user_message(f"<@{BOT_USER_ID}> what is Redis?", event_type="app_mention")
        await send_event(slack, bot, mention)
        await reply_in_thread(slack, mention["ts"], REPLY)
        echoes = await slack.echoes_delivered()
        # every edit took one of the workspace's chat.update budget, kept in Redis by the core
        used = await bot.parley.redis.zcard(f"parley:edits:{{slack:chat.update:{TEAM_ID}}}")
        # had an echo been answered, its reply would be under way before this one ends
        later = slack.user_message(f"<@{BOT_USER_ID}> thanks", event_type="app_mention")
        await send_event(slack, bot, later)
        await reply_in_thread(slack, later["ts"], "You said: thanks")

    placeholder, _ = slack.calls_to("chat.postMessage")
    assert placeholder.params["channel"] == CHANNEL
    assert placeholder.params["thread_ts"] == mention["ts"]
    assert shown(placeholder) == PLACEHOLDER
    assert placeholder.authorization == f"Bearer {BOT_TOKEN}"

    edits = updates_of(slack, slack.thread(CHANNEL, mention["ts"])[0].ts)
    assert shown(edits[-1]) == REPLY
    assert all(shown(e).endswith(CURSOR) for e in edits[:-1])
    assert 2 <= len(edits) <= len(tokens) // 4
    gaps = [b.at - a.at for a, b in itertools.pairwise(edits[:-1])]  # the last is not held
    assert all(gap >= SLACK_INTERVAL * 0.8 for gap in gaps), gaps
    assert used == len(edits)
    # our own post and edits came back as events and none of them was answered
    assert echoes == 1 + len(edits)
    assert len(model_server.chat_requests) == 2
    assert len(slack.calls_to("chat.postMessage")) == 2


async def test_follow_up_in_the_thread_is_answered_with_the_earlier_exchange(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    async with slack_bot(slack, model_server, redis_url, "socket") as bot:
        mention = slack.user_message(
            f"<@{BOT_USER_ID}> say hi to <@U0BOB>", event_type="app_mention"
        )
        await send_event(slack, bot, mention)
        first = "You said: say hi to @Bob Builder"
        await reply_in_thread(slack, mention["ts"], first)

        follow_up = slack.user_message("and to Carol?", user="U0BOB", thread_ts=mention["ts"])
        await send_event(slack, bot, follow_up)
        # with two people in the thread the model is told who says what
        second = "You said: Bob Builder: and to Carol?"
        await reply_in_thread(slack, mention["ts"], f"{first}\n\n{second}")

    messages = model_server.chat_requests[-1]["messages"]
    said = [(m["role"], m["content"]) for m in messages if m["role"] != "system"]
    assert said == [
        ("user", "Alice: say hi to @Bob Builder"),
        ("assistant", first),
        ("user", "Bob Builder: and to Carol?"),
    ]


async def test_a_follow_up_sent_while_the_reply_streams_is_answered_next(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    model_server.script(Script(tokens=word_pieces(REPLY), delay=0.01))
    async with slack_bot(slack, model_server, redis_url, "socket") as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> what is Redis?", event_type="app_mention")
        await send_event(slack, bot, mention)
        await slack.wait_for(lambda: CURSOR in thread_text(slack, mention["ts"]))
        follow_up = slack.user_message("and Valkey?", thread_ts=mention["ts"])
        await send_event(slack, bot, follow_up)
        await reply_in_thread(slack, mention["ts"], f"{REPLY}\n\nYou said: and Valkey?")


async def test_thread_chatter_is_ignored_where_the_bot_never_answered_or_followups_are_off(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    async with slack_bot(
        slack, model_server, redis_url, "socket", slack_thread_followups=False
    ) as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> hello", event_type="app_mention")
        await send_event(slack, bot, mention)
        await reply_in_thread(slack, mention["ts"], "You said: hello")
        strangers = slack.user_message("unrelated thread", thread_ts="1600000000.000100")
        await send_event(slack, bot, strangers)
        follow_up = slack.user_message("no mention here", thread_ts=mention["ts"])
        await send_event(slack, bot, follow_up)
        # a later mention is answered: by then the earlier events were long decided
        again = slack.user_message(f"<@{BOT_USER_ID}> again", thread_ts=mention["ts"])
        await send_event(slack, bot, again)
        await reply_in_thread(slack, mention["ts"], "You said: hello\n\nYou said: again")

    assert len(model_server.chat_requests) == 2


async def test_direct_messages_are_answered_in_place(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    async with slack_bot(slack, model_server, redis_url, "http") as bot:
        dm = slack.user_message("hello there", channel="D0ALICE")
        await send_event(slack, bot, dm)
        await slack.wait_for(
            lambda: [m.text for m in slack.messages.values()] == ["You said: hello there"]
        )
    (post,) = slack.calls_to("chat.postMessage")
    assert post.params["channel"] == "D0ALICE"
    assert "thread_ts" not in post.params


async def test_stopping_the_adapter_mid_reply_leaves_it_marked_stopped(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    model_server.script(Script(tokens=word_pieces(REPLY), delay=0.05))
    async with slack_bot(slack, model_server, redis_url, "socket") as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> go on", event_type="app_mention")
        await send_event(slack, bot, mention)
        await slack.wait_for(lambda: CURSOR in thread_text(slack, mention["ts"]))
        await bot.adapter.stop()
        shown = thread_text(slack, mention["ts"])
    assert shown.endswith(STOPPED) and REPLY.startswith(shown.removesuffix(STOPPED).strip())


# --- the Stop button ------------------------------------------------------------------------


async def streaming(slack: FakeSlack, bot: Bot, text: str) -> tuple[dict[str, Any], str]:
    """Ask `text` by mention; return the mention and the reply's ts once some answer shows."""
    mention = slack.user_message(f"<@{BOT_USER_ID}> {text}", event_type="app_mention")
    await send_event(slack, bot, mention)
    await slack.wait_for(lambda: CURSOR in thread_text(slack, mention["ts"]))
    (reply,) = slack.thread(CHANNEL, mention["ts"])
    return mention, reply.ts


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_a_streaming_reply_carries_a_stop_button_until_its_last_edit(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str, mode: str
) -> None:
    model_server.script(Script(tokens=word_pieces(REPLY), delay=0.01))
    async with slack_bot(slack, model_server, redis_url, mode) as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> what is Redis?", event_type="app_mention")
        await send_event(slack, bot, mention)
        await reply_in_thread(slack, mention["ts"], REPLY)

    token = f"slack:{CHANNEL}:{mention['ts']}"  # the core's stop_token for this message
    (placeholder,) = slack.calls_to("chat.postMessage")
    edits = updates_of(slack, placeholder_ts := slack.thread(CHANNEL, mention["ts"])[0].ts)
    assert len(edits) >= 2
    for call in [placeholder, *edits[:-1]]:
        (button,) = stop_buttons(call)
        assert button["type"] == "button" and button["value"] == token
        assert call.params["text"] == shown(call)  # the notification fallback
        assert "markdown_text" not in call.params  # it cannot go with blocks
    final = edits[-1]
    assert stop_buttons(final) == []  # its buttons now: Regenerate, 👍, 👎
    assert shown(final) == REPLY and final.params["text"] == REPLY
    assert actions_of(slack.messages[(CHANNEL, placeholder_ts)]) == CONTROLS


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_stop_pressed_by_the_asker_ends_the_reply_and_generation(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str, mode: str
) -> None:
    model_server.script(Script(tokens=word_pieces(REPLY * 3), delay=0.03))
    async with slack_bot(slack, model_server, redis_url, mode) as bot:
        mention, ts = await streaming(slack, bot, "go on")
        await send_action(slack, bot, slack.button_payload(CHANNEL, ts, STOP_ACTION))
        await slack.wait_for(lambda: thread_text(slack, mention["ts"]).endswith(STOPPED))
        await until(lambda: model_server.disconnects == 1)  # generation stopped upstream
        text = thread_text(slack, mention["ts"])
        assert REPLY.startswith(text.removesuffix(STOPPED).strip()[:100])
        assert len(text) < len(REPLY * 3)
        assert actions_of(slack.messages[(CHANNEL, ts)]) == CONTROLS
        # the thread is free again: the next question is answered
        follow_up = slack.user_message("thanks", thread_ts=mention["ts"])
        await send_event(slack, bot, follow_up)
        await slack.wait_for(lambda: "You said: thanks" in thread_text(slack, mention["ts"]))
    assert slack.calls_to("chat.postEphemeral") == []
    assert model_server.completed == 1  # only the follow-up ran to its end


async def test_stop_pressed_by_someone_else_is_refused_only_to_them(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    model_server.script(Script(tokens=word_pieces(REPLY), delay=0.03))
    async with slack_bot(slack, model_server, redis_url, "http") as bot:
        mention, ts = await streaming(slack, bot, "explain Redis")
        await send_action(slack, bot, slack.button_payload(CHANNEL, ts, STOP_ACTION, user="U0BOB"))
        await slack.wait_for(lambda: bool(slack.calls_to("chat.postEphemeral")))
        await reply_in_thread(slack, mention["ts"], REPLY)  # the reply went on to its end

    (notice,) = slack.calls_to("chat.postEphemeral")
    assert notice.params["user"] == "U0BOB"
    assert notice.params["channel"] == CHANNEL
    assert notice.params["thread_ts"] == mention["ts"]
    assert "Only the person who asked" in notice.params["markdown_text"]
    assert model_server.disconnects == 0 and model_server.completed == 1


async def test_stop_on_a_reply_another_replica_writes_reaches_it(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    model_server.script(Script(tokens=word_pieces(REPLY * 3), delay=0.03))
    async with AsyncExitStack() as stack:
        writer = await stack.enter_async_context(
            slack_bot(slack, model_server, redis_url, "socket")
        )
        other = await stack.enter_async_context(slack_bot(slack, model_server, redis_url, "socket"))
        mention, ts = await streaming(slack, writer, "go on")
        payload = slack.button_payload(CHANNEL, ts, STOP_ACTION)
        envelope = await slack.send_envelope("interactive", payload, connection=other.connection)
        await slack.acked(envelope)
        await slack.wait_for(lambda: thread_text(slack, mention["ts"]).endswith(STOPPED))
        await until(lambda: model_server.disconnects == 1)


async def test_a_replica_shutting_down_hands_new_events_to_the_others_and_finishes_its_reply(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    """Socket Mode: a draining replica closes its WebSocket first (Slack then gives events to
    the app's other connections) and its /readyz says so; the reply it writes still finishes."""
    model_server.script(Script(tokens=word_pieces(REPLY), delay=0.02))
    async with AsyncExitStack() as stack:
        leaving = await stack.enter_async_context(
            slack_bot(slack, model_server, redis_url, "socket")
        )
        staying = await stack.enter_async_context(
            slack_bot(slack, model_server, redis_url, "socket")
        )
        assert leaving.adapter.ready and staying.adapter.ready
        mention, _ = await streaming(slack, leaving, "go on")
        await leaving.adapter.quiesce()
        await slack.wait_for(lambda: slack.connections == 1)
        assert not leaving.adapter.ready and staying.adapter.ready
        # the one connection left is the staying replica's
        later = slack.user_message(f"<@{BOT_USER_ID}> and then?", event_type="app_mention")
        await send_event(slack, Bot(staying.parley, staying.adapter, "socket", "", 0), later)
        await slack.wait_for(lambda: thread_text(slack, later["ts"]).startswith("You said"))
        await slack.wait_for(lambda: thread_text(slack, mention["ts"]) == REPLY)


# --- exactly once ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_a_retried_or_doubly_delivered_mention_is_answered_once(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str, mode: str
) -> None:
    async with slack_bot(slack, model_server, redis_url, mode) as bot:
        text = f"<@{BOT_USER_ID}> count to three"
        mention = slack.user_message(text, event_type="app_mention")
        await send_event(slack, bot, mention, event_id="Ev0MENTION")
        # the same message again as `message` (message.channels), then Slack's retries
        as_message = {**mention, "type": "message", "channel_type": "channel"}
        await send_event(slack, bot, as_message, event_id="Ev0MESSAGE")
        await send_event(slack, bot, mention, event_id="Ev0MENTION", retry=1)
        await send_event(slack, bot, mention, event_id="Ev0MENTION", retry=2)
        await reply_in_thread(slack, mention["ts"], "You said: count to three")
        # a later, different message is answered: the duplicates were long decided by then
        other = slack.user_message(f"<@{BOT_USER_ID}> next", event_type="app_mention")
        await send_event(slack, bot, other)
        await reply_in_thread(slack, other["ts"], "You said: next")

    assert len(slack.thread(CHANNEL, mention["ts"])) == 1
    assert len(model_server.chat_requests) == 2


async def test_a_mention_delivered_twice_counts_once_against_the_users_limits(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    """Slack sends every channel mention as `app_mention` and as `message`: one request."""
    async with slack_bot(slack, model_server, redis_url, "socket", rate_limit="2/minute") as bot:
        for text in ("first", "second"):
            mention = slack.user_message(f"<@{BOT_USER_ID}> {text}", event_type="app_mention")
            await send_event(slack, bot, mention)
            await send_event(slack, bot, {**mention, "type": "message", "channel_type": "channel"})
            await reply_in_thread(slack, mention["ts"], f"You said: {text}")
    assert slack.calls_to("chat.postEphemeral") == []


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_two_instances_sharing_redis_answer_one_event_once(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str, mode: str
) -> None:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(slack_bot(slack, model_server, redis_url, mode))
        second = await stack.enter_async_context(slack_bot(slack, model_server, redis_url, mode))
        mention = slack.user_message(f"<@{BOT_USER_ID}> only once", event_type="app_mention")
        await send_event(slack, first, mention, event_id="Ev0ONCE")
        await send_event(slack, second, mention, event_id="Ev0ONCE", retry=1)
        await reply_in_thread(slack, mention["ts"], "You said: only once")
        other = slack.user_message(f"<@{BOT_USER_ID}> later", event_type="app_mention")
        await send_event(slack, second, other)
        await reply_in_thread(slack, other["ts"], "You said: later")

    assert len(slack.thread(CHANNEL, mention["ts"])) == 1
    assert len(model_server.chat_requests) == 2


async def test_a_forged_signature_gets_401_and_nothing_is_posted(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    async with slack_bot(slack, model_server, redis_url, "http") as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> hi", event_type="app_mention")
        raw = json.dumps(slack.event_body(mention))
        kind = "application/json"
        forged = await slack.post_http(bot.events_url, raw, kind, secret="not-the-secret")
        replayed = await slack.post_http(bot.events_url, raw, kind, timestamp=1_600_000_000)
        unsigned = await slack.post_http(bot.events_url, raw, kind, signed=False)
        command = slack.command_payload("/model", "qwen3:8b")
        forged_command = await slack.post_http(
            bot.events_url, urlencode(command), "application/x-www-form-urlencoded", secret="x"
        )
    assert [r[0] for r in (forged, replayed, unsigned, forged_command)] == [401] * 4
    assert slack.calls_to("chat.postMessage") == []
    assert model_server.chat_requests == []


async def test_the_request_url_check_is_answered_with_its_challenge(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    """What Slack sends when the Request URL is entered in the app settings."""
    async with slack_bot(slack, model_server, redis_url, "http") as bot:
        check = {"token": "legacy", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY", "type": ""}
        check["type"] = "url_verification"
        status, body = await slack.post_event(bot.events_url, check)
    assert status == 200 and json.loads(body) == {"challenge": check["challenge"]}


# --- output safety and errors ---------------------------------------------------------------


async def test_broadcasts_in_model_output_reach_slack_neutralised(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    tokens = ["Attention ", "<!chan", "nel>", " and ", "<!here|here>", ", also ", "@every"]
    tokens += ["one", " and ", "<@U0BOB>", " and ", "<!subteam^S0DEV|@devs>", "! Then "]
    tokens += ["< !he", "re\n>", ", ", "&lt;!ever", "yone&gt;", ", ", "<!CHANNEL>", " and "]
    tokens += ["&amp;lt;@U0", "BOB&amp;gt;", "."]
    model_server.script(Script(tokens=tokens, delay=0.01))
    async with slack_bot(slack, model_server, redis_url, "socket") as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> shout", event_type="app_mention")
        await send_event(slack, bot, mention)
        final = (
            f"Attention @{JOINER}channel and @{JOINER}here, also @{JOINER}everyone and "
            f"@{JOINER}Bob Builder and @{JOINER}devs! Then @{JOINER}here, @{JOINER}everyone, "
            f"@{JOINER}channel and @{JOINER}Bob Builder."
        )
        await reply_in_thread(slack, mention["ts"], final)

    for text in sent_texts(slack):
        assert could_ping(text) == [], text


async def test_backend_errors_appear_in_the_thread(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    model_server.script(Script(status=503))
    async with slack_bot(slack, model_server, redis_url, "socket") as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> hi", event_type="app_mention")
        await send_event(slack, bot, mention)
        await slack.wait_for(lambda: "busy" in thread_text(slack, mention["ts"]))
    assert CURSOR not in thread_text(slack, mention["ts"])


async def test_a_rate_limited_user_gets_an_ephemeral_notice_with_the_wait(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    async with slack_bot(slack, model_server, redis_url, "socket", rate_limit="1/minute") as bot:
        first = slack.user_message(f"<@{BOT_USER_ID}> one", event_type="app_mention")
        await send_event(slack, bot, first)
        await reply_in_thread(slack, first["ts"], "You said: one")
        second = slack.user_message(f"<@{BOT_USER_ID}> two", event_type="app_mention")
        await send_event(slack, bot, second)
        await slack.wait_for(lambda: bool(slack.calls_to("chat.postEphemeral")))

    (notice,) = slack.calls_to("chat.postEphemeral")
    assert notice.params["user"] == "U0ALICE"
    assert notice.params["channel"] == CHANNEL
    assert notice.params["thread_ts"] == second["ts"]
    assert "Try again in" in notice.params["markdown_text"]
    assert slack.thread(CHANNEL, second["ts"]) == []


async def test_429s_on_chat_update_slow_the_edits_and_the_whole_text_still_lands(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    model_server.script(Script(tokens=word_pieces(REPLY), delay=0.01))
    slack.rate_limit("chat.update", times=2, retry_after=0.3)
    async with slack_bot(slack, model_server, redis_url, "http") as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> tell me", event_type="app_mention")
        await send_event(slack, bot, mention)
        await reply_in_thread(slack, mention["ts"], REPLY)

    updates = slack.calls_to("chat.update")
    refused = [i for i, c in enumerate(updates) if c.status == 429]
    assert len(refused) == 2
    for i in refused:
        assert updates[i + 1].at - updates[i].at >= 0.3 * 0.9
    assert updates[-1].status == 200 and shown(updates[-1]) == REPLY


async def test_an_8000_character_reply_arrives_whole_split_at_paragraphs(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    sentence = "Each paragraph of this answer talks about one part of the system in detail. "
    paragraphs = [f"{i}. " + sentence * 5 + "That is all for this part." for i in range(20)]
    long_reply = "\n\n".join(paragraphs)
    assert len(long_reply) > 8000
    words = word_pieces(long_reply)
    pieces = ["".join(words[i : i + 8]) for i in range(0, len(words), 8)]
    model_server.script(Script(tokens=pieces, delay=0.003))  # streaming while pages fill and spill
    async with slack_bot(slack, model_server, redis_url, "socket") as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> essay", event_type="app_mention")
        await send_event(slack, bot, mention)
        await reply_in_thread(slack, mention["ts"], long_reply)

    pages = [m.text for m in slack.thread(CHANNEL, mention["ts"])]
    assert len(pages) == 3
    assert all(len(p) <= MAX_CHARS for p in pages)
    assert all(p.endswith("That is all for this part.") for p in pages)
    for call in slack.calls:
        assert len(shown(call)) <= MAX_CHARS
    # only the page being written carries the Stop button; every page ends without one
    posts = slack.calls_to("chat.postMessage")
    assert all(len(stop_buttons(p)) == 1 for p in posts)
    thread = slack.thread(CHANNEL, mention["ts"])
    assert [actions_of(m) for m in thread] == [[], [], CONTROLS]  # only the last: the controls
    page_ts = iter(m.ts for m in slack.thread(CHANNEL, mention["ts"]))
    newest = ""
    for call in slack.calls:
        if call.method == "chat.postMessage" and call.status == 200:
            newest = next(page_ts)
        elif call.method == "chat.update" and stop_buttons(call):
            assert call.params["ts"] == newest  # a button only on the newest page


# --- native streaming -----------------------------------------------------------------------


async def test_native_streaming_appends_in_the_thread_and_shows_a_status_while_loading(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    model_server.script(Script(tokens=word_pieces(REPLY), delay=0.01, first_delay=0.2))
    async with slack_bot(
        slack, model_server, redis_url, "socket", slack_native_streaming=True
    ) as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> stream it", event_type="app_mention")
        await send_event(slack, bot, mention)
        await reply_in_thread(slack, mention["ts"], REPLY)
        await slack.wait_for(lambda: bool(slack.calls_to("chat.stopStream")))

    (start,) = slack.calls_to("chat.startStream")
    assert start.params["thread_ts"] == mention["ts"]
    assert start.params["recipient_team_id"] == TEAM_ID
    assert start.params["recipient_user_id"] == "U0ALICE"
    assert len(slack.calls_to("chat.appendStream")) >= 2
    assert slack.calls_to("chat.update") == []
    assert slack.calls_to("chat.postMessage") == []
    statuses = [c.params["status"] for c in slack.calls_to("assistant.threads.setStatus")]
    assert statuses[0] == "is loading the model…" and statuses[-1] == ""
    assert all(
        c.params["thread_ts"] == mention["ts"] for c in slack.calls if "thread_ts" in c.params
    )


async def test_an_expired_native_stream_falls_back_to_edits_and_completes(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    model_server.script(Script(tokens=word_pieces(REPLY), delay=0.01))
    async with slack_bot(
        slack, model_server, redis_url, "socket", slack_native_streaming=True
    ) as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> stream it", event_type="app_mention")
        await send_event(slack, bot, mention)
        await slack.wait_for(lambda: bool(slack.ok_calls_to("chat.appendStream")))
        (stream,) = slack.thread(CHANNEL, mention["ts"])
        slack.expire_stream(CHANNEL, stream.ts)
        await reply_in_thread(slack, mention["ts"], REPLY)

    assert slack.ok_calls_to("chat.update")[-1].params["ts"] == stream.ts
    assert len(slack.thread(CHANNEL, mention["ts"])) == 1


# --- slash commands and the model menu ------------------------------------------------------


def menu(response: dict[str, Any]) -> dict[str, Any]:
    (actions,) = [b for b in response["blocks"] if b["type"] == "actions"]
    (select,) = actions["elements"]
    assert select["type"] == "static_select" and select["action_id"] == MODEL_SELECT
    return dict(select)


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_slash_model_lists_sets_and_rejects_with_suggestions(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str, mode: str
) -> None:
    async with slack_bot(slack, model_server, redis_url, mode) as bot:
        listing = await send_command(slack, bot, "/model")
        assert listing["response_type"] == "ephemeral"
        assert "llama3.2:latest" in listing["text"] and "qwen3:8b" in listing["text"]
        select = menu(listing)
        assert [o["value"] for o in select["options"]] == ["llama3.2:latest", "qwen3:8b"]
        assert select["initial_option"]["value"] == "llama3.2:latest"

        chosen = await send_command(slack, bot, "/model", "qwen3:8b")
        assert "qwen3:8b" in chosen["text"] and chosen["response_type"] == "ephemeral"

        wrong = await send_command(slack, bot, "/model", "lama3.2")
        assert "Did you mean" in wrong["text"] and "llama3.2:latest" in wrong["text"]

        mention = slack.user_message(f"<@{BOT_USER_ID}> which model?", event_type="app_mention")
        await send_event(slack, bot, mention)
        await reply_in_thread(slack, mention["ts"], "You said: which model?")
    assert model_server.chat_requests[-1]["model"] == "qwen3:8b"


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_the_model_menu_sets_the_channels_model(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str, mode: str
) -> None:
    async with slack_bot(slack, model_server, redis_url, mode) as bot:
        await send_action(slack, bot, slack.select_payload(MODEL_SELECT, "qwen3:8b"))
        await slack.wait_for(lambda: bool(slack.responses))
        (answer,) = slack.responses
        assert answer["replace_original"] is True
        assert answer["response_type"] == "ephemeral"
        assert "qwen3:8b" in answer["text"]
        assert menu(answer)["initial_option"]["value"] == "qwen3:8b"

        listing = await send_command(slack, bot, "/model")
        assert "Current model here: `qwen3:8b`" in listing["text"]


async def test_reset_and_help_answer_ephemerally(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    async with slack_bot(slack, model_server, redis_url, "socket") as bot:
        for text in ("remember me", "and this"):  # the second starts once the first is saved
            await send_event(slack, bot, slack.user_message(text, channel="D0ALICE"))
            await slack.wait_for(
                lambda t=text: f"You said: {t}" in [m.text for m in slack.messages.values()]
            )
        payload = slack.command_payload("/reset", channel="D0ALICE")
        envelope = await slack.send_envelope("slash_commands", payload)
        reset = await slack.acked(envelope)
        assert reset["response_type"] == "ephemeral" and "forgotten" in reset["text"]
        helped = await send_command(slack, bot, "/parley", "help")
        assert "model" in helped["text"] and "reset" in helped["text"]
        assert "blocks" in helped
        in_thread = slack.user_message(f"<@{BOT_USER_ID}> model qwen3:8b", event_type="app_mention")
        await send_event(slack, bot, in_thread)
        await slack.wait_for(lambda: "qwen3:8b" in thread_text(slack, in_thread["ts"]))
    assert len(model_server.chat_requests) == 2


def test_the_manifest_declares_what_the_adapter_handles() -> None:
    manifest = yaml.safe_load(MANIFEST.read_text())
    commands = {c["command"] for c in manifest["features"]["slash_commands"]}
    assert commands == set(SLASH_COMMANDS)
    settings = manifest["settings"]
    assert set(settings["event_subscriptions"]["bot_events"]) == {
        "app_mention",
        "message.channels",
        "message.groups",
        "message.im",
        "message.mpim",
    }
    assert settings["interactivity"]["is_enabled"] is True
    assert settings["socket_mode_enabled"] is True
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"app_mentions:read", "chat:write", "commands", "users:read", "im:history"} <= scopes
    assert "files:read" in scopes  # attachments
    assert {"channels:history", "groups:history", "mpim:history"} <= scopes
    assert manifest["features"]["app_home"]["messages_tab_enabled"] is True


# --- a Redis outage -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_during_a_redis_outage_people_are_told_and_parley_recovers_by_itself(
    slack: FakeSlack,
    model_server: FakeModelServer,
    mode: str,
    caplog: pytest.LogCaptureFixture,
    own_redis: EmbeddedRedis,
) -> None:
    caplog.set_level(logging.INFO)
    unavailable = describe(StateUnavailable())
    async with slack_bot(slack, model_server, own_redis.url, mode) as bot:
        first = slack.user_message(f"<@{BOT_USER_ID}> hello", event_type="app_mention")
        await send_event(slack, bot, first)
        await reply_in_thread(slack, first["ts"], "You said: hello")
        await own_redis.stop()

        during = slack.user_message(f"<@{BOT_USER_ID}> still there?", event_type="app_mention")
        await send_event(slack, bot, during)
        await reply_in_thread(slack, during["ts"], unavailable)
        # thread chatter without a mention: with no Redis there is no telling whether it is
        # for Parley, so it is not answered (rather than a notice in every thread)
        chatter = slack.user_message("is it down?", thread_ts=first["ts"])
        await send_event(slack, bot, chatter)
        reset = await send_command(slack, bot, "/reset")
        assert reset["text"] == unavailable

        await own_redis.start()  # the same port, as a restarted server or a failover would be
        after = slack.user_message(f"<@{BOT_USER_ID}> back?", event_type="app_mention")
        await send_event(slack, bot, after)
        await reply_in_thread(slack, after["ts"], "You said: back?")

    assert thread_text(slack, first["ts"]) == "You said: hello"  # the chatter got no answer
    assert redis_errors_told(caplog.records) == 3
    assert len(model_server.chat_requests) == 2


# --- many replies in one workspace ----------------------------------------------------------


async def test_ten_replies_at_once_share_the_workspace_chat_update_budget(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    """Ten people ask at once in one workspace; Slack allows chat.update 50 times a minute
    there (the fake enforces it). Every reply shows text soon after its first token and its
    final text soon after its last, and Slack never has to refuse an edit."""
    slack.tiers["chat.update"] = (50, 60.0)
    tokens, delay, stagger = 60, 0.05, 0.3
    text = " ".join(f"w{i}" for i in range(tokens))
    model_server.script(
        *(Script(tokens=word_pieces(text), delay=delay, first_delay=i * stagger) for i in range(10))
    )
    # one person asking ten times stands for ten people: lift the per-person limits, and the
    # per-backend cap (a queue before the model is another issue than the edit budget)
    limits = {"max_in_flight": 10, "rate_limit": "100/minute", "backend_concurrency": 10}
    async with slack_bot(slack, model_server, redis_url, "socket", **limits) as bot:
        asked = [
            slack.user_message(f"<@{BOT_USER_ID}> question {i}", event_type="app_mention")
            for i in range(10)
        ]
        for i, mention in enumerate(asked):  # one by one: the scripts are taken in this order
            await send_event(slack, bot, mention)
            await slack.wait_for(lambda m=mention: bool(slack.thread(CHANNEL, m["ts"])))
            await until(lambda n=i + 1: len(model_server.chat_requests) == n)
        for mention in asked:
            await reply_in_thread(slack, mention["ts"], text, within=30)

    assert [c.status for c in slack.calls_to("chat.update")].count(429) == 0
    assert len(slack.calls_to("chat.update")) <= 50
    for i, mention in enumerate(asked):
        (reply,) = slack.thread(CHANNEL, mention["ts"])
        (placeholder,) = [
            c
            for c in slack.ok_calls_to("chat.postMessage")
            if c.params["thread_ts"] == mention["ts"]
        ]
        edits = updates_of(slack, reply.ts)
        # the model request leaves with the placeholder; its script delays the first token
        first_token = placeholder.at + i * stagger
        last_token = first_token + (tokens - 1) * delay
        first_text = next(e.at for e in edits if shown(e).startswith("w0"))
        late = first_text - first_token, edits[-1].at - last_token
        assert late[0] < 1.0 and late[1] < 1.0, f"reply {i}: first text, final edit late {late}"
        assert shown(edits[-1]) == text


# --- attachments ----------------------------------------------------------------------------


async def test_files_on_a_mention_reach_the_model_and_a_refused_download_is_said(
    slack: FakeSlack, redis_url: str
) -> None:
    picture = io.BytesIO()
    PIL.Image.new("RGB", (800, 600), (10, 120, 200)).save(picture, "PNG")
    models = FakeModelServer(["gemma3:4b"])  # a model that sees
    async with models, slack_bot(slack, models, redis_url, "socket") as bot:
        files = [
            slack.add_file("chart.png", picture.getvalue(), "image/png"),
            slack.add_file("notes.txt", b"ship it on Friday", "text/plain"),
            slack.add_file("gone.pdf", b"%PDF-", "application/pdf"),
        ]
        del slack.files[files[2]["id"]]  # Slack then answers with its sign-in page
        mention = slack.user_message(
            f"<@{BOT_USER_ID}> what is this?", event_type="app_mention", files=files
        )
        await send_event(slack, bot, mention)
        await slack.wait_for(lambda: "📎" in thread_text(slack, mention["ts"]))

    (image,) = models.images_seen[-1]
    asked = models.chat_requests[-1]["messages"][-1]
    assert asked["images"] == [image]
    assert "File `notes.txt`:\n```txt\nship it on Friday\n```" in asked["content"]
    assert thread_text(slack, mention["ts"]).endswith(
        "📎 `gone.pdf`: Slack answered with its sign-in page: Parley needs the `files:read` "
        "scope (add it and reinstall the app)."
    )
    assert slack.file_downloads == [f"Bearer {BOT_TOKEN}"] * 3  # the bot token, each time


# --- who may use Parley ---------------------------------------------------------------------


async def test_a_person_not_on_the_allowlist_gets_a_private_no_and_no_model_request(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    allowlists = {"slack_allowed_users": "U0BOB", "slack_model_admins": "U0BOB"}
    async with slack_bot(slack, model_server, redis_url, "socket", **allowlists) as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> hello", event_type="app_mention")
        await send_event(slack, bot, mention)
        await slack.wait_for(lambda: bool(slack.calls_to("chat.postEphemeral")))
        bobs = slack.user_message(f"<@{BOT_USER_ID}> hi", user="U0BOB", event_type="app_mention")
        await send_event(slack, bot, bobs)
        await reply_in_thread(slack, bobs["ts"], "You said: hi")
        refused = await send_command(slack, bot, "/parley", "prompt Talk like a pirate.")

    (notice,) = slack.calls_to("chat.postEphemeral")
    assert notice.params["user"] == "U0ALICE"
    assert notice.params["markdown_text"] == "Parley isn't enabled for you here."
    assert slack.thread(CHANNEL, mention["ts"]) == []
    assert len(model_server.chat_requests) == 1  # Bob's
    assert refused["text"].startswith("Parley isn't enabled for you here.")


async def test_only_the_named_people_and_workspace_admins_change_a_channels_prompt(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    async with slack_bot(
        slack, model_server, redis_url, "socket", slack_model_admins="U0BOB"
    ) as bot:
        refused = await send_command(slack, bot, "/parley", "prompt Talk like a pirate.")
        bobs = slack.command_payload("/parley", "prompt Talk like a pirate.", user="U0BOB")
        allowed = await slack.acked(await slack.send_envelope("slash_commands", bobs))
        mention = slack.user_message(f"<@{BOT_USER_ID}> ahoy", event_type="app_mention")
        await send_event(slack, bot, mention)
        await reply_in_thread(slack, mention["ts"], "You said: ahoy")

    assert refused["text"].startswith("Only workspace admins and the people Parley")
    assert "Talk like a pirate." in allowed["text"]
    assert model_server.chat_requests[-1]["messages"][0]["content"] == "Talk like a pirate."


# --- Regenerate and feedback ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_a_finished_reply_offers_regenerate_and_votes(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str, mode: str
) -> None:
    async with slack_bot(slack, model_server, redis_url, mode) as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> what is Redis?", event_type="app_mention")
        await send_event(slack, bot, mention)
        await reply_in_thread(slack, mention["ts"], "You said: what is Redis?")
        (reply,) = slack.thread(CHANNEL, mention["ts"])
        assert [e["action_id"] for _, e in reply.buttons()] == [
            "parley_regenerate",
            "parley_up",
            "parley_down",
        ]
        await send_action(slack, bot, slack.button_payload(CHANNEL, reply.ts, "parley_up"))
        await send_action(
            slack, bot, slack.button_payload(CHANNEL, reply.ts, "parley_down", user="U0BOB")
        )
        await send_action(slack, bot, slack.button_payload(CHANNEL, reply.ts, "parley_regenerate"))
        await slack.wait_for(lambda: len(slack.thread(CHANNEL, mention["ts"])) == 2)
        await reply_in_thread(
            slack, mention["ts"], "You said: what is Redis?\n\nYou said: what is Redis?"
        )
        history = await bot.parley.state.history(
            ConversationKey("slack", TEAM_ID, CHANNEL, mention["ts"])
        )
        metrics = bot.parley.metrics.render().decode()

    assert len(model_server.chat_requests) == 2
    assert [e.role for e in history] == ["user", "assistant"]  # replaced, not appended
    assert 'parley_feedback_total{model="llama3.2:latest",vote="up"} 1.0' in metrics
    assert 'parley_feedback_total{model="llama3.2:latest",vote="down"} 1.0' in metrics


# --- agent sessions -------------------------------------------------------------------------


async def test_as_an_agent_a_reply_runs_in_a_session_that_slacks_own_stop_ends(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    slack.agent = True
    model_server.script(Script(tokens=word_pieces(REPLY * 3), delay=0.03), Script(tokens=["ok"]))
    async with slack_bot(slack, model_server, redis_url, "socket", slack_agent=True) as bot:
        mention = slack.user_message(f"<@{BOT_USER_ID}> tell me\nall", event_type="app_mention")
        await send_event(slack, bot, mention)
        await slack.wait_for(lambda: CURSOR in thread_text(slack, mention["ts"]))
        (reply,) = slack.thread(CHANNEL, mention["ts"])
        assert STOP_ACTION not in actions_of(reply)  # Slack shows its own Stop in a session
        await send_event(slack, bot, slack.session_stopped(mention["ts"]))
        await slack.wait_for(lambda: thread_text(slack, mention["ts"]).endswith(STOPPED))
        await until(lambda: model_server.disconnects == 1)  # generation stopped upstream
        await slack.wait_for(
            lambda: (
                [c.params["status"] for c in slack.calls_to("agents.sessions.setStatus")]
                == ["processing", "active"]
            )
        )
        # pressed again with nothing being written: the session is set active, the person told
        thread = ConversationKey("slack", TEAM_ID, CHANNEL, mention["ts"])

        async def finished() -> bool:
            return await bot.parley.state.reply_in_progress(thread) is None

        await until(finished)
        await send_event(slack, bot, slack.session_stopped(mention["ts"]))
        await slack.wait_for(lambda: bool(slack.calls_to("chat.postEphemeral")))

    first = slack.calls_to("agents.sessions.setStatus")[0]
    assert first.params["thread_ts"] == mention["ts"] and first.params["title"] == "tell me"
    assert slack.calls_to("assistant.threads.setStatus") == []  # the session says it instead
    (notice,) = slack.calls_to("chat.postEphemeral")
    assert notice.params["markdown_text"] == "There is no answer being written here."
    assert [c.params["status"] for c in slack.calls_to("agents.sessions.setStatus")][-1] == (
        "active"
    )


async def test_another_bots_mention_is_ignored_unless_bots_are_allowed(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str
) -> None:
    def from_a_bot(text: str) -> dict[str, Any]:
        event = slack.user_message(f"<@{BOT_USER_ID}> {text}", event_type="app_mention")
        return {
            **event,
            "user": "U0OTHERBOT",
            "bot_id": "B0OTHER",
            "bot_profile": {"id": "B0OTHER"},
        }

    async with slack_bot(slack, model_server, redis_url, "socket") as bot:
        ignored = from_a_bot("ping")
        await send_event(slack, bot, ignored)
        person = slack.user_message(f"<@{BOT_USER_ID}> hi", event_type="app_mention")
        await send_event(slack, bot, person)
        await reply_in_thread(slack, person["ts"], "You said: hi")
    assert slack.thread(CHANNEL, ignored["ts"]) == []
    async with slack_bot(slack, model_server, redis_url, "socket", allow_bots=True) as bot:
        answered = from_a_bot("ping again")
        await send_event(slack, bot, answered)
        await reply_in_thread(slack, answered["ts"], "You said: ping again")
