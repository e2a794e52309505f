"""Per-user limits on a real Redis, shared by replicas (separate clients, separate Limiters)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bot.errors import UserRateLimited, describe
from bot.ratelimit import EditBudgets, Limiter
from bot.settings import RateLimit, parse_rate
from bot.turn import EditBudget

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


# --- shared edit budgets -------------------------------------------------------------------


class Clock:
    """A hand-moved clock (seconds), shared by replicas, so windows pass in no time."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def edit_budgets(
    clients: tuple[aioredis.Redis, aioredis.Redis], clock: Clock
) -> tuple[EditBudgets, EditBudgets]:
    one, two = clients
    return EditBudgets(one, prefix="test:", clock=clock), EditBudgets(
        two, prefix="test:", clock=clock
    )


SLACK_DEFAULT = EditBudget("slack:chat.update:T1", 50, 60.0)  # Tier 3: 50 a minute


async def test_streaming_edits_leave_a_fifth_of_the_budget_to_first_texts_and_final_edits(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    one, two = edit_budgets(clients, clock)
    streaming = [await (one, two)[i % 2].take(SLACK_DEFAULT, f"r{i}") for i in range(45)]
    assert [g.wait == 0 for g in streaming] == [True] * 40 + [False] * 5
    assert all(0 < g.wait <= 60 for g in streaming[40:])
    finals = [await one.take(SLACK_DEFAULT, f"r{i}", priority=True) for i in range(12)]
    assert [g.wait == 0 for g in finals] == [True] * 10 + [False] * 2  # 50 in all
    clock.now += 60.001  # the window has moved on
    assert (await two.take(SLACK_DEFAULT, "r0")).wait == 0
    assert (await one.take(EditBudget("slack:chat.update:T2", 50, 60.0), "r0")).wait == 0


async def test_the_refusal_says_when_the_budget_has_room_again(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    budgets, _ = edit_budgets(clients, clock)
    budget = EditBudget("discord:edits:C1", 5, 5.0)  # four for streaming
    for _ in range(4):
        assert (await budgets.take(budget, "r1")).wait == 0
        clock.now += 1.0
    refused = await budgets.take(budget, "r1")
    assert refused.wait == pytest.approx(1.0)  # the first edit leaves the window in 1 s
    clock.now += refused.wait
    assert (await budgets.take(budget, "r1")).wait == 0


async def test_a_reply_streams_at_the_cadence_while_most_of_the_budget_is_unused(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    budgets, _ = edit_budgets(clients, clock)
    first = await budgets.take(SLACK_DEFAULT, "alone")
    assert first.wait == 0 and first.interval == pytest.approx(60 / 40 * 1 / 40)
    for _ in range(18):
        await budgets.take(SLACK_DEFAULT, "alone")
    assert (await budgets.take(SLACK_DEFAULT, "alone")).interval == pytest.approx(60 / 40 / 2)


async def test_once_spent_the_budget_is_divided_among_the_replies_streaming_in_its_scope(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    one, two = edit_budgets(clients, clock)

    async def spend(budgets: EditBudgets) -> None:  # the streaming part, by one reply
        for _ in range(39):
            await budgets.take(SLACK_DEFAULT, "alone", priority=True)

    await spend(one)
    assert (await one.take(SLACK_DEFAULT, "alone")).interval == pytest.approx(60 / 40)
    for i in range(9):  # refused for now, but they count
        await (one, two)[i % 2].take(SLACK_DEFAULT, f"r{i}")
    assert (await two.take(SLACK_DEFAULT, "alone")).interval == pytest.approx(60 * 10 / 40)
    for i in range(9):
        await one.leave(SLACK_DEFAULT, f"r{i}")
    assert (await one.take(SLACK_DEFAULT, "alone")).interval == pytest.approx(60 / 40)
    # a reply that stops asking (a crashed replica) stops counting after a while by itself
    await one.take(SLACK_DEFAULT, "crashed")
    assert (await one.take(SLACK_DEFAULT, "alone")).interval == pytest.approx(60 * 2 / 40)
    clock.now += 3 * 60.0
    await spend(two)
    assert (await one.take(SLACK_DEFAULT, "alone")).interval == pytest.approx(60 / 40)


async def test_ten_replies_in_one_workspace_share_slacks_default_budget_fairly(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    """Ten replies on two replicas, starting a second apart, each editing as often as its
    grants allow (at most once a second) for three minutes of simulated time."""
    clock = Clock()
    replica = edit_budgets(clients, clock)
    start = clock.now
    next_at = {f"r{i}": start + i for i in range(10)}
    shown_at: dict[str, float] = {}
    grants: list[tuple[float, str]] = []
    while clock.now < start + 180:
        for n, (reply, due) in enumerate(sorted(next_at.items())):
            if clock.now < due:
                continue
            first = reply not in shown_at
            grant = await replica[n % 2].take(SLACK_DEFAULT, reply, priority=first)
            if grant.wait:
                next_at[reply] = clock.now + grant.wait
                continue
            grants.append((clock.now, reply))
            shown_at.setdefault(reply, clock.now)
            next_at[reply] = clock.now + max(1.0, grant.interval)
        clock.now += 0.25
    # every reply shows its first text as soon as it asks
    assert all(shown_at[f"r{i}"] == pytest.approx(start + i) for i in range(10))
    # never more than the budget in any minute
    times = [t for t, _ in grants]
    assert all(len([u for u in times[i:] if u - t < 60]) <= 50 for i, t in enumerate(times))
    # and each reply had a tenth of it, give or take an edit (after the first minute's ramp)
    later = [r for t, r in grants if t >= start + 60]
    counts = [later.count(f"r{i}") for i in range(10)]
    assert max(counts) - min(counts) <= 1, counts
    assert sum(counts) >= 0.9 * 40 * 2  # the streaming part is used, not left idle
