"""The Discord adapter end to end: the real discord.py client against a fake Discord and Ollama.

Every test starts Parley (real Redis) and the adapter, talks to it through the fake gateway and
asserts on what Discord would have received over REST.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import discord
import PIL.Image
import pytest
from aiohttp import web

from adapters.discord import DiscordAdapter
from adapters.discord_logic import CONTENT_WITHHELD
from bot.access import CONFIGURE_ADMINS, NOT_ALLOWED
from bot.app import Parley
from bot.embedded_redis import EmbeddedRedis
from bot.errors import StateUnavailable, describe
from bot.markdown import CURSOR, STOPPED
from bot.turn import ConversationKey
from tests.fakes.discord import MESSAGE_CONTENT_INTENT, SEND_MESSAGES, FakeDiscord, Recorded
from tests.fakes.model_server import FakeModelServer, Script, word_pieces
from tests.support import (
    discord_settings,
    mention,
    redis_errors_told,
    running_discord,
    stop_buttons,
    tracebacks,
    until,
)

MESSAGES = r"/channels/\d+/messages"
MESSAGE = r"/channels/\d+/messages/\d+"
Json = dict[str, Any]


@pytest.fixture(autouse=True)
def restore_discord_endpoints() -> Iterator[None]:
    """discord.py keeps its REST base and gateway URL on classes: put them back after a test."""
    base = discord.http.Route.BASE
    gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    yield
    discord.http.Route.BASE = base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = gateway


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
def alice(fake: FakeDiscord) -> Json:
    return fake.add_user("alice")


@pytest.fixture
async def bot(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord
) -> AsyncIterator[DiscordAdapter]:
    async with running_discord(discord_settings(redis_url, model_server, fake)) as adapter:
        yield adapter


def final(text: str) -> Any:
    """A predicate: the bot has a message whose content is exactly `text`."""
    return lambda f: next((m for m in f.bot_messages() if m["content"] == text), None)


def replies_to(fake: FakeDiscord, message_id: str) -> list[Json]:
    return [
        m
        for m in fake.bot_messages()
        if (m.get("message_reference") or {}).get("message_id") == message_id
    ]


def buttons(body: Json) -> list[Json]:
    """The buttons a message body (a request's or a stored message's) carries."""
    return [c for row in body.get("components") or [] for c in row["components"]]


async def streaming_reply(fake: FakeDiscord, asked: Json) -> tuple[Json, str]:
    """The reply to `asked` once it shows some answer, and its Stop button's custom_id."""
    [post] = await fake.wait_for(lambda f: f.reply_posts(asked["id"]))
    [button] = buttons(post.json)
    [reply] = replies_to(fake, asked["id"])
    await fake.wait_for(lambda f: "word" in f.messages[reply["id"]]["content"])
    return reply, button["custom_id"]


async def history_saved(adapter: DiscordAdapter, key: ConversationKey) -> None:
    """Wait until the core has stored the conversation: it does so after the final edit, and
    nothing of that reaches Discord, so there is no request to wait for."""
    await until(lambda: adapter.parley.state.is_active(key))


def message_writes(fake: FakeDiscord) -> list[Recorded]:
    """Every request that creates or edits a message's content."""
    return [
        r
        for r in fake.requests
        if r.status != 429
        and (
            (r.method == "POST" and re.fullmatch(MESSAGES, r.path))
            or (r.method == "PATCH" and re.fullmatch(MESSAGE, r.path))
            or (r.method == "POST" and r.path.endswith("/callback") and r.json["type"] == 4)
            or r.path.startswith("/webhooks/")
        )
    ]


# --- answering ------------------------------------------------------------------------------


