"""Shared state on a real Redis: history, preferences, de-duplication, thread locks, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bot.embedded_redis import EmbeddedRedis
from bot.state import HistoryEntry, Preferences, State
from bot.turn import ConversationKey

KEY = ConversationKey("slack", "T1", "C1", "1700000000.000100")
OTHER = ConversationKey("slack", "T1", "C1", "1700000099.000200")


def make_state(client: aioredis.Redis, **options: int | float) -> State:
    return State(client, prefix="test:", **options)  # type: ignore[arg-type]


def said(n: int) -> HistoryEntry:
    return HistoryEntry("user", f"message {n}", user_id="U1", user_name="alice")


# --- history --------------------------------------------------------------------------------


async def test_history_keeps_the_newest_n_in_order(redis_client: aioredis.Redis) -> None:
    state = make_state(redis_client, history_max=4)
    for n in range(3):
        await state.append(KEY, said(n))
    await state.append(KEY, said(3), said(4), said(5))
    assert [e.content for e in await state.history(KEY)] == [f"message {n}" for n in (2, 3, 4, 5)]
    assert await redis_client.llen(state.history_key(KEY)) == 4


async def test_every_write_refreshes_the_history_ttl(redis_client: aioredis.Redis) -> None:
    state = make_state(redis_client, history_ttl=3600)
    name = state.history_key(KEY)
    await state.append(KEY, said(1))
    assert 3590 <= await redis_client.ttl(name) <= 3600
    await redis_client.expire(name, 10)
    await state.append(KEY, said(2))
    assert 3590 <= await redis_client.ttl(name) <= 3600


async def test_history_keys_share_the_conversations_hash_tag(
    redis_client: aioredis.Redis,
) -> None:
    state = make_state(redis_client)
    assert state.history_key(KEY) == "test:hist:{slack:T1:C1:1700000000.000100}"
    assert state.lock_key(KEY).endswith("{slack:T1:C1:1700000000.000100}")


async def test_a_sub_second_history_ttl_still_keeps_the_history(
    redis_client: aioredis.Redis,
) -> None:
    # PARLEY_HISTORY_TTL_DAYS only has to be > 0; a tiny value must not mean "EXPIRE 0"
    state = make_state(redis_client, history_ttl=0.5)
    await state.append(KEY, said(1))
    assert [e.content for e in await state.history(KEY)] == ["message 1"]


async def test_entries_keep_who_said_them_and_which_model_answered(
    redis_client: aioredis.Redis,
) -> None:
    state = make_state(redis_client)
    await state.append(
        KEY,
        HistoryEntry("user", "hi from Zoë 👋", user_id="U1", user_name="Zoë"),
        HistoryEntry("user", "and bob", user_id="U2", user_name="bob"),
        HistoryEntry("assistant", "hello both", model="qwen3:8b"),
    )
    assert await state.history(KEY) == [
        HistoryEntry("user", "hi from Zoë 👋", user_id="U1", user_name="Zoë"),
        HistoryEntry("user", "and bob", user_id="U2", user_name="bob"),
        HistoryEntry("assistant", "hello both", model="qwen3:8b"),
    ]


async def test_a_corrupt_history_entry_is_skipped(redis_client: aioredis.Redis) -> None:
    state = make_state(redis_client)
    await state.append(KEY, said(1))
    await redis_client.rpush(state.history_key(KEY), "{not json", '{"role": "user"}')
    await state.append(KEY, said(2))
    assert [e.content for e in await state.history(KEY)] == ["message 1", "message 2"]


async def test_forget_drops_one_thread_only(redis_client: aioredis.Redis) -> None:
    state = make_state(redis_client)
    await state.append(KEY, said(1))
    await state.append(OTHER, said(2))
    assert await state.is_active(KEY)
    assert await state.forget(KEY) is True
    assert await state.history(KEY) == []
    assert not await state.is_active(KEY)
    assert await state.forget(KEY) is False
    assert [e.content for e in await state.history(OTHER)] == ["message 2"]


# --- preferences ----------------------------------------------------------------------------


async def test_preferences_set_get_and_clear_per_channel(redis_client: aioredis.Redis) -> None:
    state = make_state(redis_client)
    assert await state.preferences(KEY) == Preferences()
    await state.set_preference(KEY, "model", "qwen3:8b")
    await state.set_preference(KEY, "system_prompt", "Be terse.")
    # preferences belong to the channel: another thread in it sees them
    assert await state.preferences(OTHER) == Preferences("qwen3:8b", "Be terse.")
    await state.set_preference(KEY, "model", None)
    assert await state.preferences(KEY) == Preferences(None, "Be terse.")
    elsewhere = ConversationKey("slack", "T1", "C2", "1")
    assert await state.preferences(elsewhere) == Preferences()


# --- de-duplication -------------------------------------------------------------------------


async def test_first_sighting_is_true_exactly_once_across_replicas(redis_url: str) -> None:
    one = aioredis.Redis.from_url(redis_url, decode_responses=True)
    two = aioredis.Redis.from_url(redis_url, decode_responses=True)
    replicas = [make_state(one), make_state(two)]
    try:
        results = await asyncio.gather(
            *(replicas[i % 2].first_sighting("slack", "Ev123") for i in range(20))
        )
        assert results.count(True) == 1
        assert await replicas[1].first_sighting("slack", "Ev124") is True
        assert await replicas[0].first_sighting("discord", "Ev123") is True  # per platform
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_seen_event_expires_after_the_dedup_ttl(redis_client: aioredis.Redis) -> None:
    state = make_state(redis_client, dedup_ttl=600)
    assert await state.first_sighting("slack", "Ev1")
    ttl = await redis_client.ttl("test:seen:{slack:Ev1}")
    assert 590 <= ttl <= 600


# --- per-thread lock ------------------------------------------------------------------------


async def test_thread_lock_lets_the_second_holder_in_only_after_the_first_leaves(
    redis_url: str,
) -> None:
    one = aioredis.Redis.from_url(redis_url, decode_responses=True)
    two = aioredis.Redis.from_url(redis_url, decode_responses=True)
    events: list[str] = []
    first_inside = asyncio.Event()

    async def holder(state: State, name: str, hold: float) -> None:
        async with state.thread_lock(KEY, expire=5):
            events.append(f"{name} in")
            first_inside.set()
            await asyncio.sleep(hold)
            events.append(f"{name} out")

    try:
        first = asyncio.create_task(holder(make_state(one), "first", 0.3))
        await asyncio.wait_for(first_inside.wait(), 2)
        second = asyncio.create_task(holder(make_state(two), "second", 0))
        await asyncio.wait_for(asyncio.gather(first, second), 5)
    finally:
        await one.aclose()
        await two.aclose()
    assert events == ["first in", "first out", "second in", "second out"]


async def test_thread_locks_of_different_threads_do_not_wait_for_each_other(
    redis_client: aioredis.Redis,
) -> None:
    state = make_state(redis_client)
    async with (
        state.thread_lock(KEY, expire=5),
        asyncio.timeout(1),
        state.thread_lock(OTHER, expire=5),
    ):
        pass


async def test_a_thread_lock_never_released_expires_so_the_next_message_runs(
    redis_url: str,
) -> None:
    """A replica that crashed inside the lock: the next holder (same settings) gets in."""
    crashed = aioredis.Redis.from_url(redis_url, decode_responses=True)
    alive = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        held = make_state(crashed).thread_lock(KEY, expire=0.4)
        await held.__aenter__()  # and never __aexit__: the replica died
        started = time.monotonic()
        async with asyncio.timeout(3), make_state(alive).thread_lock(KEY, expire=0.4):
            waited = time.monotonic() - started
    finally:
        await crashed.aclose()
        await alive.aclose()
    assert 0.2 <= waited < 1.5


async def test_a_thread_lock_held_past_expiry_lets_the_next_holder_in_after_it_lapses(
    redis_url: str,
) -> None:
    crashed = aioredis.Redis.from_url(redis_url, decode_responses=True)
    alive = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        held = make_state(crashed).thread_lock(KEY, expire=0.3)
        await held.__aenter__()
        started = time.monotonic()
        async with asyncio.timeout(3), make_state(alive).thread_lock(KEY, expire=2):
            waited = time.monotonic() - started
        # the crashed holder's late exit is harmless (the lock is no longer its)
        await held.__aexit__(None, None, None)
    finally:
        await crashed.aclose()
        await alive.aclose()
    assert 0.15 <= waited < 1.5


async def test_waiting_too_long_for_a_thread_lock_is_not_mistaken_for_redis_being_down(
    redis_client: aioredis.Redis,
) -> None:
    """Conversation reports RedisError/OSError as "Redis is unavailable"; a busy thread isn't."""
    from redis.exceptions import RedisError

    state = make_state(redis_client)
    refused: Exception | None = None
    async with state.thread_lock(KEY, expire=5):
        try:
            async with state.thread_lock(KEY, expire=0.2):
                pass
        except Exception as e:
            refused = e
    assert refused is not None, "the second holder got in while the first held the lock"
    assert not isinstance(refused, RedisError | OSError), repr(refused)


