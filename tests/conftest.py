"""Shared fixtures: one real redis-server per test session, a clean database per test, and a
fake model server per test."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis
from hypothesis import settings

from bot import eventloop
from bot.embedded_redis import EmbeddedRedis
from tests.fakes.model_server import FakeModelServer

# The suite's property tests draw the same examples on every run, so that a green CI stays green;
# HYPOTHESIS_PROFILE=explore draws new ones (with PARLEY_FUZZ_EXAMPLES for the fuzz tests' count).
settings.register_profile("suite", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop each async test runs on: the one `parley run` uses (bot/eventloop.py: uvloop
    where it is installed), so that the core, discord.py, slack-bolt, aiohttp and redis-py are
    tested on it; PARLEY_EVENT_LOOP=asyncio runs the suite on asyncio's own. looptime's tests
    keep asyncio's loop: looptime replaces that loop's clock, and cannot patch uvloop's."""
    if item.get_closest_marker("looptime") is not None:
        return {"asyncio": asyncio.new_event_loop}
    factory = eventloop.loop_factory(os.environ.get("PARLEY_EVENT_LOOP", "auto"))  # type: ignore[arg-type]
    return {"uvloop" if factory is not asyncio.new_event_loop else "asyncio": factory}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(None, persist=False)
    server.start_sync()
    yield server
    server.stop_sync()


@pytest.fixture
async def redis_url(redis_server: EmbeddedRedis) -> AsyncIterator[str]:
    """A real Redis, flushed before each test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    yield redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def own_redis() -> AsyncIterator[EmbeddedRedis]:
    """A redis-server of this test's own, which it may stop and start again (on the same
    port, as a restarted server or a failover would be)."""
    server = EmbeddedRedis(None, persist=False)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def model_server() -> AsyncIterator[FakeModelServer]:
    """A fake Ollama serving DEFAULT_MODELS; it echoes each question unless a test scripts it.

    A module that needs other models or another default script overrides this fixture."""
    async with FakeModelServer() as server:
        yield server
