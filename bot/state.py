"""Shared state in Redis: thread history, channel preferences, event de-duplication, locks.

The same code runs on one Redis (or a Sentinel-watched primary) and on Redis Cluster: every script
touches keys of one hash slot only (a thread's keys share the tag `{platform:space:channel:thread}`,
an event's de-dup key and its Stop-button owner share `{platform:event_id}`), multi-key atomic
writes are Lua scripts rather than MULTI, and pipelines are plain (a cluster client splits them by
node).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from bot import fastjson
from bot.backends.base import Image, ToolCall
from bot.errors import ThreadBusy
from bot.turn import ConversationKey

# Record who may press Stop — only for the turn that saw the event first (KEYS[1] holds its
# token), so a duplicate delivery never claims, nor later deletes, the owner of the real reply.
CLAIM_TURN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# Append to a thread's history (after dropping its last ARGV[3] entries: a regenerated exchange
# replaces the one before), keep its newest ARGV[1] entries and refresh its TTL, atomically.
APPEND_HISTORY = """
if tonumber(ARGV[3]) > 0 then
  redis.call('LTRIM', KEYS[1], 0, -tonumber(ARGV[3]) - 1)
end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 4))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Keep a thread's images: add ARGV[4..] (id, value pairs), then drop the oldest (ids sort by
# time) past ARGV[1] images or ARGV[2] bytes; the hash lives as long as the thread (ARGV[3] s).
STORE_IMAGES = """
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local ids = redis.call('HKEYS', KEYS[1])
table.sort(ids)
local sizes, total = {}, 0
for _, id in ipairs(ids) do
  sizes[id] = redis.call('HSTRLEN', KEYS[1], id)
  total = total + sizes[id]
end
local first = 1
while first <= #ids and (#ids - first + 1 > tonumber(ARGV[1]) or total > tonumber(ARGV[2])) do
  redis.call('HDEL', KEYS[1], ids[first])
  total = total - sizes[ids[first]]
  first = first + 1
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return #ids - first + 1
"""

CALIBRATION_WEIGHT = 0.2  # how much one prompt's measurement moves a model's average

# KEYS[1] calibration hash; ARGV model, measurement, weight → the new average
CALIBRATE = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local new = tonumber(ARGV[2])
if old then new = old + (new - old) * tonumber(ARGV[3]) end
local text = string.format('%.4f', new)
redis.call('HSET', KEYS[1], ARGV[1], text)
return text
"""

# Fold a thread's oldest ARGV[1] entries into its summary: only if they are still the ones that
# were summarised (its first is ARGV[2], its last ARGV[3]); the summary (ARGV[4]) lives as long as
# the thread (ARGV[5] s). KEYS[1] history, KEYS[2] summary → 1 folded, 0 the history had moved on.
FOLD_HISTORY = """
local n = tonumber(ARGV[1])
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[2] or redis.call('LINDEX', KEYS[1], n - 1) ~= ARGV[3]
then
  return 0
end
redis.call('LTRIM', KEYS[1], n, -1)
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# Keep a lock ARGV[2] ms more, only if it still holds our token.
HOLD_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Delete a lock only if it still holds our token (it may have expired and been taken since).
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

log = logging.getLogger(__name__)

# What a lost or restarting Redis raises (a cluster client raises the last when no node answers)
REDIS_DOWN: tuple[type[Exception], ...] = (RedisError, OSError, RedisClusterException)

RedisClient = aioredis.Redis | RedisCluster  # one primary (or Sentinel's), or a cluster
AnyPipeline = Pipeline | ClusterPipeline


