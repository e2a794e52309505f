"""Parley on a real three-node Redis Cluster (`redis+cluster://` URLs), end to end.

The cluster is three real redis-server processes with `cluster-enabled yes`, their 16,384 slots
split in three and joined with CLUSTER MEET — so every key of a turn lands on the node its hash
slot says, and a script touching keys of two slots would fail here with CROSSSLOT.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from bot.app import Parley
from bot.conversation import Outcome, stop_token
from bot.embedded_redis import EmbeddedRedis, free_port
from bot.turn import ConversationKey, EditBudget
from tests.fakes.model_server import FakeModelServer, Script
from tests.sinks import RecordingSink
from tests.support import make_settings, turn, until

SLOTS = 16384


@pytest.fixture(scope="module")
def cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EmbeddedRedis]]:
    root = tmp_path_factory.mktemp("cluster")
    nodes = [
        EmbeddedRedis(
            None,
            persist=False,
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(root / f"nodes-{i}.conf"),
                "--cluster-node-timeout",
                "2000",
            ],
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.port = cluster_port()
            node.start_sync()
        _form_cluster(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop_sync()


def cluster_port() -> int:
    """A free port whose cluster-bus port (+10,000) is free too."""
    while True:
        port = free_port()
        if port < 55000:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _form_cluster(nodes: list[EmbeddedRedis]) -> None:
    clients = [redis.Redis(port=node.port, decode_responses=True) for node in nodes]
    share = SLOTS // len(nodes)
    for i, client in enumerate(clients):
        last = SLOTS if i == len(nodes) - 1 else (i + 1) * share
        client.execute_command("CLUSTER ADDSLOTS", *range(i * share, last))
    for node in nodes[1:]:
        clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
    deadline = time.monotonic() + 20
    while True:
        infos = [client.execute_command("CLUSTER INFO") for client in clients]
        if all(i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == 3 for i in infos):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test cluster did not form: {infos}")
        time.sleep(0.05)
    for client in clients:
        client.close()


@pytest.fixture
def cluster_url(cluster_nodes: list[EmbeddedRedis]) -> str:
    for node in cluster_nodes:
        with redis.Redis(port=node.port) as client:
            client.flushall()
    # one node is enough: the client learns the others from it
    return f"redis+cluster://127.0.0.1:{cluster_nodes[0].port}"


@pytest.fixture
async def open_parley(
    cluster_url: str, model_server: FakeModelServer
) -> AsyncIterator[Callable[..., Awaitable[Parley]]]:
    opened: list[Parley] = []

    async def factory(**extra: object) -> Parley:
        app = await Parley.open(make_settings(cluster_url, model_server, **extra))
        opened.append(app)
        return app

    yield factory
    for app in opened:
        await app.aclose()


def keys_per_node(nodes: list[EmbeddedRedis]) -> list[list[str]]:
    out = []
    for node in nodes:
        with redis.Redis(port=node.port, decode_responses=True) as client:
            out.append(sorted(str(k) for k in client.keys("parley:*")))
    return out


async def test_threads_are_answered_and_remembered_across_the_cluster(
    open_parley: Callable[..., Awaitable[Parley]], cluster_nodes: list[EmbeddedRedis]
) -> None:
    parley = await open_parley(rate_limit="100/minute")
    assert isinstance(parley.redis, RedisCluster)
    threads = [f"t{i}" for i in range(12)]
    for thread in threads:
        for text in ("hello", "and again"):
            sink = RecordingSink(min_edit_interval=0.05)
            done = await parley.conversation.handle(turn(text, thread=thread), sink)
            assert done is Outcome.COMPLETE, sink.messages
            assert sink.messages == [f"You said: {text}"]
    for thread in threads:
        history = await parley.state.history(turn("", thread=thread).key)
        assert [e.content for e in history] == [
            "hello",
            "You said: hello",
            "and again",
            "You said: and again",
        ]
    # the threads' histories really are spread over the three nodes
    placed = keys_per_node(cluster_nodes)
    assert all(any(k.startswith("parley:hist:") for k in keys) for keys in placed), placed
    # nothing of a finished turn is left behind but its history, its de-dup mark and the
    # record its buttons (Regenerate, feedback) read
    leftovers = [
        k for keys in placed for k in keys if k.split(":")[1] not in ("hist", "seen", "rl", "reply")
    ]
    assert leftovers == []


async def test_a_duplicate_delivery_is_answered_once_on_two_replicas(
    open_parley: Callable[..., Awaitable[Parley]],
) -> None:
    replica_a, replica_b = await open_parley(), await open_parley()
    event = uuid.uuid4().hex
    sinks = [RecordingSink(min_edit_interval=0.05) for _ in range(2)]
    outcomes = await asyncio.gather(
        replica_a.conversation.handle(turn("hi", event=event), sinks[0]),
        replica_b.conversation.handle(turn("hi", event=event), sinks[1]),
    )
    assert sorted(outcomes) == sorted([Outcome.COMPLETE, Outcome.DUPLICATE])
    assert sum(len(s.messages) for s in sinks) == 1


async def test_the_rate_and_in_flight_limits_hold_on_a_cluster(
    open_parley: Callable[..., Awaitable[Parley]], model_server: FakeModelServer
) -> None:
    parley = await open_parley(rate_limit="2/minute", max_in_flight=1)
    model_server.default = Script(tokens=["word "] * 100, delay=0.01)
    first_sink = RecordingSink(min_edit_interval=0.05)
    first = asyncio.create_task(parley.conversation.handle(turn("one"), first_sink))
    await until(lambda: len(first_sink.edits) >= 1)
    busy = RecordingSink(min_edit_interval=0.05)
    assert await parley.conversation.handle(turn("two", thread="t2"), busy) is Outcome.REFUSED
    assert busy.notices[-1].startswith("You already have replies being written.")
    assert await first is Outcome.COMPLETE
    limited = RecordingSink(min_edit_interval=0.05)
    assert await parley.conversation.handle(turn("three", thread="t3"), limited) is Outcome.REFUSED
    assert limited.notices[-1].startswith("You're sending requests too fast.")
    # the shared edit budgets run on the cluster too (their two keys share a hash slot)
    budget = EditBudget("slack:chat.update:T1", 1, 60)
    assert (await parley.conversation.budgets.take(budget, "r1")).wait == 0.0
    assert (await parley.conversation.budgets.take(budget, "r2")).wait > 0.0


async def test_a_stop_pressed_on_another_replica_reaches_the_reply_on_a_cluster(
    open_parley: Callable[..., Awaitable[Parley]], model_server: FakeModelServer
) -> None:
    model_server.default = Script(tokens=["word "] * 400, delay=0.01)
    replica_a, replica_b = await open_parley(), await open_parley()
    await asyncio.sleep(0.2)  # both stop listeners subscribed
    sink = RecordingSink(min_edit_interval=0.05)
    asked = turn("long please")
    task = asyncio.create_task(replica_a.conversation.handle(asked, sink))
    await until(lambda: len(sink.edits) >= 1)
    refused = await replica_b.conversation.stop(stop_token(asked), user_id="U2")
    assert refused == "Only the person who asked (or an admin) can stop this reply."
    assert await replica_b.conversation.stop(stop_token(asked), user_id="U1") is None
    assert await asyncio.wait_for(task, 5) is Outcome.STOPPED
    assert sink.messages[-1].endswith("_⏹ Stopped._")


async def test_model_preference_and_reset_work_on_a_cluster(
    open_parley: Callable[..., Awaitable[Parley]],
) -> None:
    parley = await open_parley()
    asked = turn("hello")
    await parley.conversation.handle(asked, RecordingSink(min_edit_interval=0.05))
    sink = RecordingSink(min_edit_interval=0.05)
    assert await parley.conversation.handle(turn("/reset"), sink) is Outcome.COMMAND
    assert await parley.state.history(asked.key) == []


@contextlib.contextmanager
def cluster_password(nodes: list[EmbeddedRedis], password: str) -> Iterator[None]:
    """Every node asks for `password` for the duration (this test's own)."""
    for node in nodes:
        with redis.Redis(port=node.port) as client:
            client.config_set("requirepass", password)
    try:
        yield
    finally:
        for node in nodes:
            with redis.Redis(port=node.port, password=password) as client:
                client.config_set("requirepass", "")


async def test_a_password_protected_cluster_answers_and_limits(
    cluster_url: str, cluster_nodes: list[EmbeddedRedis], model_server: FakeModelServer
) -> None:
    """`cluster_url`: the nodes flushed; the URL used here carries a password."""
    url = f"redis+cluster://:s%40cret@127.0.0.1:{cluster_nodes[0].port}"  # "s@cret", quoted
    with cluster_password(cluster_nodes, "s@cret"):
        parley = await Parley.open(make_settings(url, model_server, rate_limit="1/minute"))
        try:
            first = RecordingSink(min_edit_interval=0.05)
            assert await parley.conversation.handle(turn("hi"), first) is Outcome.COMPLETE
            second = RecordingSink(min_edit_interval=0.05)
            assert await parley.conversation.handle(turn("again"), second) is Outcome.REFUSED
            assert second.notices[-1].startswith("You're sending requests too fast.")
        finally:
            await parley.aclose()


async def test_parley_check_reports_a_cluster_without_its_password(
    cluster_nodes: list[EmbeddedRedis],
    model_server: FakeModelServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from adapters.cli import check

    nodes = ",".join(f"127.0.0.1:{node.port}" for node in cluster_nodes[:2])
    url = f"redis+cluster://:hunter2@{nodes}"
    with cluster_password(cluster_nodes, "hunter2"):
        assert await check(make_settings(url, model_server)) == 0
    out = capsys.readouterr().out
    assert f"ok    redis (redis+cluster://{nodes}, a cluster of 3 primaries)" in out
    assert "hunter2" not in out


async def test_a_cluster_node_restart_is_survived_without_restarting_parley(
    open_parley: Callable[..., Awaitable[Parley]], cluster_nodes: list[EmbeddedRedis]
) -> None:
    parley = await open_parley(rate_limit="100/minute")
    assert isinstance(parley.redis, RedisCluster)
    await parley.redis.initialize()  # the slot map
    # a thread whose keys live on the node that is about to go down
    down = cluster_nodes[1]
    thread = next(t for t in (f"t{i}" for i in range(100)) if _node_of(parley, t) == down.port)
    assert await parley.conversation.handle(turn("before", thread=thread), RecordingSink()) is (
        Outcome.COMPLETE
    )
    await down.stop()
    during = RecordingSink()
    assert await parley.conversation.handle(turn("during", thread=thread), during) is Outcome.ERROR
    assert "memory store (Redis) is unavailable" in during.messages[-1]
    await down.start()  # same port and node file: it takes its slots back
    await until(lambda: _cluster_ok(cluster_nodes), within=20)
    after = RecordingSink()
    assert await parley.conversation.handle(turn("after", thread=thread), after) is (
        Outcome.COMPLETE
    ), after.messages
    assert after.messages == ["You said: after"]


def _node_of(parley: Parley, thread: str) -> int:
    assert isinstance(parley.redis, RedisCluster)
    name = parley.state.history_key(turn("", thread=thread).key)
    node = parley.redis.get_node_from_key(name)
    assert node is not None
    return int(node.port)


def _cluster_ok(nodes: list[EmbeddedRedis]) -> bool:
    for node in nodes:
        try:
            with redis.Redis(port=node.port, decode_responses=True) as client:
                if client.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                    return False
        except redis.RedisError:
            return False
    return True


async def test_discord_reply_chains_span_slots_on_a_cluster(
    open_parley: Callable[..., Awaitable[Parley]],
) -> None:
    parley = await open_parley()
    key = ConversationKey("discord", "G1", "C1", "999")
    pages = [str(page) for page in range(1000, 1010)]  # ten keys: several slots, one pipeline
    await parley.state.remember_chain(key, pages)
    assert [await parley.state.chain_root(key, page) for page in pages] == ["999"] * len(pages)
