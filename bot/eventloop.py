"""The event loop a Parley process runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv, in C) takes the place of asyncio's pure-Python loop: the selector, the socket
reads and the callbacks every streamed token wakes; 0.87x the CPU per token end to end
(docs/benchmarks.md §6). It is a dependency wherever it builds (not on Windows); without it, or
with `PARLEY_EVENT_LOOP=asyncio`, the same code runs on asyncio's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]


def loop_factory(choice: EventLoopChoice = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """How to make the loop: uvloop's for `auto` where it imports (and always for `uvloop`,
    which fails without it), asyncio's for `asyncio`."""
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice = "auto") -> T:
    """`asyncio.run(main)` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """`uvloop` or `asyncio`: which loop runs (the running one by default)."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
