"""Backend capacity: an uncapped backend takes everyone at once; a cap is shared by every
replica through Redis, its queue is first come, first served across people, and a queued
person's reply shows their place as it moves."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import redis.asyncio as aioredis

from bot.app import Parley
from bot.capacity import Capacity
from bot.conversation import Outcome
from bot.settings import BackendConfig, Settings
from bot.turn import ConversationKey, Turn
from tests.fakes.model_server import FakeModelServer, Script
from tests.sinks import RecordingSink
from tests.support import make_settings, until

ROUND_TRIP = 0.1  # what each platform call of the recording sink takes
LOAD = 0.3  # the model's time to its first token
WORDS = ["one", " two", " three", " four", " five", " six"]


def turn(n: int) -> Turn:
    key = ConversationKey("slack", "T1", "C1", f"1700000000.{n:06d}")
    return Turn(key, f"U{n}", f"person{n}", f"question {n}", uuid.uuid4().hex)


async def ask_all(apps: list[Parley], count: int) -> tuple[list[RecordingSink], float]:
    sinks = [RecordingSink(min_edit_interval=0.05, latency=ROUND_TRIP) for _ in range(count)]
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(apps[n % len(apps)].conversation.handle(turn(n), sinks[n]) for n in range(count))
    )
    assert outcomes == [Outcome.COMPLETE] * count
    return sinks, started


def first_text_at(sink: RecordingSink) -> float:
    """When the first answer text reached the platform."""
    return next(c.ended for c in sink.calls if "one" in c.text)


def test_caps_by_backend_kind_unless_set() -> None:
    local = BackendConfig(name="local", kind="ollama", url="http://h:11434")
    cloud = BackendConfig(name="cloud", kind="ollama", url="https://ollama.com", cloud=True)
    server = BackendConfig(name="vllm", kind="openai", url="http://h:8000")
    assert [b.cap(None) for b in (local, cloud, server)] == [4, 0, 0]
    assert [b.cap(8) for b in (local, cloud, server)] == [8, 8, 8]
    own = BackendConfig(name="local", kind="ollama", url="http://h:11434", concurrency=0)
    assert own.cap(8) == 0
    settings = Settings(_env_file=None, ollama_api_key="k")  # type: ignore[call-arg]
    assert settings.backend_caps() == {"local": 4, "cloud": 0}


async def test_ten_people_at_once_on_an_uncapped_backend_all_see_their_first_word_together(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.default = Script(tokens=WORDS, first_delay=LOAD, delay=0.1)
    settings = make_settings(
        redis_url,
        model_server,
        backends=[{"name": "vllm", "kind": "openai", "url": model_server.url}],
    )
    app = await Parley.open(settings)
    try:
        sinks, started = await ask_all([app], 10)
        assert model_server.max_in_flight == 10
        # each first word shows within one platform round trip (and a little scheduling) of
        # the backend's first token, which came LOAD seconds after the question
        for sink in sinks:
            assert first_text_at(sink) - started < LOAD + ROUND_TRIP + 0.35
            assert not any("Waiting for the model" in c.text for c in sink.calls)
    finally:
        await app.aclose()


async def test_a_cap_is_shared_by_replicas_and_queued_people_see_their_place(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.default = Script(tokens=WORDS, delay=0.15)
    settings = make_settings(redis_url, model_server, backend_concurrency=2)
    one, two = await Parley.open(settings), await Parley.open(settings)
    try:
        sinks, _ = await ask_all([one, two], 6)
        assert model_server.max_in_flight == 2  # two replicas, one cap
        places = [
            [int(m.group(1)) for c in s.calls if (m := re.search(r"(\d+) ahead of you", c.text))]
            for s in sinks
        ]
        queued = [p for p in places if p]
        assert len(queued) >= 2  # four waited; the first told had the most ahead
        for shown in queued:
            assert shown == sorted(shown, reverse=True)  # the place only moves forward
        assert max(max(p) for p in queued) >= 2
        for sink in sinks:  # and every reply is whole, its waiting line gone
            assert sink.messages[-1] == "one two three four five six"
        for part in ("holders", "queue"):  # every place given back, no one left queued
            assert await one.redis.zcard(f"parley:{part}:{{cap:local}}") == 0
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_person_with_turns_in_hand_waits_behind_people_with_none(
    redis_client: aioredis.Redis,
) -> None:
    capacity = Capacity({"local": 1}, redis_client, prefix=f"t{uuid.uuid4().hex[:6]}:")
    first = await capacity.enter("local", "ada")
    order: list[str] = []

    async def ask(name: str, person: str) -> None:
        held = await capacity.enter("local", person)
        order.append(name)
        await asyncio.sleep(0.05)
        await held.release()

    ada_2 = asyncio.create_task(ask("ada-2", "ada"))
    await asyncio.sleep(0.1)
    ada_3 = asyncio.create_task(ask("ada-3", "ada"))
    await asyncio.sleep(0.1)
    bob_1 = asyncio.create_task(ask("bob-1", "bob"))  # came last, but is bob's first
    await asyncio.sleep(0.1)
    await first.release()
    await asyncio.gather(ada_2, ada_3, bob_1)
    assert order == ["bob-1", "ada-2", "ada-3"]  # ada had one generating already


async def test_a_turn_stopped_while_queued_leaves_the_queue(
    redis_client: aioredis.Redis,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:6]}:"
    capacity = Capacity({"local": 1}, redis_client, prefix=prefix)
    held = await capacity.enter("local", "ada")
    told: list[int] = []
    waiting = asyncio.create_task(capacity.enter("local", "bob", told.append))
    await until(lambda: told == [0])  # next in line
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert await redis_client.zcard(f"{prefix}queue:{{cap:local}}") == 0
    await held.release()
    assert await redis_client.zcard(f"{prefix}holders:{{cap:local}}") == 0
    again = await asyncio.wait_for(capacity.enter("local", "cy"), 1.0)  # the place is free
    await again.release()


async def test_without_redis_the_cap_is_per_process(redis_url: str) -> None:
    capacity = Capacity({"a": 1, "b": 0})
    held = await capacity.enter("a", "ada")
    late = asyncio.create_task(capacity.enter("a", "bob"))
    await asyncio.sleep(0.05)
    assert not late.done()
    await (await capacity.enter("b", "cy")).release()  # no cap: at once
    await held.release()
    await (await asyncio.wait_for(late, 1.0)).release()