# --- persistence ----------------------------------------------------------------------------


async def test_history_survives_a_redis_server_restart(tmp_path: Path) -> None:
    thread = ConversationKey("console", "local", "console", uuid.uuid4().hex)
    server = EmbeddedRedis(tmp_path, persist=True)
    client = aioredis.Redis.from_url(await server.start(), decode_responses=True)
    try:
        state = make_state(client)
        await state.append(thread, said(1), HistoryEntry("assistant", "reply", model="m"))
        await state.set_preference(thread, "model", "qwen3:8b")
    finally:
        await client.aclose()
        await server.stop()

    again = EmbeddedRedis(tmp_path, persist=True)
    client = aioredis.Redis.from_url(await again.start(), decode_responses=True)
    try:
        state = make_state(client)
        assert [e.content for e in await state.history(thread)] == ["message 1", "reply"]
        assert (await state.preferences(thread)).model == "qwen3:8b"
        assert await client.ttl(state.history_key(thread)) > 0
    finally:
        await client.aclose()
        with contextlib.suppress(Exception):
            await again.stop()


@pytest.mark.parametrize("decode", [True, False])
async def test_state_works_with_and_without_decoded_responses(redis_url: str, decode: bool) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=decode)
    try:
        state = make_state(client)
        await state.append(KEY, said(1))
        await state.set_preference(KEY, "model", "m")
        assert [e.content for e in await state.history(KEY)] == ["message 1"]
        assert (await state.preferences(KEY)).model == "m"
    finally:
        await client.aclose()


def test_an_embedded_redis_outlives_the_loop_that_started_it() -> None:
    """Linux's parent-death signal follows the *thread* that spawned the server: spawned from a
    loop's worker thread, it died when that loop shut its executor down."""
    import redis as sync_redis

    server = EmbeddedRedis(None, persist=False)
    asyncio.run(server.start())  # asyncio.run ends by shutting down the default executor
    try:
        time.sleep(0.3)
        with sync_redis.Redis(port=server.port) as client:
            assert client.ping()
    finally:
        server.stop_sync()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="the parent-death signal is Linux's")
def test_an_embedded_redis_dies_with_the_process_that_started_it() -> None:
    """No orphaned redis-server when Parley is killed without stopping it."""
    import subprocess
    import sys

    script = (
        "import asyncio, os\n"
        "from bot.embedded_redis import EmbeddedRedis\n"
        "server = EmbeddedRedis(None, persist=False)\n"
        "asyncio.run(server.start())\n"
        "print(server._process.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 5
    while not _gone(pid):
        assert time.monotonic() < deadline, "the redis-server outlived its parent"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """Exited (or a zombie waiting for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] in ("Z", "X")
    except FileNotFoundError:
        return True
