"""The process's event loop (bot/eventloop.py): uvloop where installed, asyncio's on request."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from bot import eventloop
from bot.settings import Settings

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


async def which() -> str:
    await asyncio.sleep(0)
    return eventloop.loop_name()


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed")
def test_auto_runs_on_uvloop_where_it_is_installed() -> None:
    assert eventloop.run(which()) == "uvloop"
    assert eventloop.run(which(), "uvloop") == "uvloop"


def test_asyncio_runs_on_asyncios_own_loop() -> None:
    assert eventloop.loop_factory("asyncio") is asyncio.new_event_loop
    assert eventloop.run(which(), "asyncio") == "asyncio"


def test_the_setting_takes_only_the_known_loops() -> None:
    assert Settings(_env_file=None).event_loop == "auto"  # type: ignore[call-arg]
    assert Settings(_env_file=None, event_loop="asyncio").event_loop == "asyncio"  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        Settings(_env_file=None, event_loop="trio")  # type: ignore[call-arg]
