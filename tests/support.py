"""What several test modules share: waiting for a condition, Parley's settings, small builders.

Fixtures live in conftest.py (pytest finds them there); this module holds plain functions that
test modules import. Test modules import from here, tests.sinks and tests.fakes — never from
one another.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import discord
import redis.asyncio as aioredis

from adapters.discord import DiscordAdapter
from bot.app import Parley
from bot.backends.base import Backend, Timeouts
from bot.backends.ollama import OllamaBackend
from bot.backends.openai import OpenAIBackend
from bot.settings import BackendConfig, Settings
from bot.turn import ConversationKey, Turn
from tests.fakes.discord import FakeDiscord
from tests.fakes.model_server import FakeModelServer


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


HELD_KEYS = ("parley:lock:*", "parley:busy:*", "parley:turn:*")


async def held_in_redis(client: aioredis.Redis) -> list[str]:
    """What a turn holds while it runs and must give back: thread locks, in-flight slots, Stop
    owners (the keys left of them; none once every turn has finished)."""
    return [str(key) for pattern in HELD_KEYS for key in await client.keys(pattern)]


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """The log records that carry a traceback, as `logger: message` lines."""
    return [f"{r.name}: {r.getMessage()}" for r in records if r.exc_info]
