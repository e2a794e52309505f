"""Per-user limits and shared platform budgets, atomic in Redis so they hold across replicas.

The request rate and the shared budgets are the `limits` library's moving windows (its Lua runs
in Redis); generations in flight are a self-expiring sorted set per user, kept by the script
below, so a crashed replica's entries lapse on their own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio.cluster import RedisCluster

from bot.errors import UserRateLimited
from bot.settings import RateLimit
from bot.state import InFlightSlot, RedisClient

# KEYS[1] busy zset; ARGV: now, expiry, member, max. Returns 0 when admitted, else the
# milliseconds until the oldest in-flight entry expires.
ACQUIRE_IN_FLIGHT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, math.ceil((tonumber(oldest[2]) - tonumber(ARGV[1])) * 1000))
"""


class Limiter:
    def __init__(
        self,
        redis: RedisClient,
        *,
        rate: RateLimit,
        max_in_flight: int,
        in_flight_ttl: float,
        prefix: str = "parley:",
        storage: RedisStorage | None = None,
    ) -> None:
        """`storage`: the `limits` library's storage for the moving windows; by default one on
        `redis`'s own pool (a cluster client needs `limits`' cluster storage: see app.py)."""
        self.redis = redis
        self.prefix = prefix
        self.rate = RateLimitItemPerSecond(rate.count, rate.seconds)
        self.max_in_flight = max_in_flight
        self.in_flight_ttl = in_flight_ttl
        if storage is None:
            if not isinstance(redis, aioredis.Redis):
                raise TypeError("a Redis Cluster client needs limits' RedisClusterStorage")
            storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                connection_pool=redis.connection_pool,  # type: ignore[arg-type]  # one pool
                key_prefix=self.storage_prefix(prefix),
            )
        self.window = MovingWindowRateLimiter(storage)

    async def check_rate(self, platform: str, user_id: str) -> None:
        """Count one request; raise UserRateLimited (with seconds to wait) past the rate."""
        if await self.window.hit(self.rate, platform, user_id):
            return
        stats = await self.window.get_window_stats(self.rate, platform, user_id)
        raise UserRateLimited(max(1.0, stats.reset_time - time.time()))

    async def admit(self, platform: str, user_id: str, slot: InFlightSlot) -> None:
        """Count one request against the person's rate and take one of their in-flight slots,
        side by side (one round trip); raise UserRateLimited if either refuses. The slot may be
        taken even then: the turn's finish gives it back either way."""
        results = await asyncio.gather(
            self.check_rate(platform, user_id), self.acquire(slot), return_exceptions=True
        )
        for failed in results:
            if isinstance(failed, BaseException):
                raise failed

    async def aclose(self) -> None:
        """Close the client `limits` made for itself (a cluster storage); ours is closed apart."""
        storage = self.window.storage
        if isinstance(storage, RedisClusterStorage) and isinstance(
            client := getattr(storage.bridge, "storage", None), RedisCluster
        ):
            await client.aclose()

    @staticmethod
    def storage_prefix(prefix: str) -> str:
        return f"{prefix}rl"

    def slot(self, platform: str, user_id: str) -> InFlightSlot:
        """A (not yet taken) generation slot of this user's."""
        return InFlightSlot(f"{self.prefix}busy:{{{platform}:{user_id}}}", uuid.uuid4().hex)

    async def acquire(self, slot: InFlightSlot) -> None:
        """Take the slot, or raise UserRateLimited when the user's K slots are all taken."""
        now = time.time()
        args: list[str | float] = [now, now + self.in_flight_ttl, slot.member, self.max_in_flight]
        # EVAL: one round trip (a registered script may first ask SCRIPT EXISTS / load it)
        wait_ms = await self.redis.execute_command("EVAL", ACQUIRE_IN_FLIGHT, 1, slot.name, *args)
        if int(wait_ms):
            # the oldest generation usually finishes well before its expiry: say so gently
            raise UserRateLimited(min(int(wait_ms) / 1000, 30.0), in_flight=True)

    @asynccontextmanager
    async def in_flight(self, platform: str, user_id: str) -> AsyncIterator[None]:
        """Hold one of the user's K generation slots for the duration of the block."""
        slot = self.slot(platform, user_id)
        await self.acquire(slot)
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
