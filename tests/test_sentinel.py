"""A Redis Sentinel URL works end to end against a real master and a real sentinel."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.app import Parley
from bot.conversation import Outcome
from bot.embedded_redis import EmbeddedRedis, find_redis_server, free_port
from bot.turn import ConversationKey, Turn
from tests.fakes.model_server import FakeModelServer
from tests.sinks import RecordingSink
from tests.support import make_settings


@pytest.fixture
async def sentinel_url(tmp_path: Path) -> AsyncIterator[str]:
    master = EmbeddedRedis(None, persist=False)
    await master.start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor parley 127.0.0.1 {master.port} 1\n"
    )
    process = await asyncio.create_subprocess_exec(
        find_redis_server(),
        str(conf),
        "--sentinel",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                await asyncio.sleep(0.02)
        yield f"redis+sentinel://127.0.0.1:{port}/parley"
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)
        await master.stop()


async def test_parley_finds_the_master_through_sentinel(
    sentinel_url: str, model_server: FakeModelServer
) -> None:
    parley = await Parley.open(make_settings(sentinel_url, model_server))
    try:
        key = ConversationKey("slack", "T1", "C1", "t")
        sink = RecordingSink()
        done = await parley.conversation.handle(
            Turn(key, "U1", "ada", "hello", uuid.uuid4().hex), sink
        )
        assert done is Outcome.COMPLETE
        assert [e.content for e in await parley.state.history(key)] == [
            "hello",
            "You said: hello",
        ]
    finally:
        await parley.aclose()
