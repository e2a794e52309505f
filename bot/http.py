"""The process's HTTP endpoints besides Slack's: /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from bot.app import Parley

READY_TIMEOUT = 2.0


INFORMATIVE = frozenset({"backends"})  # /readyz says how they are, but stays ready without them


async def readiness(
    parley: Parley, adapters_ready: Callable[[], dict[str, bool]]
) -> dict[str, str]:
    """One word per dependency: "ok", or what is wrong (never a secret)."""
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(parley.redis.ping(), READY_TIMEOUT)
        checks["redis"] = "ok"
    except Exception as e:
        checks["redis"] = f"unreachable ({type(e).__name__})"
    try:
        await asyncio.wait_for(parley.router.catalog(), READY_TIMEOUT * 2)
        reachable = [n for n in parley.router.order if n not in parley.router.errors]
        checks["backends"] = "ok" if reachable else "none reachable"
    except Exception as e:
        checks["backends"] = f"unreachable ({type(e).__name__})"
    for name, ready in adapters_ready().items():
        checks[name] = "ok" if ready else "not connected"
    if not parley.conversation.accepting:
        checks["shutdown"] = "draining"
    return checks


def add_routes(parley: Parley, adapters_ready: Callable[[], dict[str, bool]]) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})  # alive, whatever Redis is doing

    async def readyz(_: web.Request) -> web.Response:
        checks = await readiness(parley, adapters_ready)
        # backends are reported, not required: with every model server down each replica is
        # as unable as the next, and one that stays in its load balancer tells people so in
        # words, where one taken out of it leaves Slack's requests failing unanswered
        ok = all(v == "ok" for k, v in checks.items() if k not in INFORMATIVE)
        return web.json_response(checks, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=parley.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    parley.http.router.add_get("/healthz", healthz)
    parley.http.router.add_get("/readyz", readyz)
    parley.http.router.add_get("/metrics", metrics)
