"""`parley run` as operators run it: real processes, real signals, one Redis, a fake Discord.

Each test starts the installed console script as child processes configured only through the
environment (as in production: no constructor arguments, no `.env`), points them at a fake
Discord and a fake Ollama served from the test's own event loop, and judges them by what
Discord received. Waits are on the fakes' recorded requests, with timeouts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot.markdown import CURSOR, PLACEHOLDER, STOPPED
from tests.fakes.discord import FakeDiscord
from tests.fakes.model_server import FakeModelServer, Script
from tests.support import mention, stop_buttons

PARLEY = Path(sys.executable).with_name("parley")  # the console script of this environment
# The code under test is this working tree's: put it first on the children's path, whatever
# copy (or stale editable finder) the environment has installed.
SOURCE = Path(__file__).resolve().parents[1]
START_WITHIN = 20.0  # seconds from spawn to a connected gateway (imports dominate)
GRACE = 2.0  # PARLEY_SHUTDOWN_GRACE in these tests
Json = dict[str, Any]

pytestmark = pytest.mark.skipif(not PARLEY.exists(), reason=f"no console script at {PARLEY}")


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


def environment(
    fake: FakeDiscord, models: FakeModelServer, redis_url: str, home: Path, **extra: str
) -> dict[str, str]:
    """Everything a replica is told, and nothing inherited (no PARLEY_* or OLLAMA_* leaks in)."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(SOURCE),
        "PARLEY_DISCORD_TOKEN": fake.token,
        "PARLEY_DISCORD_API_URL": fake.api_url,
        "PARLEY_DISCORD_GATEWAY_URL": fake.gateway_url,
        "PARLEY_REDIS_URL": redis_url,
        "PARLEY_BACKENDS": json.dumps([{"name": "local", "kind": "ollama", "url": models.url}]),
        "PARLEY_HTTP_HOST": "127.0.0.1",
        "PARLEY_HTTP_PORT": "0",
        "PARLEY_RATE_LIMIT": "1000/minute",
        "PARLEY_MAX_IN_FLIGHT": "100",
        "PARLEY_BACKEND_CONCURRENCY": "100",
        "PARLEY_EDIT_INTERVAL": "0.2",
        "PARLEY_SHUTDOWN_GRACE": str(GRACE),
        "PARLEY_DATA_DIR": str(home / "data"),
    }
    env.update(extra)
    return env