@dataclass(frozen=True)
class HistoryEntry:
    """One stored message of a thread."""

    role: str  # user | assistant
    content: str
    user_id: str = ""
    user_name: str = ""
    model: str = ""  # for assistant entries: who answered
    images: tuple[str, ...] = ()  # ids of the thread's stored images this message carried
    reply: str = ""  # assistant entries: the reply's token (its Regenerate and feedback buttons)
    calls: tuple[ToolCall, ...] = ()  # assistant entries: the tools it called
    tool_call_id: str = ""  # tool entries: the call answered
    tool_name: str = ""  # tool entries: the tool that answered

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "role": self.role,
            "content": self.content,
            "ts": round(time.time(), 3),
        }
        if self.user_id:
            data["user_id"] = self.user_id
        if self.user_name:
            data["user_name"] = self.user_name
        if self.model:
            data["model"] = self.model
        if self.images:
            data["images"] = list(self.images)
        if self.reply:
            data["reply"] = self.reply
        if self.calls:
            data["calls"] = [
                {"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.calls
            ]
        if self.tool_call_id:
            data["tool_call_id"] = self.tool_call_id
        if self.tool_name:
            data["tool_name"] = self.tool_name
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> HistoryEntry | None:
        try:
            data: dict[str, Any] = fastjson.loads(raw)
            return cls(
                role=str(data["role"]),
                content=str(data["content"]),
                user_id=str(data.get("user_id", "")),
                user_name=str(data.get("user_name", "")),
                model=str(data.get("model", "")),
                images=tuple(str(i) for i in data.get("images") or ()),
                reply=str(data.get("reply", "")),
                calls=tuple(
                    ToolCall(str(c["id"]), str(c["name"]), c["arguments"])
                    for c in data.get("calls") or ()
                    if isinstance(c.get("arguments"), dict | None)
                ),
                tool_call_id=str(data.get("tool_call_id", "")),
                tool_name=str(data.get("tool_name", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # a corrupt entry is skipped, never fatal


@dataclass(frozen=True)
class Summary:
    """What a thread's oldest turns said, folded into a few lines once they no longer fit."""

    text: str = ""
    folded: int = 0  # entries it stands for
    model: str = ""  # who wrote it

    def to_json(self) -> str:
        data = {"text": self.text, "folded": self.folded, "model": self.model}
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> Summary:
        if raw is None:
            return cls()
        try:
            data: dict[str, Any] = json.loads(_text(raw))
            return cls(str(data["text"]), int(data.get("folded", 0)), str(data.get("model", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls()  # a corrupt summary is as good as none


@dataclass(frozen=True)
class Preferences:
    model: str | None = None
    system_prompt: str | None = None


class State:
    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "parley:",
        history_max: int = 50,
        history_ttl: float = 30 * 86400,
        dedup_ttl: int = 600,
        history_fetch: int = 100,
        thread_images: int = 4,
        thread_image_bytes: int = 4_000_000,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.history_max = history_max
        self.history_ttl = max(1, math.ceil(history_ttl))  # EXPIRE 0 would delete the key
        self.dedup_ttl = dedup_ttl
        self.history_fetch = min(history_fetch, history_max)  # newest N read per turn
        self.thread_images = thread_images
        self.thread_image_bytes = thread_image_bytes
        self._release = redis.register_script(RELEASE_LOCK)
        self._calibrate = redis.register_script(CALIBRATE)
        self._fold = redis.register_script(FOLD_HISTORY)
        self._hold = redis.register_script(HOLD_LOCK)

    # --- keys ---
    def history_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}hist:{{{key.tag}}}"

    def lock_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}lock:{{{key.tag}}}"

    def images_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}img:{{{key.tag}}}"

    def summary_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}sum:{{{key.tag}}}"

    def folding_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}folding:{{{key.tag}}}"

    def bots_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}bots:{{{key.tag}}}"

    def pref_key(self, key: ConversationKey) -> str:
        return f"{self.prefix}pref:{{{key.platform}:{key.space}:{key.channel}}}"

    # --- history ---
    async def history(self, key: ConversationKey) -> list[HistoryEntry]:
        """The thread's newest messages (at most `history_fetch`: cost stays flat as it grows)."""
        raw = await self.redis.lrange(self.history_key(key), -self.history_fetch, -1)
        return list(_entries(raw))

    async def append(self, key: ConversationKey, *entries: HistoryEntry) -> None:
        """Append, trim to the newest N and refresh the TTL, atomically."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self._queue_append(pipe, key, entries)
            await pipe.execute()

    def _queue_append(
        self,
        pipe: AnyPipeline,
        key: ConversationKey,
        entries: Sequence[HistoryEntry],
        replacing: int = 0,
    ) -> None:
        pipe.execute_command(
            "EVAL",
            APPEND_HISTORY,
            1,
            self.history_key(key),
            self.history_max,
            self.history_ttl,
            replacing,
            # bytes: text that UTF-8 cannot encode (a lone surrogate) must not fail the write
            *(e.to_json().encode("utf-8", "replace") for e in entries),
        )

    async def is_active(self, key: ConversationKey) -> bool:
        """The bot answered in this thread, or is answering there now (its lock is held)."""
        return bool(await self.redis.exists(self.history_key(key), self.lock_key(key)))

    async def reply_in_progress(self, key: ConversationKey) -> str | None:
        """The Stop token of the reply being written in this thread, if one is."""
        value = await self.redis.get(self.lock_key(key))
        _, bar, token = _text(value).partition("|") if value is not None else ("", "", "")
        return token if bar else None

    async def forget(self, key: ConversationKey) -> bool:
        names = (self.history_key(key), self.summary_key(key), self.images_key(key))
        return bool(await self.redis.delete(*names))

    # --- summaries of what no longer fits ---
    async def claim_folding(self, key: ConversationKey, *, expire: float) -> str | None:
        """One summariser per thread at a time, on any replica: a token, or None if taken."""
        token = uuid.uuid4().hex
        taken = await self.redis.set(
            self.folding_key(key), token, nx=True, px=max(1, int(expire * 1000))
        )
        return token if taken else None

    async def release_folding(self, key: ConversationKey, token: str) -> None:
        await self._release(keys=[self.folding_key(key)], args=[token])

    async def hold_folding(self, key: ConversationKey, token: str, *, expire: float) -> None:
        """Keep the claim `expire` more seconds (a fold failed: let the thread rest)."""
        await self._hold(keys=[self.folding_key(key)], args=[token, max(1, int(expire * 1000))])

    async def whole_history(self, key: ConversationKey) -> tuple[list[bytes], Summary]:
        """Every stored entry of the thread, as stored (to fold exactly those), and its summary."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self.history_key(key), 0, -1)
            pipe.get(self.summary_key(key))
            raw, summary = await pipe.execute()
        return [r if isinstance(r, bytes) else r.encode() for r in raw], Summary.from_json(summary)

    async def fold(self, key: ConversationKey, span: Sequence[bytes], summary: Summary) -> bool:
        """Replace the thread's oldest entries `span` by `summary`, if they still are its oldest."""
        folded = await self._fold(
            keys=[self.history_key(key), self.summary_key(key)],
            args=[len(span), span[0], span[-1], summary.to_json(), self.history_ttl],
        )
        return bool(folded)

    # --- preferences ---
    async def preferences(self, key: ConversationKey) -> Preferences:
        return _preferences(await self.redis.hgetall(self.pref_key(key)))

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
        return bool(
            await self.redis.set(
                self._seen_key(platform, event_id), "1", nx=True, ex=self.dedup_ttl
            )
        )

    def _seen_key(self, platform: str, event_id: str) -> str:
        # tagged like the Stop-button owner of the same event (`turn_token`): one hash slot.
        # No event id: nothing to de-duplicate, a key of its own.
        unique = "" if event_id else f":{uuid.uuid4().hex}"
        return f"{self.prefix}seen:{{{turn_token(platform, event_id)}}}{unique}"

    # --- replies in flight (for the Stop button, on whichever replica it is pressed) ---
    def _turn_key(self, token: str) -> str:
        return f"{self.prefix}turn:{{{token}}}"

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
                if isinstance(self.redis, RedisCluster):
                    # its pub/sub picks a node from the slot map, empty until the first command.
                    # Cluster PUBLISH reaches every node: one subscription on any node hears all
                    await self.redis.initialize()
                await pubsub.subscribe(self.stop_channel)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        yield _text(message["data"])
            except REDIS_DOWN as e:
                log.warning("stop channel lost (%s); resubscribing", e)
                await asyncio.sleep(1.0)
            finally:
                # bounded: closing a connection whose read was just cancelled can hang
                with contextlib.suppress(*REDIS_DOWN, TimeoutError):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)  # type: ignore[no-untyped-call]

    # --- a turn's start and finish: one round trip each ---
    async def begin_turn(
        self, key: ConversationKey, *, event_id: str, owner: str, expire: float
    ) -> TurnStart:
        """Begin a turn in one round trip: de-dup, thread lock, Stop-button owner, and the
        thread's newest history and its channel's preferences.

        Whatever it took (`fresh`, `locked`, `claimed`) is given back by `finish_turn`, which
        must run whatever happens next. The lock's value names the reply being written (its
        Stop token after a `|`), so a platform's own stop control can find it by thread.
        """
        token = f"{uuid.uuid4().hex}|{turn_token(key.platform, event_id)}"
        expire_ms = max(1, int(expire * 1000))
        seen = self._seen_key(key.platform, event_id)
        turn_key = self._turn_key(turn_token(key.platform, event_id))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(seen, token, nx=True, ex=self.dedup_ttl)
            pipe.set(self.lock_key(key), token, nx=True, px=expire_ms)
            # EVAL, not EVALSHA: redis-py precedes a pipeline holding a registered script with
            # a SCRIPT EXISTS round trip, and a NOSCRIPT retry would re-run the de-dup SET NX
            pipe.execute_command("EVAL", CLAIM_TURN, 2, seen, turn_key, token, owner, expire_ms)
            pipe.lrange(self.history_key(key), -self.history_fetch, -1)
            pipe.hgetall(self.pref_key(key))
            pipe.hgetall(self.images_key(key))
            pipe.get(self.bots_key(key))
            pipe.get(self.summary_key(key))
            answers = await pipe.execute(raise_on_error=False)
        fresh, locked, claimed = (bool(a) and not isinstance(a, Exception) for a in answers[:3])
        start = TurnStart(key, event_id, owner, expire_ms, token, fresh, locked, claimed)
        if failed := next((a for a in answers if isinstance(a, Exception)), None):
            # a command failed after others had taken the lock or the Stop owner (a key of the
            # wrong type, say): give back what was taken before the error goes up
            with contextlib.suppress(*REDIS_DOWN):
                await self.finish_turn(start)
            raise failed
        history, prefs, images, bots, summary = answers[3:]
        return replace(
            start,
            history=_entries(history),
            prefs=_preferences(prefs),
            images=_images(images),
            bot_streak=int(bots or 0),
            summary=Summary.from_json(summary),
        )

    async def wait_for_thread(
        self, start: TurnStart, *, poll: float = 0.05, wait: float | None = None
    ) -> TurnStart:
        """The thread was busy: wait for its lock, then read the context the turn follows."""
        deadline = time.monotonic() + (start.expire_ms / 1000 if wait is None else wait)
        name = self.lock_key(start.key)
        while not await self.redis.set(name, start.lock_token, nx=True, px=start.expire_ms):
            if time.monotonic() > deadline:
                raise ThreadBusy()  # not TimeoutError: that is an OSError, read as "Redis down"
            await asyncio.sleep(poll)
        start = replace(start, locked=True)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self.history_key(start.key), -self.history_fetch, -1)
            pipe.hgetall(self.pref_key(start.key))
            pipe.hgetall(self.images_key(start.key))
            pipe.get(self.summary_key(start.key))
            history, prefs, images, summary = await pipe.execute()
        return replace(
            start,
            history=_entries(history),
            prefs=_preferences(prefs),
            images=_images(images),
            summary=Summary.from_json(summary),
        )

    async def finish_turn(
        self,
        start: TurnStart,
        entries: Sequence[HistoryEntry] = (),
        *,
        slot: InFlightSlot | None = None,
        images: Mapping[str, Image] | None = None,
        from_bot: bool | None = None,
        replacing: int = 0,
    ) -> None:
        """Finish a turn in one round trip: free the thread, the in-flight `slot` and the Stop
        owner, and save the exchange (with the `images` its entries name) — in place of the last
        `replacing` entries (a regenerated answer); count the thread's run of answered bot turns
        (`from_bot`: True adds one, False ends the run).

        The releases go first in the pipeline, so a failing write after them cannot keep them;
        if Redis cannot be reached, the lock, the slot and the owner lapse by themselves.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            if start.locked:
                pipe.execute_command(
                    "EVAL", RELEASE_LOCK, 1, self.lock_key(start.key), start.lock_token
                )
            if slot is not None:  # whether or not it was admitted: ZREM of no member is a no-op
                pipe.zrem(slot.name, slot.member)
            if start.claimed:
                pipe.delete(self._turn_key(start.token))
            if entries:
                self._queue_append(pipe, start.key, entries, replacing)
                pipe.expire(self.summary_key(start.key), self.history_ttl)  # lives with it
            if from_bot:
                pipe.incr(self.bots_key(start.key))
                pipe.expire(self.bots_key(start.key), self.history_ttl)
            elif from_bot is not None and start.bot_streak:
                pipe.delete(self.bots_key(start.key))
            if entries and start.images:  # images no stored message names any more go
                kept = [*start.history[: len(start.history) - replacing], *entries]
                named = {i for e in kept[-self.history_max :] for i in e.images}
                if stale := [i for i in start.images if i not in named]:
                    pipe.hdel(self.images_key(start.key), *stale)
            if images or (entries and start.images):  # the images live as long as the thread
                values = [
                    part for i, image in (images or {}).items() for part in (i, _image_json(image))
                ]
                pipe.execute_command(
                    "EVAL",
                    STORE_IMAGES,
                    1,
                    self.images_key(start.key),
                    self.thread_images,
                    self.thread_image_bytes,
                    self.history_ttl,
                    *values,
                )
            if len(pipe):
                await pipe.execute()

    # --- token counts: each model's characters per token, from what its backend counted ---
    def _calibration_key(self) -> str:
        return f"{self.prefix}calib"

    async def chars_per_token(self, model: str) -> float | None:
        """What `model`'s prompts measured, in characters per token (None: not yet)."""
        raw = await self.redis.hget(self._calibration_key(), model)
        try:
            return None if raw is None else float(_text(raw))
        except ValueError:
            return None

    async def calibrate(self, model: str, measured: float) -> float:
        """Fold one measurement into `model`'s characters per token (a moving average, in one
        script: replicas measuring at once both count); the new value."""
        raw = await self._calibrate(
            keys=[self._calibration_key()], args=[model, repr(measured), CALIBRATION_WEIGHT]
        )
        return float(_text(raw))

    # --- finished replies: their buttons (Regenerate, 👍, 👎) ---
    def _reply_key(self, token: str) -> str:
        return f"{self.prefix}reply:{{{token}}}"

    async def remember_reply(self, token: str, key: ConversationKey, model: str) -> None:
        """A reply about to show its buttons: its thread and model, for as long as history."""
        where = [key.platform, key.space, key.channel, key.thread]
        record = json.dumps({"key": where, "model": model})
        await self.redis.set(self._reply_key(token), record, ex=self.history_ttl)

    async def reply(self, token: str) -> tuple[ConversationKey, str] | None:
        """The thread a finished reply is in, and the model that wrote it."""
        raw = await self.redis.get(self._reply_key(token))
        if raw is None:
            return None
        try:
            data: Any = json.loads(_text(raw))
            platform, space, channel, thread = (str(part) for part in data["key"])
            return ConversationKey(platform, space, channel, thread), str(data["model"])
        except (ValueError, KeyError, TypeError):
            return None

    async def vote(self, token: str, user_id: str, vote: str) -> str | None:
        """Record a person's vote on a reply (the last counts); their earlier vote, if any."""
        votes = f"{self.prefix}votes:{{{token}}}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(votes, user_id)
            pipe.hset(votes, user_id, vote)
            pipe.expire(votes, self.history_ttl)
            before, _, _ = await pipe.execute()
        return None if before is None else _text(before)

    # --- reply chains (where a conversation is a chain of replies: Discord channels) ---
    def _root_key(self, key: ConversationKey, message_id: str) -> str:
        return f"{self.prefix}root:{{{key.platform}:{key.space}:{key.channel}:{message_id}}}"

    async def remember_chain(self, key: ConversationKey, message_ids: Sequence[str]) -> None:
        """These messages belong to `key`'s conversation (for as long as its history lasts)."""
        async with self.redis.pipeline(transaction=False) as pipe:  # keys of several slots
            for message_id in message_ids:
                pipe.set(self._root_key(key, message_id), key.thread, ex=self.history_ttl)
            await pipe.execute()

    async def chain_root(self, key: ConversationKey, message_id: str) -> str | None:
        """The conversation (its thread) that `message_id`, in `key`'s channel, belongs to."""
        root = await self.redis.get(self._root_key(key, message_id))
        return None if root is None else _text(root)

    @asynccontextmanager
    async def thread_lock(
        self, key: ConversationKey, *, expire: float, wait: float | None = None
    ) -> AsyncIterator[None]:
        """Two messages in one thread run one after the other, on any replica.

        The lock expires after `expire` seconds so a crashed replica never blocks a thread for
        good; a second message waits at most that long (or `wait`) for the first to finish,
        then ThreadBusy.
        """
        token = uuid.uuid4().hex
        start = TurnStart(key, "", "", int(expire * 1000), token, False, False, False)
        await self.wait_for_thread(start, wait=wait)
        try:
            yield
        finally:
            await self._release(keys=[self.lock_key(key)], args=[token])


