"""/healthz, /readyz and /metrics over real HTTP; Redis going away and coming back."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from bot.app import Parley
from bot.conversation import Outcome
from bot.embedded_redis import EmbeddedRedis
from bot.http import add_routes
from bot.turn import ConversationKey, Turn
from tests.fakes.model_server import FakeModelServer
from tests.sinks import RecordingSink
from tests.support import make_settings


def turn(text: str) -> Turn:
    return Turn(ConversationKey("slack", "T1", "C1", "t"), "U1", "ada", text, uuid.uuid4().hex)


@pytest.fixture
async def stack(
    own_redis: EmbeddedRedis, model_server: FakeModelServer
) -> AsyncIterator[tuple[Parley, FakeModelServer, str]]:
    parley = await Parley.open(make_settings(own_redis.url, model_server))
    add_routes(parley, lambda: {"slack": True})
    runner = web.AppRunner(parley.http)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield parley, model_server, f"http://127.0.0.1:{port}"
    await runner.cleanup()
    await parley.aclose()


async def test_health_and_readiness_when_all_is_well(
    stack: tuple[Parley, FakeModelServer, str],
) -> None:
    _, _, url = stack
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"redis": "ok", "backends": "ok", "slack": "ok"}


async def test_readiness_fails_while_redis_is_down_but_liveness_holds(
    stack: tuple[Parley, FakeModelServer, str], own_redis: EmbeddedRedis
) -> None:
    _, _, url = stack
    await own_redis.stop()
    async with httpx.AsyncClient(base_url=url) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["redis"].startswith("unreachable")
        assert (await client.get("/healthz")).status_code == 200


async def test_readiness_reports_backends_down_but_stays_ready(
    stack: tuple[Parley, FakeModelServer, str],
) -> None:
    """Every replica is as unable as the next without a model server: one that stays in its
    load balancer tells people so, where one taken out of it leaves Slack's requests failing."""
    parley, models, url = stack
    await models.stop()
    parley.router.catalog_ttl = 0
    async with httpx.AsyncClient(base_url=url) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["backends"] == "none reachable"


async def test_metrics_endpoint_serves_prometheus_text(
    stack: tuple[Parley, FakeModelServer, str],
) -> None:
    parley, _, url = stack
    await parley.conversation.handle(turn("hello"), RecordingSink())
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert 'parley_replies_total{outcome="complete",platform="slack"} 1.0' in response.text


async def test_a_redis_restart_is_survived_without_restarting_parley(
    stack: tuple[Parley, FakeModelServer, str], own_redis: EmbeddedRedis
) -> None:
    parley, _, _ = stack
    assert await parley.conversation.handle(turn("before"), RecordingSink()) is Outcome.COMPLETE
    await own_redis.stop()
    during = RecordingSink()
    assert await parley.conversation.handle(turn("during"), during) is Outcome.ERROR
    assert "memory store (Redis) is unavailable" in during.messages[-1]
    await own_redis.start()  # same port, as a restarted server or a failover would be
    after = RecordingSink()
    assert await parley.conversation.handle(turn("after"), after) is Outcome.COMPLETE
    assert after.messages == ["You said: after"]