async def test_mention_is_answered_by_a_reply_streamed_through_edits(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    # the model takes a moment to load: the typing indicator shows meanwhile
    model_server.script(
        Script(tokens=["Hello", " there", ",", " Alice", "!"], delay=0.06, first_delay=0.3)
    )
    asked = await fake.say(alice, f"{mention(fake)} hi there")

    reply = await fake.wait_for(final("Hello there, Alice!"))

    assert reply["message_reference"]["message_id"] == asked["id"]
    assert reply["channel_id"] == fake.channel_id
    edits = fake.calls("PATCH", f"/channels/{fake.channel_id}/messages/{reply['id']}")
    assert len(edits) >= 2  # streamed, not posted whole
    assert edits[-1].json["content"] == "Hello there, Alice!"
    assert fake.calls("POST", f"/channels/{fake.channel_id}/typing")
    assert (
        model_server.chat_requests[0]["messages"][-1]["content"] == "hi there"  # mention stripped
    )


async def test_no_post_or_edit_can_ping_anyone_even_when_the_model_writes_everyone(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    bob = fake.add_user("bob")
    answer = f"@everyone @here look <@{bob['id']}> <@&{fake.admin_role}> <@{alice['id']}>"
    model_server.script(Script(tokens=word_pieces(answer), delay=0.03))
    await fake.say(alice, f"{mention(fake)} ping everybody please")
    await fake.wait_for(final(answer))
    await fake.slash(alice, "help")
    await fake.wait_for(lambda f: f.callbacks and all(f.callbacks.values()))

    writes = message_writes(fake)
    assert len(writes) >= 4
    for request in writes:
        body = request.json["data"] if request.path.endswith("/callback") else request.json
        allowed = body["allowed_mentions"]
        assert allowed["parse"] == [], request
        assert not allowed.get("users") and not allowed.get("roles"), request
        assert not allowed.get("replied_user"), request
    for message in fake.bot_messages():  # what Discord worked out: nobody pinged
        assert not message["mention_everyone"]
        assert message["mentions"] == [] and message["mention_roles"] == []


async def test_rate_limited_edit_is_waited_out_and_the_final_content_still_lands(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    fake.rate_limit("PATCH", MESSAGE, retry_after=0.3)
    model_server.script(Script(tokens=["one", " two", " three", " four", " five"], delay=0.05))
    await fake.say(alice, f"{mention(fake)} count")

    await fake.wait_for(final("one two three four five"))

    patches = fake.calls("PATCH", MESSAGE)
    limited = [p for p in patches if p.status == 429]
    assert len(limited) == 1
    after = [p for p in patches if p.time > limited[0].time]
    assert after, "the edit was never made again"
    assert after[0].time - limited[0].time >= 0.3 - 0.02  # Retry-After honoured, not sooner
    assert all(p.status == 200 for p in after)


async def test_bucket_reported_empty_delays_the_next_edit(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    fake.exhaust("PATCH", MESSAGE, reset_after=0.3)
    model_server.script(Script(tokens=["a", " b", " c", " d", " e", " f"], delay=0.05))
    await fake.say(alice, f"{mention(fake)} letters")

    await fake.wait_for(final("a b c d e f"))

    patches = fake.calls("PATCH", MESSAGE)
    assert len(patches) >= 2
    assert patches[1].time - patches[0].time >= 0.3 - 0.02  # X-RateLimit-Remaining: 0 honoured


async def test_long_reply_continues_in_follow_up_messages_within_2000_chars_with_fences_balanced(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    prose = " ".join(f"Sentence number {i} explains a little more." for i in range(40))
    code = "\n".join(f"    print('line {i:03d} of a long example')" for i in range(60))
    answer = f"{prose}\n\n```python\n{code}\n```\n\n{prose}"
    assert len(answer) > 5000
    pieces = [answer[i : i + 250] for i in range(0, len(answer), 250)]
    model_server.script(Script(tokens=pieces, delay=0.01))
    asked = await fake.say(alice, f"{mention(fake)} write a lot")

    def done(f: FakeDiscord) -> bool:  # the last sentence shown twice, nothing in progress
        contents = [m["content"] for m in f.bot_messages()]
        shown = "\n".join(contents)
        return shown.count("Sentence number 39 explains") == 2 and not any(
            c.endswith("▍") or c == "…" for c in contents
        )

    await fake.wait_for(done)

    messages = fake.bot_messages()
    assert len(messages) >= 3
    for message in messages:
        assert len(message["content"]) <= 2000
        assert message["content"].count("```") % 2 == 0, message["content"]
    # one chain: the first page answers the question, each later page the one before
    assert messages[0]["message_reference"]["message_id"] == asked["id"]
    for before, after in itertools.pairwise(messages):
        assert after["message_reference"]["message_id"] == before["id"]
    shown = "\n".join(m["content"] for m in messages)
    for i in range(60):
        assert f"line {i:03d} of a long example" in shown  # nothing lost at the splits


# --- the Stop button ------------------------------------------------------------------------


async def test_a_streaming_reply_carries_a_stop_button_that_stops_it_for_the_asker(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    model_server.script(Script(tokens=["word "] * 300, delay=0.02))
    asked = await fake.say(alice, f"{mention(fake)} talk for a while")
    [placeholder] = await fake.wait_for(lambda f: f.reply_posts(asked["id"]))
    assert placeholder.json["content"] == "…"
    [button] = buttons(placeholder.json)
    assert button["type"] == 2 and button["label"] == "⏹ Stop" and not button["disabled"]
    assert button["custom_id"] == f"parley:stop:discord:{asked['id']}"
    reply, custom_id = await streaming_reply(fake, asked)

    iid = await fake.press(alice, reply["id"], custom_id)
    stopped = await fake.wait_for(
        lambda f: (m := f.messages[reply["id"]])["content"].endswith(STOPPED) and m
    )

    assert [c["type"] for c in fake.callbacks[iid]] == [6]  # acked: deferred update, no message
    assert not fake.interaction_replies(iid)  # the asker is told nothing: the reply shows it
    assert stop_buttons(stopped) == [] and "word" in stopped["content"]
    assert CURSOR not in stopped["content"]
    edits = fake.calls("PATCH", f"/channels/{fake.channel_id}/messages/{reply['id']}")
    # mid-stream edits leave the button alone; the final edit takes it off
    assert ["components" in e.json for e in edits] == [False] * (len(edits) - 1) + [True]
    [callback] = [r for r in fake.requests if r.path.startswith(f"/interactions/{iid}/")]
    assert callback.time <= edits[-1].time  # acked before the work, not after
    await until(lambda: model_server.disconnects == 1)  # generation stopped upstream
    assert model_server.completed == 0


async def test_someone_else_pressing_stop_is_refused_privately_and_the_reply_goes_on(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    bob = fake.add_user("bob")
    model_server.script(Script(tokens=["word "] * 40, delay=0.02))
    asked = await fake.say(alice, f"{mention(fake)} talk for a bit")
    reply, custom_id = await streaming_reply(fake, asked)

    iid = await fake.press(bob, reply["id"], custom_id)
    [refusal] = await fake.wait_for(lambda f: f.interaction_replies(iid))
    done = await fake.wait_for(final(" ".join(["word"] * 40)))

    assert "Only the person who asked" in refusal
    assert [c["type"] for c in fake.callbacks[iid]] == [6]
    [followup] = [r for r in fake.requests if r.path.startswith("/webhooks/")]
    assert followup.json["flags"] & 64  # only Bob sees it
    assert followup.json["allowed_mentions"]["parse"] == []
    assert done["id"] == reply["id"] and stop_buttons(done) == []
    await until(lambda: model_server.completed == 1)
    assert model_server.disconnects == 0


async def test_an_administrator_may_stop_anyones_reply(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    admin = fake.add_user("ada", roles=[fake.admin_role])
    model_server.script(Script(tokens=["word "] * 300, delay=0.02))
    asked = await fake.say(alice, f"{mention(fake)} talk for a while")
    reply, custom_id = await streaming_reply(fake, asked)

    iid = await fake.press(admin, reply["id"], custom_id)
    await fake.wait_for(lambda f: f.messages[reply["id"]]["content"].endswith(STOPPED))

    assert not fake.interaction_replies(iid)
    await until(lambda: model_server.disconnects == 1)


async def test_only_the_page_being_written_carries_the_stop_button(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    sentence = "This sentence is one of many that make the answer run long. "
    model_server.script(Script(tokens=[sentence] * 70, delay=0.01))  # 4,340 chars: three pages
    asked = await fake.say(alice, f"{mention(fake)} write a lot")

    await fake.wait_for(
        lambda f: (
            len(f.bot_messages()) == 3
            and all(not m["content"].endswith(CURSOR) for m in f.bot_messages())
            and f.bot_messages()[-1]["content"].endswith("answer run long.")
        )
    )

    pages = fake.bot_messages()
    assert all(stop_buttons(m) == [] for m in pages)
    writes = [
        r
        for r in fake.requests
        if (r.method == "POST" and re.fullmatch(MESSAGES, r.path))
        or (r.method == "PATCH" and re.fullmatch(MESSAGE, r.path))
    ]
    # a later page replies to the page before; its POST carries the button, and by then the
    # page before had its final edit, which took the button off
    for before, page in itertools.pairwise(pages):
        [posted] = [i for i, r in enumerate(writes) if r is fake.reply_posts(before["id"])[0]]
        finished = [
            i
            for i, r in enumerate(writes)
            if r.method == "PATCH" and r.path.endswith(before["id"]) and "components" in r.json
        ]
        assert finished and max(finished) < posted, page["id"]
        assert buttons(writes[posted].json), page["id"]
    assert pages[0]["message_reference"]["message_id"] == asked["id"]


async def test_a_stopped_reply_shows_it_at_once_though_streaming_used_the_edit_budget(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord, alice: Json
) -> None:
    async with running_discord(discord_settings(redis_url, model_server, fake), edit_budget=(3, 5)):
        model_server.script(Script(tokens=["word "] * 300, delay=0.02))
        asked = await fake.say(alice, f"{mention(fake)} talk for a while")
        reply, custom_id = await streaming_reply(fake, asked)
        edits = f"/channels/{fake.channel_id}/messages/{reply['id']}"
        await fake.wait_for(lambda f: len(f.calls("PATCH", edits)) == 2)  # all streaming may use
        # not a wait for an event: time for the stream to try for the window's last edit, which
        # it must leave to the final edit (it tries every 0.05 s)
        await asyncio.sleep(0.3)
        assert len(fake.calls("PATCH", edits)) == 2

        pressed = asyncio.get_running_loop().time()
        await fake.press(alice, reply["id"], custom_id)
        await fake.wait_for(lambda f: f.messages[reply["id"]]["content"].endswith(STOPPED))

    patches = fake.calls("PATCH", edits)
    assert ["components" in p.json for p in patches] == [False, False, True]
    assert patches[-1].time - pressed < 1.0  # not a whole budget window (5 s) later


async def test_a_command_answer_carries_no_stop_button(
    bot: DiscordAdapter, fake: FakeDiscord, alice: Json
) -> None:
    asked = await fake.say(alice, f"{mention(fake)} help")
    [post] = await fake.wait_for(lambda f: f.reply_posts(asked["id"]))
    assert not post.json.get("components")


async def test_a_stop_pressed_on_another_replica_stops_the_reply(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord, alice: Json
) -> None:
    settings = discord_settings(redis_url, model_server, fake)
    async with running_discord(settings):
        model_server.script(Script(tokens=["word "] * 300, delay=0.02))
        asked = await fake.say(alice, f"{mention(fake)} talk for a while")
        reply, custom_id = await streaming_reply(fake, asked)
        async with running_discord(settings):  # a second replica: Discord sends it the press
            other = fake.sessions[-1]
            iid = await fake.press(alice, reply["id"], custom_id, session=other)
            await fake.wait_for(lambda f: f.messages[reply["id"]]["content"].endswith(STOPPED))

    assert fake.deliveries("INTERACTION_CREATE", iid) == [other]
    assert [c["type"] for c in fake.callbacks[iid]] == [6]
    assert stop_buttons(fake.messages[reply["id"]]) == []
    await until(lambda: model_server.disconnects == 1)


# --- conversations --------------------------------------------------------------------------


async def test_follow_up_in_the_bots_thread_continues_the_history_without_a_mention(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord, alice: Json
) -> None:
    async with running_discord(
        discord_settings(redis_url, model_server, fake, discord_use_threads=True)
    ):
        model_server.script(
            Script(tokens=["Noted:", " 42."]), Script(tokens=["It", " was", " 42."])
        )
        asked = await fake.say(alice, f"{mention(fake)} remember the number 42")
        await fake.wait_for(final("Noted: 42."))

        thread_id = asked["id"]  # a thread started from a message has the message's id
        assert fake.channels[thread_id]["name"] == "remember the number 42"
        assert fake.bot_messages(thread_id)[0]["content"] == "Noted: 42."
        await fake.say(alice, "what was the number?", channel_id=thread_id)
        await fake.wait_for(final("It was 42."))

    second = model_server.chat_requests[1]["messages"]
    assert [m["content"] for m in second[1:]] == [
        "remember the number 42",
        "Noted: 42.",
        "what was the number?",
    ]


async def test_reply_to_the_bots_message_continues_the_history(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    model_server.script(
        Script(tokens=["First", " answer."]),
        Script(tokens=["Second", " answer."]),
        Script(tokens=["Third", " answer."]),
    )
    await fake.say(alice, f"{mention(fake)} first question")
    first = await fake.wait_for(final("First answer."))
    await fake.say(alice, "second question", reply_to=first["id"])
    second = await fake.wait_for(final("Second answer."))
    await fake.say(alice, "third question", reply_to=second["id"])
    await fake.wait_for(final("Third answer."))

    third = [m["content"] for m in model_server.chat_requests[2]["messages"][1:]]
    assert third == [
        "first question",
        "First answer.",
        "second question",
        "Second answer.",
        "third question",
    ]


async def test_direct_message_is_answered_and_remembered(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    model_server.script(Script(tokens=["Hi", " Alice."]), Script(tokens=["Still", " here."]))
    await fake.dm(alice, "hello bot")
    await fake.wait_for(final("Hi Alice."))
    await fake.dm(alice, "are you there?")
    await fake.wait_for(final("Still here."))

    assert [m["content"] for m in model_server.chat_requests[1]["messages"][1:]] == [
        "hello bot",
        "Hi Alice.",
        "are you there?",
    ]


async def test_mentions_of_people_reach_the_model_as_display_names(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    bob = fake.add_user("bob", nick="Bobby")
    await fake.say(alice, f"{mention(fake)} say hello to <@{bob['id']}> in <#{fake.channel_id}>")
    await fake.wait_for(lambda f: model_server.chat_requests)

    assert (
        model_server.chat_requests[0]["messages"][-1]["content"]
        == "say hello to @Bobby in #general"
    )


async def test_bots_everyone_and_role_mentions_and_plain_chatter_are_ignored(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    other_bot = fake.add_user("otherbot", bot=True)
    await fake.say(other_bot, f"{mention(fake)} hello from a bot")
    await fake.say(alice, "@everyone lunch?")
    await fake.say(alice, f"<@&{fake.bot_role}> does the role ping count?")
    await fake.say(alice, "just chatting")
    # a message that is answered, after the ignored ones: the gateway delivers in order
    model_server.script(Script(tokens=["Answered."]))
    asked = await fake.say(alice, f"{mention(fake)} only this one")
    await fake.wait_for(final("Answered."))

    assert len(model_server.chat_requests) == 1
    assert [m["message_reference"]["message_id"] for m in fake.bot_messages()] == [asked["id"]]


# --- slash commands -------------------------------------------------------------------------


async def test_commands_are_synced_globally_without_guild_ids(
    bot: DiscordAdapter, fake: FakeDiscord
) -> None:
    assert [r.path for r in fake.calls("PUT")] == [f"/applications/{fake.application_id}/commands"]
    assert sorted(c["name"] for c in fake.commands["global"]) == [
        "help",
        "model",
        "prompt",
        "reset",
        "usage",
    ]
    model = next(c for c in fake.commands["global"] if c["name"] == "model")
    assert model["options"][0]["autocomplete"] is True


async def test_commands_are_synced_per_guild_when_guild_ids_are_configured(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord
) -> None:
    settings = discord_settings(
        redis_url, model_server, fake, discord_guild_ids=[int(fake.guild_id)]
    )
    async with running_discord(settings):
        paths = [r.path for r in fake.calls("PUT")]
    assert paths == [f"/applications/{fake.application_id}/guilds/{fake.guild_id}/commands"]
    assert sorted(c["name"] for c in fake.commands[fake.guild_id]) == [
        "help",
        "model",
        "prompt",
        "reset",
        "usage",
    ]


async def test_slash_model_sets_the_channels_model_ephemerally(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    iid = await fake.slash(alice, "model", {"name": "qwen3:8b"})
    await fake.wait_for(lambda f: f.interaction_replies(iid))

    callback = fake.callbacks[iid][0]
    assert callback["type"] == 4
    assert callback["data"]["flags"] & 64  # ephemeral
    assert "qwen3:8b" in callback["data"]["content"]
    model_server.script(Script(tokens=["From", " qwen."]))
    await fake.say(alice, f"{mention(fake)} which model are you?")
    await fake.wait_for(final("From qwen."))
    assert model_server.chat_requests[0]["model"] == "qwen3:8b"


async def test_slash_model_without_a_name_shows_the_current_model_and_the_list(
    bot: DiscordAdapter, fake: FakeDiscord, alice: Json
) -> None:
    iid = await fake.slash(alice, "model")
    [text] = await fake.wait_for(lambda f: f.interaction_replies(iid))
    assert "llama3.2:latest" in text and "qwen3:8b" in text


async def test_a_slow_slash_command_is_deferred_then_answered_privately(
    redis_url: str, fake: FakeDiscord, alice: Json
) -> None:
    release = asyncio.Event()

    async def slow_tags(request: web.Request) -> web.Response:  # a catalog that takes its time
        await release.wait()
        return web.json_response({"models": [{"name": "llama3.2:latest"}]})

    app = web.Application()
    app.router.add_get("/api/tags", slow_tags)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    settings = discord_settings(redis_url, url, fake)
    try:
        async with running_discord(settings):
            iid = await fake.slash(alice, "model")
            [deferred] = await fake.wait_for(lambda f: f.callbacks[iid], within=5)
            release.set()
            [text] = await fake.wait_for(lambda f: f.interaction_replies(iid))
    finally:
        release.set()
        await runner.cleanup()

    assert deferred["type"] == 5 and deferred["data"]["flags"] & 64  # thinking, only you
    assert "llama3.2:latest" in text
    [followup] = [r for r in fake.requests if r.path.startswith("/webhooks/")]
    assert followup.json["flags"] & 64 and followup.json["allowed_mentions"]["parse"] == []


async def test_model_autocomplete_offers_at_most_25_matches_best_first(
    redis_url: str, fake: FakeDiscord, alice: Json
) -> None:
    names = [f"llama-variant-{i:02d}:latest" for i in range(40)] + ["llama3.2:latest", "qwen3:8b"]
    async with (
        FakeModelServer(models=names) as models,
        running_discord(discord_settings(redis_url, models, fake)),
    ):
        iid = await fake.autocomplete(alice, "model", "name", "llama3")
        [callback] = await fake.wait_for(lambda f: f.callbacks[iid])
        many = await fake.autocomplete(alice, "model", "name", "llama")
        [listing] = await fake.wait_for(lambda f: f.callbacks[many])

    assert callback["type"] == 8
    choices = callback["data"]["choices"]
    assert choices[0] == {"name": "llama3.2:latest", "value": "llama3.2:latest"}
    assert "qwen3:8b" not in [c["value"] for c in choices]
    assert len(listing["data"]["choices"]) == 25
    assert all("llama" in c["value"] for c in listing["data"]["choices"])


async def test_slash_reset_clears_the_threads_history(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord, alice: Json
) -> None:
    settings = discord_settings(redis_url, model_server, fake, discord_use_threads=True)
    async with running_discord(settings) as adapter:
        model_server.script(Script(tokens=["Noted."]), Script(tokens=["Fresh", " start."]))
        asked = await fake.say(alice, f"{mention(fake)} my name is Alice")
        await fake.wait_for(final("Noted."))
        thread_id = asked["id"]
        # the core stores the turn just after the final edit; Discord sees nothing of that
        await history_saved(
            adapter, ConversationKey("discord", fake.guild_id, fake.channel_id, thread_id)
        )

        iid = await fake.slash(alice, "reset", channel_id=thread_id)
        [text] = await fake.wait_for(lambda f: f.interaction_replies(iid))
        assert "forgotten" in text
        await fake.say(alice, "what is my name?", channel_id=thread_id)
        await fake.wait_for(final("Fresh start."))

    assert [m["content"] for m in model_server.chat_requests[1]["messages"][1:]] == [
        "what is my name?"
    ]


# --- permissions ----------------------------------------------------------------------------


async def test_people_outside_the_user_allowlist_are_ignored(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord, alice: Json
) -> None:
    bob = fake.add_user("bob")
    settings = discord_settings(
        redis_url, model_server, fake, discord_allowed_users=[int(bob["id"])]
    )
    async with running_discord(settings):
        await fake.say(alice, f"{mention(fake)} may I?")
        iid = await fake.slash(alice, "help")
        model_server.script(Script(tokens=["Yes", " Bob."]))
        asked = await fake.say(bob, f"{mention(fake)} may I?")
        await fake.wait_for(final("Yes Bob."))
        [refusal] = await fake.wait_for(lambda f: f.interaction_replies(iid))

    assert len(model_server.chat_requests) == 1
    assert [m["message_reference"]["message_id"] for m in fake.bot_messages()] == [asked["id"]]
    assert refusal == NOT_ALLOWED


async def test_model_switching_limited_to_administrators(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord, alice: Json
) -> None:
    admin = fake.add_user("ada", roles=[fake.admin_role])
    settings = discord_settings(redis_url, model_server, fake, discord_model_admin_only=True)
    async with running_discord(settings):
        refused = await fake.slash(alice, "model", {"name": "qwen3:8b"})
        [refusal] = await fake.wait_for(lambda f: f.interaction_replies(refused))
        typed = await fake.say(alice, f"{mention(fake)} model qwen3:8b")
        await fake.wait_for(lambda f: replies_to(f, typed["id"]))
        allowed = await fake.slash(admin, "model", {"name": "qwen3:8b"})
        [switched] = await fake.wait_for(lambda f: f.interaction_replies(allowed))

    assert refusal.startswith(CONFIGURE_ADMINS)
    assert replies_to(fake, typed["id"])[0]["content"].startswith(CONFIGURE_ADMINS)
    assert "qwen3:8b" in switched and not switched.startswith(CONFIGURE_ADMINS)


async def test_no_request_is_made_in_a_channel_where_the_bot_may_not_reply(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord, alice: Json
) -> None:
    muted = fake.add_channel("announcements", deny_bot=SEND_MESSAGES)
    async with running_discord(discord_settings(redis_url, model_server, fake)):
        await fake.say(alice, f"{mention(fake)} answer here?", channel_id=muted)
        model_server.script(Script(tokens=["Here."]))
        await fake.say(alice, f"{mention(fake)} and here?")
        await fake.wait_for(final("Here."))

    assert not [r for r in fake.requests if muted in r.path]  # no 403s to count against us
    assert len(model_server.chat_requests) == 1


# --- hostile input at the edge ---------------------------------------------------------------

UNKNOWN_ID = "1234567890123456789"  # a snowflake nothing in the fake Discord has


def broken_messages(fake: FakeDiscord, author: Json) -> list[Json]:
    """MESSAGE_CREATE payloads addressed to the bot that cannot be read: a field missing, of
    the wrong type or too long (checked by Parley), one discord.py cannot parse, a channel it
    has never seen."""
    payloads = [fake.message_event(author, f"{mention(fake)} question {i}") for i in range(8)]
    del payloads[0]["author"]
    payloads[1]["content"] = 12345
    payloads[2]["id"] = "not-a-snowflake"
    payloads[3]["mentions"] = [1, "x", None]
    payloads[4]["content"] += " and on" * 1000  # 4,000 characters is all Discord sends
    payloads[5]["attachments"] = [1]  # discord.py's parser fails on it
    payloads[6]["channel_id"] = UNKNOWN_ID
    payloads[7]["guild_id"] = UNKNOWN_ID
    in_dm = fake.message_event(author, "a DM", channel_id=fake.dm_channel_id(author))
    del in_dm["author"]["avatar"]  # discord.py would leave the message without its author
    return [*payloads, in_dm]


async def final_reply_to(fake: FakeDiscord, asked_id: str) -> Json:
    """The reply to `asked_id` once it is final (its Stop button gone)."""
    [reply] = await fake.wait_for(lambda f: f.replies_to(asked_id))
    return await fake.wait_for(lambda f: stop_buttons(m := f.messages[reply["id"]]) == [] and m)


def dropped(records: list[logging.LogRecord]) -> list[str]:
    """The lines that said an event was dropped or not answered."""
    return [
        r.getMessage()
        for r in records
        if r.name == "adapters.discord"
        and r.levelno == logging.WARNING
        and ("dropped Discord" in r.getMessage() or "not answered" in r.getMessage())
    ]


@pytest.mark.parametrize("sharded", [False, True], ids=["client", "sharded client"])
async def test_a_message_parley_cannot_read_is_dropped_with_one_line_and_the_connection_stays_up(
    sharded: bool,
    redis_url: str,
    model_server: FakeModelServer,
    fake: FakeDiscord,
    alice: Json,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    shards = {"discord_shard_count": 1} if sharded else {}
    async with running_discord(discord_settings(redis_url, model_server, fake, **shards)) as bot:
        start = len(fake.requests)
        broken = broken_messages(fake, alice)
        for payload in broken:
            await fake.dispatch("MESSAGE_CREATE", payload, guild_id=fake.guild_id)
        # the bot's own edits come back as MESSAGE_UPDATE, which discord.py parses as well
        await fake.dispatch("MESSAGE_UPDATE", {"id": "1", "channel_id": "x"}, guild_id=None)
        model_server.script(Script(tokens=["Still", " here."]))
        asked = await fake.say(alice, f"{mention(fake)} are you still there?")
        await fake.wait_for(final("Still here."))
        assert bot.ready

    assert tracebacks(caplog.records) == []
    lines = dropped(caplog.records)
    assert len(lines) == len(broken) + 1, lines
    assert all(len(line) < 250 for line in lines)
    posts = [r.json for r in fake.requests[start:] if re.fullmatch(MESSAGES, r.path)]
    assert [str(p["message_reference"]["message_id"]) for p in posts] == [asked["id"]]
    assert len(model_server.chat_requests) == 1


async def test_an_interaction_parley_cannot_read_is_dropped_with_one_line_and_gets_no_answer(
    bot: DiscordAdapter, fake: FakeDiscord, alice: Json, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reply = fake.message_event(fake.bot, "an answer")["id"]
    stop = f"parley:stop:discord:{reply}"
    text = [{"name": "name", "type": 3, "value": "qwen3:8b"}]
    broken = [
        ("press", {"component_type": 2}),  # no custom_id
        ("press", {"custom_id": 5, "component_type": 2}),
        ("press", {"custom_id": stop + "0" * 100, "component_type": 2}),  # over 100
        ("press", "garbage"),
        ("slash", "garbage"),
        ("slash", fake.command_data("model", [{**text[0], "value": 5}])),
        ("slash", fake.command_data("model", [{**text[0], "value": "q" * 1000}])),
        ("slash", fake.command_data("nope", [])),  # not one of Parley's: discord.py says so
        ("autocomplete", fake.command_data("model", text)),  # no option focused
    ]
    kinds = {"slash": 2, "press": 3, "autocomplete": 4}
    iids = []
    for kind, data in broken:
        payload = fake.interaction_event(alice, kinds[kind], data, message_id=reply)
        await fake.dispatch("INTERACTION_CREATE", payload, guild_id=fake.guild_id)
        iids.append(str(payload["id"]))
    unreadable = fake.interaction_event(alice, 2, fake.command_data("help", []))
    unreadable["channel"] = {"id": UNKNOWN_ID, "type": 0}  # discord.py's parser fails on it
    await fake.dispatch("INTERACTION_CREATE", unreadable, guild_id=fake.guild_id)
    iids.append(str(unreadable["id"]))
    helped = await fake.slash(alice, "help")
    await fake.wait_for(lambda f: f.interaction_replies(helped))

    assert tracebacks(caplog.records) == []
    assert len(dropped(caplog.records)) == len(iids), dropped(caplog.records)
    assert [fake.callbacks[iid] for iid in iids] == [[]] * len(iids)
    assert not [r for r in fake.requests if r.path.startswith("/webhooks/")]


async def test_a_question_in_an_odd_shape_is_still_answered(
    redis_url: str,
    model_server: FakeModelServer,
    fake: FakeDiscord,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    # one asker per channel: one reply in flight per person, one stream per edit bucket
    places = [(fake.add_user(f"asker{i}"), fake.add_channel(f"odd-{i}")) for i in range(4)]
    text = f"{mention(fake)} odd\x00\x1b[2J\u202e"
    odd = [fake.message_event(user, text, channel_id=channel) for user, channel in places]
    odd[0]["something_new"] = {"discord": ["adds", "fields"]}
    odd[1]["id"] = int(odd[1]["id"])  # a number, not a string
    deleted = {"message_id": UNKNOWN_ID, "channel_id": odd[2]["channel_id"]}
    odd[2].update(type=19, message_reference=deleted, referenced_message=None)
    odd[3].update(flags=1 << 30, nonce=[1], timestamp="yesterday", member={"roles": []})
    async with running_discord(discord_settings(redis_url, model_server, fake)):
        for payload in odd:
            await fake.dispatch("MESSAGE_CREATE", payload, guild_id=fake.guild_id)
        for payload in odd:
            await final_reply_to(fake, str(payload["id"]))

    assert tracebacks(caplog.records) == dropped(caplog.records) == []
    assert len(model_server.chat_requests) == len(odd)


async def test_an_unreadable_event_parley_does_not_check_ends_the_connection_and_ready_says_so(
    redis_url: str,
    model_server: FakeModelServer,
    fake: FakeDiscord,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # why the checked events are checked: discord.py lets its parser's exception end the
    # connection (and keeps the socket open, heartbeats and all), so Parley would hear nothing
    # more; /readyz now says so
    async with running_discord(discord_settings(redis_url, model_server, fake)) as bot:
        await until(lambda: bot.ready)
        await fake.dispatch("GUILD_ROLE_CREATE", {"guild_id": fake.guild_id, "role": "x"})
        await until(lambda: not bot.ready)
        assert fake.sessions  # Discord still sees it connected

    [ended] = [r.getMessage() for r in caplog.records if "connection ended" in r.getMessage()]
    assert "TypeError" in ended


# --- the gateway ----------------------------------------------------------------------------


async def test_message_content_intent_refused_is_logged_and_told_to_the_user(
    redis_url: str, model_server: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="adapters.discord")
    async with FakeDiscord(grant_message_content=False) as fake:
        user = fake.add_user("carol")
        async with running_discord(discord_settings(redis_url, model_server, fake)):
            asked = await fake.say(user, f"{mention(fake)} hello?", withheld=True)
            [notice] = await fake.wait_for(lambda f: replies_to(f, asked["id"]))

        assert fake.identifies[0]["intents"] & MESSAGE_CONTENT_INTENT
        assert not fake.identifies[1]["intents"] & MESSAGE_CONTENT_INTENT
    assert notice["content"] == CONTENT_WITHHELD
    assert not model_server.chat_requests
    assert "Message Content intent" in caplog.text


async def test_start_returns_once_the_guilds_are_in_not_after_discord_py_s_ready_delay(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord
) -> None:
    parley = await Parley.open(discord_settings(redis_url, model_server, fake))
    adapter = DiscordAdapter(parley)  # as `parley run` makes it: guild_ready_timeout 2 s
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        await adapter.start()
        took = loop.time() - began
        [guild] = adapter.client.guilds
        assert guild.id == int(fake.guild_id) and not guild.unavailable
        assert guild.get_channel(int(fake.channel_id)) is not None
    finally:
        await adapter.stop()
        await parley.aclose()
    assert took < 1.5  # discord.py's on_ready comes 2 s after the last guild


async def test_shard_settings_identify_as_that_shard(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord
) -> None:
    settings = discord_settings(
        redis_url, model_server, fake, discord_shard_count=2, discord_shard_ids=[1]
    )
    async with running_discord(settings):
        pass
    assert [i["shard"] for i in fake.identifies] == [[1, 2]]
    assert not fake.calls("PUT")  # only the process with shard 0 syncs commands


async def test_an_event_delivered_to_two_replicas_opens_one_thread_and_is_answered_once(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord, alice: Json
) -> None:
    settings = discord_settings(redis_url, model_server, fake, discord_use_threads=True)
    async with running_discord(settings), running_discord(settings):
        assert len(fake.sessions) == 2  # two plain clients: both get every event of the guild
        model_server.script(Script(tokens=["Only", " once."], delay=0.02))
        asked = await fake.say(alice, f"{mention(fake)} one question")
        await fake.wait_for(final("Only once."))
        # the replica that lost the race for the thread was refused it, and answers there too
        threads = rf"/channels/{fake.channel_id}/messages/{asked['id']}/threads"
        await fake.wait_for(lambda f: [r.status for r in f.calls("POST", threads)] == [201, 400])

    assert len(fake.deliveries("MESSAGE_CREATE", asked["id"])) == 2
    assert fake.thread_ids == [asked["id"]]
    assert [m["channel_id"] for m in fake.bot_messages()] == [asked["id"]]  # in the thread, once
    assert len(model_server.chat_requests) == 1


async def test_edit_budget_is_shared_by_every_stream_in_a_channel(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord, alice: Json
) -> None:
    bob = fake.add_user("bob")
    async with running_discord(discord_settings(redis_url, model_server, fake), edit_budget=(3, 1)):
        text = " ".join(f"word{i}" for i in range(6))
        script = Script(tokens=word_pieces(text), delay=0.05)
        model_server.script(script, script)
        await fake.say(alice, f"{mention(fake)} stream one")
        await fake.say(bob, f"{mention(fake)} stream two")
        await fake.wait_for(lambda f: [m["content"] for m in f.bot_messages()] == [text, text])

    # the budget is taken when an edit leaves; Discord counts it when it arrives, after a delay
    # that varies (discord.py holds the first request of a bucket until it knows its limits)
    times = [p.time for p in fake.calls("PATCH", MESSAGE)]
    for i, start in enumerate(times):
        assert len([t for t in times[i:] if t - start < 1.0 - 0.1]) <= 3


# --- a Redis outage -------------------------------------------------------------------------


async def test_during_a_redis_outage_people_are_told_and_parley_recovers_by_itself(
    model_server: FakeModelServer,
    fake: FakeDiscord,
    alice: Json,
    caplog: pytest.LogCaptureFixture,
    own_redis: EmbeddedRedis,
) -> None:
    caplog.set_level(logging.INFO)
    unavailable = describe(StateUnavailable())
    async with running_discord(discord_settings(own_redis.url, model_server, fake)):
        model_server.script(Script(tokens=["Before", " the", " outage."]))
        await fake.say(alice, f"{mention(fake)} hello")
        before = await fake.wait_for(final("Before the outage."))
        await own_redis.stop()

        await fake.say(alice, f"{mention(fake)} are you there?")
        await fake.wait_for(final(unavailable))
        # a reply to the bot: which conversation it continues is itself kept in Redis
        await fake.say(alice, "and now?", reply_to=before["id"])
        await fake.wait_for(
            lambda f: [m["content"] for m in f.bot_messages()].count(unavailable) == 2
        )
        iid = await fake.slash(alice, "reset")
        await fake.wait_for(lambda f: f.interaction_replies(iid))
        assert fake.interaction_replies(iid) == [unavailable]

        await own_redis.start()  # the same port, as a restarted server or a failover would be
        model_server.script(Script(tokens=["Back", " again."]))
        await fake.say(alice, "after", reply_to=before["id"])
        await fake.wait_for(final("Back again."))

    assert redis_errors_told(caplog.records) == 3
    assert len(model_server.chat_requests) == 2  # nothing reached the model during the outage


# --- attachments ----------------------------------------------------------------------------


async def test_attachments_reach_the_model_and_an_expired_one_is_said(
    redis_url: str, fake: FakeDiscord, alice: Json
) -> None:
    picture = io.BytesIO()
    PIL.Image.new("RGB", (1200, 900), (20, 160, 90)).save(picture, "JPEG")
    files = [
        fake.attachment("photo.jpg", picture.getvalue(), "image/jpeg"),
        fake.attachment("config.yaml", b"retries: 3\ntimeout: 10s\n", None),  # no type given
        fake.attachment("old.txt", b"expired", "text/plain"),
    ]
    fake.forget_attachment(files[2])  # its signed URL has expired: the CDN answers 404
    models = FakeModelServer(["gemma3:4b"])  # a model that sees
    async with models, running_discord(discord_settings(redis_url, models, fake)):
        await fake.say(alice, f"{mention(fake)} check these", attachments=files)
        reply = await fake.wait_for(
            lambda f: next((m for m in f.bot_messages() if "📎" in m["content"]), None)
        )

    (image,) = models.images_seen[-1]
    asked = models.chat_requests[-1]["messages"][-1]
    assert asked["images"] == [image]
    assert "File `config.yaml`:\n```yaml\nretries: 3\ntimeout: 10s\n```" in asked["content"]
    assert reply["content"].endswith("📎 `old.txt`: Discord answered 404 for it.")
    assert len(fake.file_downloads) == 3


# --- Regenerate and feedback ----------------------------------------------------------------


async def test_a_finished_reply_offers_regenerate_and_votes_on_any_replica(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    asked = await fake.say(alice, f"{mention(fake)} what is Redis?")
    reply = await final_reply_to(fake, asked["id"])
    controls = {b["label"]: b["custom_id"] for b in buttons(reply)}
    assert list(controls) == ["🔄 Regenerate", "👍", "👎"]
    await fake.press(alice, reply["id"], controls["👍"])
    await fake.press(fake.add_user("bob"), reply["id"], controls["👎"])
    await fake.press(alice, reply["id"], controls["🔄 Regenerate"])
    again = await fake.wait_for(lambda f: len(f.bot_messages()) == 2 and f.bot_messages()[-1])
    await final_reply_to(fake, str(again["message_reference"]["message_id"]))
    metrics = bot.parley.metrics.render().decode()
    key = ConversationKey("discord", fake.guild_id, fake.channel_id, asked["id"])
    history = await bot.parley.state.history(key)

    assert again["content"] == "You said: what is Redis?"
    assert [m["content"] for m in model_server.chat_requests[-1]["messages"][1:]] == [
        "what is Redis?"
    ]
    assert [e.role for e in history] == ["user", "assistant"]  # replaced, not appended
    assert 'parley_feedback_total{model="llama3.2:latest",vote="up"} 1.0' in metrics
    assert 'parley_feedback_total{model="llama3.2:latest",vote="down"} 1.0' in metrics


async def test_slash_prompt_sets_the_channels_system_prompt(
    bot: DiscordAdapter, fake: FakeDiscord, model_server: FakeModelServer, alice: Json
) -> None:
    iid = await fake.slash(alice, "prompt", {"text": "Answer like a pirate."})
    [answer] = await fake.wait_for(lambda f: f.interaction_replies(iid))
    await fake.say(alice, f"{mention(fake)} hello")
    await fake.wait_for(final("You said: hello"))
    assert answer.startswith("This channel's prompt is now")
    system = model_server.chat_requests[-1]["messages"][0]
    assert system == {"role": "system", "content": "Answer like a pirate."}


async def test_another_bots_message_is_ignored_unless_bots_are_allowed(
    redis_url: str, model_server: FakeModelServer, fake: FakeDiscord
) -> None:
    other = fake.add_user("otherbot", bot=True)
    async with running_discord(discord_settings(redis_url, model_server, fake)):
        await fake.say(other, f"{mention(fake)} ping")
        await fake.say(fake.add_user("carol"), f"{mention(fake)} hi")
        await fake.wait_for(final("You said: hi"))
    assert len(model_server.chat_requests) == 1  # the person's only
    settings = discord_settings(redis_url, model_server, fake, allow_bots=True)
    async with running_discord(settings):
        await fake.say(other, f"{mention(fake)} ping again")
        await fake.wait_for(final("You said: ping again"))