def turn_token(platform: str, event_id: str) -> str:
    """Names a reply in flight (what its Stop button carries); the hash tag of its event's keys."""
    return f"{platform}:{event_id}"


@dataclass(frozen=True)
class TurnStart:
    """What a turn holds in Redis while it runs, and what its first round trip read."""

    key: ConversationKey
    event_id: str
    owner: str  # who may press Stop
    expire_ms: int  # locks and claims lapse by themselves after this
    lock_token: str
    fresh: bool  # the first sighting of its event
    locked: bool  # holds the thread's lock
    claimed: bool  # holds the Stop owner
    history: tuple[HistoryEntry, ...] = ()
    prefs: Preferences = Preferences()
    images: Mapping[str, Image] = field(default_factory=dict)  # the thread's, by id
    bot_streak: int = 0  # bot turns answered in a row in this thread
    summary: Summary = Summary()  # what the thread's folded turns said

    @property
    def token(self) -> str:
        """The Stop button's token."""
        return turn_token(self.key.platform, self.event_id)


@dataclass(frozen=True)
class InFlightSlot:
    """One of a person's K generation slots (a member of their self-expiring `busy` set)."""

    name: str
    member: str


def _entries(raw: Sequence[bytes | str]) -> tuple[HistoryEntry, ...]:
    return tuple(e for e in map(HistoryEntry.from_json, map(_text, raw)) if e is not None)


def image_id() -> str:
    """A new image's id in its thread: ids sort by when they were stored."""
    return f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"


def _image_json(image: Image) -> str:
    return json.dumps({"t": image.media_type, "d": image.data})


def _images(raw: dict[Any, Any]) -> dict[str, Image]:
    found = {}
    for key, value in raw.items():
        try:
            data = fastjson.loads(_text(value))
            found[_text(key)] = Image(str(data["t"]), str(data["d"]))
        except (ValueError, KeyError, TypeError):
            continue  # a corrupt entry is skipped
    return found


def _preferences(raw: dict[Any, Any]) -> Preferences:
    data = {_text(k): _text(v) for k, v in raw.items()}
    return Preferences(model=data.get("model"), system_prompt=data.get("system_prompt"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
