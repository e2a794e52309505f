"""How many generations a backend runs at once: a cap shared by every replica, and a fair queue.

A backend with a cap (a local Ollama's few parallel slots, by default; PARLEY_BACKEND_CONCURRENCY
or a backend's own `concurrency`) is a semaphore in Redis: the turns generating hold a place in
`holders:{cap:backend}` (each with an expiry its replica pushes on while it streams, so a crashed
replica's places lapse), and the turns waiting are queued in `queue:{cap:backend}`. The queue is
first come, first served across people: a turn is queued behind the turns of people who have
fewer generating or waiting than its person, so one person cannot fill it. Each waiting turn
asks again every POLL seconds and is told its place, which its reply shows; a turn that stops
asking (a replica gone) leaves the queue by itself.
A backend without a cap (Ollama Cloud, OpenAI-compatible servers, by default) is not queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bot.state import REDIS_DOWN, RedisClient

log = logging.getLogger(__name__)

POLL = 0.25  # seconds between a waiting turn's asks
HOLD = 60.0  # seconds a place is held without being pushed on (a crashed replica's lapse)
PUSH = 20.0  # seconds between two pushes of a place's expiry
ALIVE = 5.0  # seconds a waiting turn stays queued without asking again

# KEYS: holders (zset member → expiry ms), queue (zset member → order), who (hash member →
# person), asked (zset member → expiry ms), arrivals (a counter). ARGV: member, person, cap,
# hold ms, alive ms.
# Returns 0 when the member holds a place, else its place in the queue once the free places
# are counted (1: next). A turn is queued in the round of its person's turns (1 + those they
# already have generating or waiting), then by arrival: a person with turns in hand waits
# behind people who have none.
ENTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, person, cap = ARGV[1], ARGV[2], tonumber(ARGV[3])
for _, lapsed in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], lapsed)
  redis.call('HDEL', KEYS[3], lapsed)
end
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do
  redis.call('ZREM', KEYS[2], gone)
  redis.call('HDEL', KEYS[3], gone)
  redis.call('ZREM', KEYS[4], gone)
end
local keep = tonumber(ARGV[4]) * 2
if redis.call('ZSCORE', KEYS[1], member) then
  for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], keep) end
  return 0
end
local free = cap - redis.call('ZCARD', KEYS[1])
if free > 0 and redis.call('ZCARD', KEYS[2]) == 0 then  -- no one waits: take it
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), member)
  redis.call('HSET', KEYS[3], member, person)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], keep) end
  return 0
end
if not redis.call('ZSCORE', KEYS[2], member) then
  local round = 1
  for k = 1, 2 do
    for _, m in ipairs(redis.call('ZRANGE', KEYS[k], 0, -1)) do
      if redis.call('HGET', KEYS[3], m) == person then round = round + 1 end
    end
  end
  local arrival = redis.call('INCR', KEYS[5]) % 1e12  -- strictly in order, unlike TIME's ms
  redis.call('ZADD', KEYS[2], math.min(round, 1000) * 1e12 + arrival, member)
  redis.call('HSET', KEYS[3], member, person)
end
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), member)
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], keep) end
local place = redis.call('ZRANK', KEYS[2], member) + 1
if place <= free then
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[4], member)
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), member)
  return 0
end
return place - math.max(free, 0)
"""

# KEYS[1] holders; ARGV member, hold ms: push a held place's expiry on (only if still held).
PUSH_ON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
"""

Place = Callable[[int], None]  # told the turns ahead (0: next) as it changes


@dataclass(frozen=True)
class Held:
    """A place at a backend, to give back when the generation ends."""

    release: Callable[[], Awaitable[None]]


class Capacity:
    """Backends' caps: shared in Redis when it is given, else per process (a one-off command)."""

    def __init__(
        self, caps: dict[str, int], redis: RedisClient | None = None, prefix: str = "parley:"
    ) -> None:
        self.caps = caps  # backend → generations at once (0: no cap)
        self.redis = redis
        self.prefix = prefix
        self._local = {name: asyncio.Semaphore(cap) for name, cap in caps.items() if cap}

    def _keys(self, backend: str) -> list[str]:
        tag = f"{{cap:{backend}}}"
        return [
            f"{self.prefix}{part}:{tag}"
            for part in ("holders", "queue", "who", "asked", "arrivals")
        ]

    async def enter(self, backend: str, person: str, place: Place | None = None) -> Held:
        """Wait for a place at `backend` (told `place` while queued); at once without a cap."""
        cap = self.caps.get(backend, 0)
        if not cap:
            return Held(_nothing)
        if self.redis is None:
            semaphore = self._local[backend]
            await semaphore.acquire()

            async def release_local() -> None:
                semaphore.release()

            return Held(release_local)
        try:
            return await self._shared(backend, cap, person, place)
        except REDIS_DOWN as e:  # the model may still answer: without the shared cap
            log.warning("redis unavailable: %s is asked without its shared cap: %s", backend, e)
            return Held(_nothing)

    async def _shared(self, backend: str, cap: int, person: str, place: Place | None) -> Held:
        assert self.redis is not None
        redis = self.redis
        keys = self._keys(backend)
        member = uuid.uuid4().hex
        args: list[str | int] = [member, person or member, cap, int(HOLD * 1000), int(ALIVE * 1000)]
        told: int | None = None
        try:
            while True:
                line = int(await redis.execute_command("EVAL", ENTER, 5, *keys, *args))
                if line == 0:
                    break
                if line - 1 != told and place is not None:
                    told = line - 1
                    place(told)
                await asyncio.sleep(POLL)
        except BaseException:  # cancelled (Stop, shutdown) or lost: leave the queue
            with contextlib.suppress(*REDIS_DOWN):
                await asyncio.shield(self._leave(keys, member))
            raise
        pushing = asyncio.create_task(self._push_on(keys[0], member))

        async def release() -> None:
            pushing.cancel()
            with contextlib.suppress(*REDIS_DOWN):
                await asyncio.shield(self._leave(keys, member))

        return Held(release)

    async def _push_on(self, holders: str, member: str) -> None:
        assert self.redis is not None
        while True:
            await asyncio.sleep(PUSH)
            try:
                await self.redis.execute_command(
                    "EVAL", PUSH_ON, 1, holders, member, int(HOLD * 1000)
                )
            except REDIS_DOWN as e:
                log.warning("redis unavailable: a backend place is not pushed on: %s", e)

    async def _leave(self, keys: list[str], member: str) -> None:
        assert self.redis is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(keys[0], member)
            pipe.zrem(keys[1], member)
            pipe.hdel(keys[2], member)
            pipe.zrem(keys[3], member)
            await pipe.execute()


async def _nothing() -> None:
    return None
