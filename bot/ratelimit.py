"""Per-user limits and shared edit budgets, atomic in Redis so they hold across replicas.

The request rate is the `limits` library's moving window (its Lua runs in Redis); generations
in flight are a self-expiring sorted set per user, kept by the script below, so a crashed
replica's entries lapse on their own. A platform's edit budget (`EditBudgets`) is a moving
window too, plus the set of replies streaming in its scope, among which it is divided.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from redis.asyncio.cluster import RedisCluster

from bot.errors import TokensSpent, UserRateLimited
from bot.settings import RateLimit
from bot.state import InFlightSlot, RedisClient
from bot.turn import EditBudget

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

# One edit from a shared budget. KEYS[1]: the edits granted in the window (zset: id → ms);
# KEYS[2]: the replies streaming in the scope (zset: reply → ms it stops counting).
# ARGV: now ms, window ms, count, the share kept from streaming edits, reply, priority (1/0),
# a unique id for this grant. Returns {ms to wait (0: granted), replies sharing the budget,
# edits used in the window}.
TAKE_EDIT = """
local now, window, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local streaming = count - tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local replies = redis.call('ZCARD', KEYS[2])
if not redis.call('ZSCORE', KEYS[2], ARGV[5]) then
  replies = replies + 1
end
-- a reply keeps counting for two of its own streaming intervals (at least a window)
local stay = math.max(window, 2 * math.ceil(window * replies / streaming))
redis.call('ZADD', KEYS[2], now + stay, ARGV[5])
if redis.call('PTTL', KEYS[2]) < stay then
  redis.call('PEXPIRE', KEYS[2], stay)
end
local limit = streaming
if ARGV[6] == '1' then
  limit = count
end
local used = redis.call('ZCARD', KEYS[1])
if used < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[7])
  redis.call('PEXPIRE', KEYS[1], window)
  return {0, replies, used + 1}
end
local oldest = redis.call('ZRANGE', KEYS[1], used - limit, used - limit, 'WITHSCORES')
return {math.max(1, tonumber(oldest[2]) + window - now), replies, used}
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


@dataclass(frozen=True)
class Usage:
    used: int
    limit: int
    period: str  # "day", "hour", …
    resets_in: float  # seconds


class TokenBudget:
    """Tokens per person per window, counted from what the backends report, shared by replicas
    (the `limits` library's fixed window in Redis: a spent budget resets at a known time)."""

    def __init__(self, limiter: Limiter, budget: RateLimit) -> None:
        self.item = RateLimitItemPerSecond(budget.count, budget.seconds)
        self.period = budget.text.rsplit(" ", 1)[-1] if budget.text else "period"
        self.window = FixedWindowRateLimiter(limiter.window.storage)

    async def check(self, platform: str, user_id: str) -> None:
        """Raise TokensSpent while the person's budget is used up."""
        if not await self.window.test(self.item, "tokens", platform, user_id):
            usage = await self.usage(platform, user_id)
            raise TokensSpent(usage.limit, usage.period, usage.resets_in)

    async def spend(self, platform: str, user_id: str, tokens: int) -> None:
        """Count a reply's tokens (all of them, even past the budget: the next turn is refused)."""
        if tokens > 0:
            await self.window.hit(self.item, "tokens", platform, user_id, cost=tokens)

    async def usage(self, platform: str, user_id: str) -> Usage:
        stats = await self.window.get_window_stats(self.item, "tokens", platform, user_id)
        used = self.item.amount - stats.remaining
        resets_in = max(0.0, stats.reset_time - time.time()) if used else 0.0
        return Usage(used, self.item.amount, self.period, resets_in)


@dataclass(frozen=True)
class Grant:
    """The answer to one request for an edit."""

    wait: float  # seconds until the budget has room for it; 0: granted, edit now
    interval: float  # this reply's share: seconds until its next streaming edit


class EditBudgets:
    """A platform's edit budgets, shared by every reply in a scope on every replica, divided
    fairly among the replies streaming there.

    Streaming edits may use all but a fifth of a budget; the rest is kept for what a person is
    waiting for — a reply's first text and its final edit — which may use the whole budget and
    so go before any further streaming edit. Each reply spaces its streaming edits so that the
    replies in flight share the streaming part equally as it runs out: one edit every
    `window × N / streaming part` seconds with N replies once it is spent, proportionally less
    while most of it is unused (a lone short reply streams at the platform's cadence).
    """

    def __init__(
        self, redis: RedisClient, *, prefix: str = "parley:", clock: Callable[[], float] = time.time
    ) -> None:
        self.prefix = prefix
        self.clock = clock  # seconds; every replica's clock, as the `limits` windows use
        self._take = redis.register_script(TAKE_EDIT)
        self.redis = redis

    @staticmethod
    def reserved(budget: EditBudget) -> int:
        """The edits of each window that streaming edits leave to first texts and final edits."""
        return max(1, budget.count // 5) if budget.count > 1 else 0

    def _keys(self, budget: EditBudget) -> list[str]:
        tag = f"{{{budget.scope}}}"  # both keys in one hash slot
        return [f"{self.prefix}edits:{tag}", f"{self.prefix}editors:{tag}"]

    async def take(self, budget: EditBudget, reply: str, *, priority: bool = False) -> Grant:
        """Ask for one edit of `reply`'s message; `priority` for a first text or a final edit."""
        window_ms = max(1, round(budget.seconds * 1000))
        streaming = budget.count - self.reserved(budget)
        args: list[str | int] = [
            round(self.clock() * 1000),
            window_ms,
            budget.count,
            self.reserved(budget),
            reply,
            int(priority),
            f"{reply}:{uuid.uuid4().hex[:8]}",
        ]
        wait_ms, replies, used = await self._take(keys=self._keys(budget), args=args)
        fair = budget.seconds * int(replies) / streaming
        return Grant(int(wait_ms) / 1000, fair * min(1.0, int(used) / streaming))

    async def leave(self, budget: EditBudget, reply: str) -> None:
        """The reply is finished: the others share the budget without it."""
        await self.redis.zrem(self._keys(budget)[1], reply)
