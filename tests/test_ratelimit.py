"""Per-user limits on a real Redis, shared by replicas (separate clients, separate Limiters)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bot.errors import UserRateLimited, describe
from bot.ratelimit import Limiter
from bot.settings import RateLimit, parse_rate

FIVE_PER_MINUTE = parse_rate("5/minute")


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    """Two replicas' Redis connections: separate clients, separate pools."""
    one = aioredis.Redis.from_url(redis_url, decode_responses=True)
    two = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield one, two
    await one.aclose()
    await two.aclose()


def replicas(
    clients: tuple[aioredis.Redis, aioredis.Redis],
    *,
    rate: RateLimit = FIVE_PER_MINUTE,
    max_in_flight: int = 2,
    in_flight_ttl: float = 60,
) -> list[Limiter]:
    return [
        Limiter(
            client,
            rate=rate,
            max_in_flight=max_in_flight,
            in_flight_ttl=in_flight_ttl,
            prefix="test:",
        )
        for client in clients
    ]


async def outcome(awaitable: object) -> UserRateLimited | None:
    try:
        await awaitable  # type: ignore[misc]
    except UserRateLimited as e:
        return e
    return None


# --- request rate ---------------------------------------------------------------------------


async def test_twenty_concurrent_requests_on_two_replicas_admit_exactly_the_rate(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    limiters = replicas(clients)
    results = await asyncio.gather(
        *(outcome(limiters[i % 2].check_rate("slack", "U1")) for i in range(20))
    )
    refused = [r for r in results if r is not None]
    assert results.count(None) == 5
    assert len(refused) == 15
    assert all(0 < r.retry_after <= 60 for r in refused)
    assert all(not r.in_flight for r in refused)
    assert "too fast" in describe(refused[0])


async def test_the_rate_is_per_user_and_per_platform(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    one, two = replicas(clients, rate=parse_rate("1/minute"))
    await one.check_rate("slack", "U1")
    with pytest.raises(UserRateLimited):
        await two.check_rate("slack", "U1")
    await two.check_rate("slack", "U2")
    await two.check_rate("discord", "U1")


# --- generations in flight ------------------------------------------------------------------


async def test_in_flight_admits_at_most_k_across_replicas_and_frees_on_exit(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    limiters = replicas(clients, max_in_flight=2)
    inside = 0
    most = 0
    release = asyncio.Event()

    async def generate(limiter: Limiter) -> None:
        nonlocal inside, most
        async with limiter.in_flight("slack", "U1"):
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(outcome(generate(limiters[i % 2]))) for i in range(6)]
    deadline = time.monotonic() + 2
    while sum(t.done() for t in tasks) < 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert inside == 2
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 2)
    refused = [r for r in results if r is not None]
    assert len(refused) == 4
    assert all(r.in_flight and 0 < r.retry_after <= 30 for r in refused)
    assert most == 2
    # every slot is free again
    async with limiters[0].in_flight("slack", "U1"), limiters[1].in_flight("slack", "U1"):
        pass


async def test_in_flight_frees_the_slot_when_the_block_raises(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    one, two = replicas(clients, max_in_flight=1)
    with pytest.raises(RuntimeError):
        async with one.in_flight("discord", "U1"):
            raise RuntimeError("the model exploded")
    async with asyncio.timeout(1), two.in_flight("discord", "U1"):
        pass


async def test_in_flight_is_per_user(clients: tuple[aioredis.Redis, aioredis.Redis]) -> None:
    one, two = replicas(clients, max_in_flight=1)
    async with one.in_flight("slack", "U1"), two.in_flight("slack", "U2"):
        with pytest.raises(UserRateLimited):
            async with two.in_flight("slack", "U1"):
                pass


async def test_an_in_flight_entry_of_a_crashed_holder_expires_on_its_own(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    crashed, alive = replicas(clients, max_in_flight=1, in_flight_ttl=0.3)
    held = crashed.in_flight("slack", "U1")
    await held.__aenter__()  # and never __aexit__: the replica died
    with pytest.raises(UserRateLimited) as caught:
        async with alive.in_flight("slack", "U1"):
            pass
    assert 0 < caught.value.retry_after <= 0.3
    deadline = time.monotonic() + 2
    while True:
        try:
            async with alive.in_flight("slack", "U1"):
                break
        except UserRateLimited:
            assert time.monotonic() < deadline, "the crashed holder's slot never expired"
            await asyncio.sleep(0.05)
    # the key itself lapses too, leaving nothing behind in Redis
    deadline = time.monotonic() + 2
    while await clients[0].exists("test:busy:{slack:U1}"):
        assert time.monotonic() < deadline, "the busy key never expired"
        await asyncio.sleep(0.05)


# --- shared budgets -------------------------------------------------------------------------


async def test_budget_wait_is_zero_for_the_first_n_then_positive(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    one, two = replicas(clients)
    waits = await asyncio.gather(
        *((one, two)[i % 2].budget_wait("slack:T1", 3, 60) for i in range(5))
    )
    assert sorted(waits)[:3] == [0.0, 0.0, 0.0]
    assert all(0 < w <= 60 for w in sorted(waits)[3:])
    assert await one.budget_wait("slack:T2", 3, 60) == 0.0  # another budget
