"""What several test modules share: waiting for a condition, Parley's settings, small builders.

Fixtures live in conftest.py (pytest finds them there); this module holds plain functions that
test modules import. Test modules import from here, tests.sinks and tests.fakes — never from
one another.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import discord
import redis.asyncio as aioredis
from aiohttp import web

from adapters.discord import DiscordAdapter
from adapters.discord_logic import STOP_PREFIX
from adapters.slack import SlackAdapter
from bot.app import Parley
from bot.backends.base import Backend, Timeouts
from bot.backends.ollama import OllamaBackend
from bot.backends.openai import OpenAIBackend
from bot.http import add_routes
from bot.settings import BackendConfig, Settings
from bot.turn import ConversationKey, Turn
from tests.fakes.discord import FakeDiscord
from tests.fakes.model_server import FakeModelServer
from tests.fakes.slack import APP_TOKEN, BOT_TOKEN, SIGNING_SECRET, FakeSlack


async def until(condition: Callable[[], bool | Awaitable[bool]], *, within: float = 5.0) -> None:
    """Poll `condition` (plain or async) until it holds; fail the test after `within` seconds.

    For what no fake records a request for (a model server's counters, the core's state); where
    a fake does, its own `wait_for` wakes on the request instead of polling.
    """
    deadline = time.monotonic() + within
    while True:
        answer = condition()
        if await answer if inspect.isawaitable(answer) else answer:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.01)


def make_settings(
    redis_url: str, model_server: FakeModelServer | str, **overrides: Any
) -> Settings:
    """Parley's settings in a test: this Redis, one Ollama backend (a fake server or any URL),
    edits every 50 ms and a short system prompt; `overrides` set any other setting by name."""
    url = model_server if isinstance(model_server, str) else model_server.url
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "backends": [{"name": "local", "kind": "ollama", "url": url}],
        "edit_interval": 0.05,
        "system_prompt": "Be brief.",
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def discord_settings(
    redis_url: str, model_server: FakeModelServer | str, fake: FakeDiscord, **overrides: Any
) -> Settings:
    """`make_settings` with Parley's Discord adapter connected to a fake Discord."""
    return make_settings(
        redis_url,
        model_server,
        discord_token=fake.token,
        discord_api_url=fake.api_url,
        discord_gateway_url=fake.gateway_url,
        **overrides,
    )


def mention(fake: FakeDiscord) -> str:
    """The bot's mention in Discord's markup, as a person types it to address the bot."""
    return f"<@{fake.bot['id']}>"


def turn(text: str, *, user: str = "U1", thread: str = "t1", event: str = "") -> Turn:
    """A Slack message from `user` (who is also its display name) in thread `thread`."""
    key = ConversationKey("slack", "T1", "C1", thread)
    return Turn(key, user, user, text, event or uuid.uuid4().hex)


def closed_url() -> str:
    """An http:// URL on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def make_backend(
    kind: str, url: str, *, api_key: str | None = None, timeouts: Timeouts | None = None
) -> Backend:
    """An Ollama or OpenAI-kind backend named `<kind>-box` at `url`, with short timeouts."""
    config = BackendConfig(name=f"{kind}-box", kind=kind, url=url, api_key=api_key)  # type: ignore[arg-type]
    cls = OllamaBackend if kind == "ollama" else OpenAIBackend
    return cls(config, timeouts or Timeouts(connect=2, first_chunk=5, idle=5))


def redis_errors_told(records: list[logging.LogRecord]) -> int:
    """How many one-line "redis unavailable" warnings or errors were logged; fails on any
    traceback."""
    assert [r.getMessage() for r in records if r.exc_info] == []  # no tracebacks
    told = [r for r in records if "redis unavailable" in r.getMessage()]
    assert all(r.levelno >= logging.WARNING for r in told)
    return len(told)


# --- Discord ---------------------------------------------------------------------------------


@asynccontextmanager
async def running_discord(
    settings: Settings, *, edit_budget: tuple[int, int] = (100, 1)
) -> AsyncIterator[DiscordAdapter]:
    """Parley with its Discord adapter started (see `discord_settings`), stopped at the end.

    No 2 s wait for more guilds; an edit budget that leaves fast test streams alone. discord.py
    keeps its REST base and gateway URL on classes: they are put back as they were.
    """
    base = discord.http.Route.BASE
    gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    parley = await Parley.open(settings)
    adapter = DiscordAdapter(parley, guild_ready_timeout=0, edit_budget=edit_budget)
    try:
        await adapter.start()
        yield adapter
    finally:
        await adapter.stop()
        await parley.aclose()
        discord.http.Route.BASE = base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = gateway


def stop_buttons(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The Stop buttons a Discord message (or a request's body) carries: a reply being written
    has one; a finished one has none (its last page carries Regenerate, 👍 and 👎 instead)."""
    rows = message.get("components") or []
    pressable = [c for row in rows for c in row.get("components") or []]
    return [c for c in pressable if str(c.get("custom_id", "")).startswith(STOP_PREFIX)]