@dataclass
class Replica:
    """One `parley run` process; its output goes to a file (a pipe nobody reads could fill)."""

    name: str
    process: asyncio.subprocess.Process
    log: Path

    async def terminate(self, within: float) -> tuple[int, float]:
        """SIGTERM; wait for the exit. Returns (exit status, seconds it took)."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            pytest.fail(f"{self.name} still running {within:.0f}s after SIGTERM\n{self.tail()}")
        return code, loop.time() - sent

    def tail(self, chars: int = 6000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name}'s log (end) ---\n{text[-chars:]}"


@asynccontextmanager
async def parley_run(home: Path, name: str, env: dict[str, str]) -> AsyncIterator[Replica]:
    """`parley run` in its own empty directory (so no `.env` is read); killed if still running
    at the end, and its log printed (pytest shows it when the test failed)."""
    workdir = home / name
    workdir.mkdir()
    log = workdir / "parley.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(PARLEY),
            "run",
            cwd=workdir,
            env={**env, "HOME": str(workdir)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    replica = Replica(name, process, log)
    try:
        yield replica
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        print(replica.tail())


async def connected(fake: FakeDiscord, *replicas: Replica) -> float:
    """Wait until every replica's gateway connection is ready; fail at once if one exits.
    Returns the seconds it took."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    ready = asyncio.ensure_future(
        fake.wait_for(lambda f: len(f.sessions) >= len(replicas), within=START_WITHIN)
    )
    exits = {asyncio.ensure_future(r.process.wait()): r for r in replicas}
    try:
        done, _ = await asyncio.wait([ready, *exits], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in [ready, *exits]:
            task.cancel()
    for task, replica in exits.items():
        if task in done:
            pytest.fail(f"{replica.name} exited at start-up\n{replica.tail()}")
    ready.result()  # a timeout surfaces here
    return loop.time() - began


def people_and_places(fake: FakeDiscord, count: int) -> list[tuple[Json, str]]:
    """`count` members, each with a text channel of their own (before anyone connects, so the
    guild arrives with them)."""
    return [(fake.add_user(f"user{i}"), fake.add_channel(f"room-{i}")) for i in range(count)]


def last_edit(fake: FakeDiscord, message: Json) -> Json:
    [*_, edit] = fake.calls("PATCH", f"/channels/{message['channel_id']}/messages/{message['id']}")
    body: Json = edit.json
    return body


async def all_of(
    fake: FakeDiscord,
    asked: list[Json],
    check: Callable[[FakeDiscord, Json], object],
    within: float,
) -> None:
    await fake.wait_for(lambda f: all(check(f, a) for a in asked), within=within)


# --- shutdown -------------------------------------------------------------------------------


async def test_sigterm_with_20_replies_streaming_finalises_every_one_and_exits_0(
    tmp_path: Path, redis_url: str, fake: FakeDiscord, model_server: FakeModelServer
) -> None:
    pairs = people_and_places(fake, 20)
    words = ["word "] * 300  # 6 s of answer: still streaming when the grace period ends
    model_server.default = Script(tokens=words, delay=0.02)
    whole = "".join(words).strip()
    env = environment(fake, model_server, redis_url, tmp_path)

    async with parley_run(tmp_path, "replica", env) as replica:
        print(f"connected after {await connected(fake, replica):.2f}s")
        asked = [
            await fake.say(user, f"{mention(fake)} tell me a long story", channel_id=channel)
            for user, channel in pairs
        ]
        await all_of(fake, asked, lambda f, a: f.reply_posts(a["id"]), within=10)
        code, took = await replica.terminate(within=GRACE + 5)
        print(f"exited {code} {took:.2f}s after SIGTERM")

    assert code == 0
    assert took <= GRACE + 5
    for question in asked:
        [reply] = fake.replies_to(question["id"])
        content = reply["content"]
        assert content != PLACEHOLDER and not content.endswith(CURSOR), content
        assert content.endswith(STOPPED) or content == whole, content
        assert stop_buttons(reply) == []  # the Stop button is gone: its final edit was made
        assert stop_buttons(last_edit(fake, reply)) == []
    assert model_server.completed + model_server.disconnects == 20
    assert len(model_server.chat_requests) == 20


# --- replicas -------------------------------------------------------------------------------


async def test_two_replicas_on_one_redis_answer_each_twice_delivered_event_once(
    tmp_path: Path, redis_url: str, fake: FakeDiscord, model_server: FakeModelServer
) -> None:
    pairs = people_and_places(fake, 10)
    model_server.default = Script(delay=0.01)  # echoes: "You said: <question>"
    env = environment(fake, model_server, redis_url, tmp_path)

    async with AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(parley_run(tmp_path, n, env)) for n in "ab"]
        await connected(fake, *replicas)
        asked = [
            await fake.say(user, f"{mention(fake)} question {i}", channel_id=channel)
            for i, (user, channel) in enumerate(pairs)
        ]
        answer = {a["id"]: f"You said: question {i}" for i, a in enumerate(asked)}
        await all_of(
            fake,
            asked,
            lambda f, a: any(m["content"] == answer[a["id"]] for m in f.replies_to(a["id"])),
            within=15,
        )
        # once both have exited, every request either would make has been made
        stopped = await asyncio.gather(*(r.terminate(within=GRACE + 5) for r in replicas))

    assert [code for code, _ in stopped] == [0, 0]
    for question in asked:
        assert len(fake.deliveries("MESSAGE_CREATE", question["id"])) == 2  # both got it
        assert len(fake.reply_posts(question["id"])) == 1  # one answered it
        [reply] = fake.replies_to(question["id"])
        assert reply["content"] == answer[question["id"]]
        assert stop_buttons(reply) == []
    assert len(model_server.chat_requests) == 10
