"""Per-user limits and shared platform budgets, atomic in Redis so they hold across replicas.

The request rate and the shared budgets are the `limits` library's moving windows (its Lua runs
in Redis); generations in flight are a self-expiring sorted set per user, kept by the script
below, so a crashed replica's entries lapse on their own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio.client import Pipeline

from bot.errors import UserRateLimited
from bot.settings import RateLimit

# KEYS[1] busy zset, optional KEYS[2] a key that must hold ARGV[5] (the turn's de-dup claim:
# a duplicate delivery takes no slot); ARGV: now, expiry, member, max. Returns 0 when admitted
# (or not asked for), else the milliseconds until the oldest in-flight entry expires.
ACQUIRE_IN_FLIGHT = """
if #KEYS > 1 and redis.call('GET', KEYS[2]) ~= ARGV[5] then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, math.ceil((tonumber(oldest[2]) - tonumber(ARGV[1])) * 1000))
"""


@dataclass
class InFlightSlot:
    name: str
    member: str


class Limiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        rate: RateLimit,
        max_in_flight: int,
        in_flight_ttl: float,
        prefix: str = "parley:",
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.rate = RateLimitItemPerSecond(rate.count, rate.seconds)
        self.max_in_flight = max_in_flight
        self.in_flight_ttl = in_flight_ttl
        storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]  # one pool
            key_prefix=f"{prefix}rl",
        )
        self.window = MovingWindowRateLimiter(storage)

    async def check_rate(self, platform: str, user_id: str) -> None:
        """Count one request; raise UserRateLimited (with seconds to wait) past the rate."""
        if await self.window.hit(self.rate, platform, user_id):
            return
        stats = await self.window.get_window_stats(self.rate, platform, user_id)
        raise UserRateLimited(max(1.0, stats.reset_time - time.time()))

    def queue_in_flight(
        self,
        pipe: Pipeline,
        platform: str,
        user_id: str,
        *,
        only_if: tuple[str, str] | None = None,
    ) -> InFlightSlot:
        """Ask for one of the user's K generation slots as part of a pipeline.

        `only_if=(key, value)`: only when that key holds that value by then (a claim queued
        earlier in the same pipeline), so a duplicate delivery never takes a slot.
        """
        slot = InFlightSlot(f"{self.prefix}busy:{{{platform}:{user_id}}}", uuid.uuid4().hex)
        now = time.time()
        keys = [slot.name]
        args: list[str | float] = [now, now + self.in_flight_ttl, slot.member, self.max_in_flight]
        if only_if is not None:
            keys.append(only_if[0])
            args.append(only_if[1])
        pipe.execute_command("EVAL", ACQUIRE_IN_FLIGHT, len(keys), *keys, *args)
        return slot

    def admitted(self, answer: Any) -> None:
        """Read the pipeline's answer; raise UserRateLimited when all K slots are taken."""
        if int(answer):
            # the oldest generation usually finishes well before its expiry: say so gently
            raise UserRateLimited(min(int(answer) / 1000, 30.0), in_flight=True)

    def queue_release(self, pipe: Pipeline, slot: InFlightSlot) -> None:
        # whether or not the slot was admitted: ZREM of an absent member does nothing
        pipe.zrem(slot.name, slot.member)

    @asynccontextmanager
    async def in_flight(self, platform: str, user_id: str) -> AsyncIterator[None]:
        """Hold one of the user's K generation slots for the duration of the block."""
        async with self.redis.pipeline(transaction=False) as pipe:
            slot = self.queue_in_flight(pipe, platform, user_id)
            (answer,) = await pipe.execute()
        self.admitted(answer)
        try:
            yield
        finally:
            await self.redis.zrem(slot.name, slot.member)

    async def budget_wait(self, name: str, count: int, seconds: int) -> float:
        """Take a slot of a budget shared by all streams and replicas; else seconds to wait."""
        item = RateLimitItemPerSecond(count, seconds)
        if await self.window.hit(item, "budget", name):
            return 0.0
        stats = await self.window.get_window_stats(item, "budget", name)
        return max(0.01, stats.reset_time - time.time())