HELD_KEYS = ("parley:lock:*", "parley:busy:*", "parley:turn:*")


async def held_in_redis(client: aioredis.Redis) -> list[str]:
    """What a turn holds while it runs and must give back: thread locks, in-flight slots, Stop
    owners (the keys left of them; none once every turn has finished)."""
    return [str(key) for pattern in HELD_KEYS for key in await client.keys(pattern)]


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """The log records that carry a traceback, as `logger: message` lines."""
    return [f"{r.name}: {r.getMessage()}" for r in records if r.exc_info]


# --- Slack -------------------------------------------------------------------------------------

SLACK_INTERVAL = 0.2  # the edit interval of Parley's Slack adapter in the tests


@dataclass
class Bot:
    parley: Parley
    adapter: SlackAdapter
    mode: str
    events_url: str
    connection: int  # this bot's Socket Mode connection at the fake


@asynccontextmanager
async def slack_bot(
    slack: FakeSlack, model_server: FakeModelServer, redis_url: str, mode: str, **overrides: Any
) -> AsyncIterator[Bot]:
    """One Parley process with the Slack adapter started, as `parley run` would run it."""
    settings = make_settings(
        redis_url,
        model_server,
        edit_interval=SLACK_INTERVAL,
        slack_bot_token=BOT_TOKEN,
        slack_api_url=slack.api_url,
        slack_app_token=APP_TOKEN if mode == "socket" else None,
        slack_signing_secret=SIGNING_SECRET if mode == "http" else None,
        **overrides,
    )
    parley = await Parley.open(settings)
    adapter = SlackAdapter(parley)
    add_routes(
        parley, lambda: {"slack": adapter.ready}
    )  # /healthz, /readyz, /metrics, as `parley run`
    runner = web.AppRunner(parley.http)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    connection = slack.connections
    try:
        await adapter.start()
        if mode == "socket":
            await slack.wait_for(lambda: slack.connections > connection)
        yield Bot(parley, adapter, mode, f"http://127.0.0.1:{port}/slack/events", connection)
    finally:
        await adapter.stop()
        await runner.cleanup()
        await parley.aclose()


# --- what Slack could read as a ping ------------------------------------------------------

BROADCASTS = ("here", "channel", "everyone", "group")


def could_ping(text: str) -> list[str]:
    """Everything in `text` that Slack could read as a broadcast or a mention.

    The forms of docs/slack.md read as broadly as Parley promises, and written apart from
    neutralise(): character references are decoded as often as they decode; then every `<…>` is
    read up to its first `>` (as Slack's "Retrieving messages" steps do), whitespace around its
    sigil and word ignored, in any case; and so is every `@` followed by a broadcast word.
    """
    while (decoded := html.unescape(text)) != text:
        text = decoded
    found = []
    for at, char in enumerate(text):
        if char == "<" and ">" in text[at:]:
            token = text[at : text.index(">", at) + 1]
            target = token[1:-1].split("|", 1)[0].strip()
            sigil, word = target[:1], target[1:].strip().lower()
            if sigil == "!" and (word.startswith("subteam") or _broadcast(word)):
                found.append(token)  # a broadcast or a user group
            elif sigil == "@" and (word[:1] in ("u", "w") or re.fullmatch(r"[\w.-]+", word)):
                found.append(token)  # a person, by id (or by name: undocumented)
        elif char == "@" and _broadcast(text[at + 1 : at + 10].lower()):
            found.append(text[at : at + 10])  # a broadcast word (link_names, Markdown)
    return found


def _broadcast(word: str) -> bool:
    """Whether `word` starts with a broadcast word that no letter or digit continues."""
    return any(word.startswith(b) and not word[len(b) : len(b) + 1].isalnum() for b in BROADCASTS)
