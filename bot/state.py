"""Shared state in Redis: thread history, channel preferences, event de-duplication, locks.

Every key of one conversation shares a hash tag (`{platform:space:channel:thread}`), so the same
code runs on Redis Cluster; multi-key writes are MULTI transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import LockError, RedisError

from bot.turn import ConversationKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryEntry:
    """One stored message of a thread."""

    role: str  # user | assistant
    content: str
    user_id: str = ""
    user_name: str = ""
    model: str = ""  # for assistant entries: who answered

    def to_json(self) -> str:
        data = {"role": self.role, "content": self.content, "ts": round(time.time(), 3)}
        if self.user_id:
            data["user_id"] = self.user_id
        if self.user_name:
            data["user_name"] = self.user_name
        if self.model:
            data["model"] = self.model
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> HistoryEntry | None:
        try:
            data: dict[str, Any] = json.loads(raw)
            return cls(
                role=str(data["role"]),
                content=str(data["content"]),
                user_id=str(data.get("user_id", "")),
                user_name=str(data.get("user_name", "")),
                model=str(data.get("model", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None  # a corrupt entry is skipped, never fatal


@dataclass(frozen=True)
class Preferences:
    model: str | None = None
    system_prompt: str | None = None


class State:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "parley:",
        history_max: int = 50,
        history_ttl: float = 30 * 86400,
        dedup_ttl: int = 600,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.history_max = history_max
        self.history_ttl = int(history_ttl)
        self.dedup_ttl = dedup_ttl

    # --- keys ---
    def history_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}hist:{{{key.tag}}}"

    def lock_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}lock:{{{key.tag}}}"

    def pref_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}pref:{{{key.platform}:{key.space}:{key.channel}}}"

    # --- history ---
    async def history(self, key: ConversationKey) -> list[HistoryEntry]:
        raw = await self.redis.lrange(self.history_key(key), 0, -1)
        return [e for e in map(HistoryEntry.from_json, map(_text, raw)) if e is not None]

    async def append(self, key: ConversationKey, *entries: HistoryEntry) -> None:
        """Append, trim to the newest N and refresh the TTL, atomically."""
        name = self.history_key(key)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(name, *(e.to_json() for e in entries))
            pipe.ltrim(name, -self.history_max, -1)
            pipe.expire(name, self.history_ttl)
            await pipe.execute()

    async def is_active(self, key: ConversationKey) -> bool:
        return bool(await self.redis.exists(self.history_key(key)))

    async def forget(self, key: ConversationKey) -> bool:
        return bool(await self.redis.delete(self.history_key(key)))

    # --- preferences ---
    async def preferences(self, key: ConversationKey) -> Preferences:
        data = {
            _text(k): _text(v) for k, v in (await self.redis.hgetall(self.pref_key(key))).items()
        }
        return Preferences(model=data.get("model"), system_prompt=data.get("system_prompt"))

    async def set_preference(self, key: ConversationKey, field: str, value: str | None) -> None:
        if value is None:
            await self.redis.hdel(self.pref_key(key), field)
        else:
            await self.redis.hset(self.pref_key(key), field, value)

    # --- de-duplication ---
    async def first_sighting(self, platform: str, event_id: str) -> bool:
        """True exactly once per event id across every replica (SET NX EX)."""
        if not event_id:
            return True
        name = f"{self.prefix}seen:{platform}:{event_id}"
        return bool(await self.redis.set(name, "1", nx=True, ex=self.dedup_ttl))

    # --- replies in flight (for the Stop button, on whichever replica it is pressed) ---
    def _turn_key(self, token: str) -> str:
        return f"{self.prefix}turn:{token}"

    async def claim_turn(self, token: str, user_id: str, ttl: float) -> None:
        await self.redis.set(self._turn_key(token), user_id, ex=max(1, int(ttl)))

    async def release_turn(self, token: str) -> None:
        await self.redis.delete(self._turn_key(token))

    async def turn_owner(self, token: str) -> str | None:
        owner = await self.redis.get(self._turn_key(token))
        return None if owner is None else _text(owner)

    @property
    def stop_channel(self) -> str:
        return f"{self.prefix}stop"

    async def publish_stop(self, token: str) -> None:
        await self.redis.publish(self.stop_channel, token)

    async def stop_requests(self) -> AsyncIterator[str]:
        """Stop tokens published by any replica; survives Redis restarts (re-subscribes)."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.stop_channel)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        yield _text(message["data"])
            except (RedisError, OSError) as e:
                log.warning("stop channel lost (%s); resubscribing", e)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    # --- per-thread lock ---
    @asynccontextmanager
    async def thread_lock(self, key: ConversationKey, *, expire: float) -> AsyncIterator[None]:
        """Two messages in one thread run one after the other, on any replica.

        The lock expires after `expire` seconds so a crashed replica never blocks a thread for
        good; a second message waits at most that long for the first to finish.
        """
        lock = self.redis.lock(
            self.lock_key(key), timeout=expire, blocking_timeout=expire, sleep=0.05
        )
        if not await lock.acquire():
            raise TimeoutError("thread is busy")
        try:
            yield
        finally:
            with contextlib.suppress(LockError):  # expired while we worked: the next went ahead
                await lock.release()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
