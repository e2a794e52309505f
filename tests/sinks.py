"""A recording ReplySink: a stand-in *platform* (not our code) that remembers every call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bot.turn import EditBudget, Frame, MessageRef, PlatformRateLimited, WaitingState


@dataclass
class Call:
    kind: str  # post | edit
    message: int
    text: str
    started: float
    ended: float = 0.0
    final: bool = False
    frame: Frame | None = None


@dataclass
class RecordingSink:
    max_chars: int = 2000
    min_edit_interval: float = 0.2
    latency: float = 0.0  # seconds each call takes, like a platform round trip
    rate_limit_edits: list[float] = field(default_factory=list)  # retry-afters to answer, in order
    budget: EditBudget | None = None  # the shared edit budget its messages declare
    clock: Callable[[], float] = time.monotonic  # what the call times are read from
    calls: list[Call] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    refused: list[float] = field(default_factory=list)  # times a 429 was answered

    async def _call(self, kind: str, message: int, frame: Frame) -> None:
        text = frame.text
        if len(text) > self.max_chars:
            raise AssertionError(f"{kind} of {len(text)} chars exceeds {self.max_chars}")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        call = Call(kind, message, text, self.clock(), final=frame.final, frame=frame)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        call.ended = self.clock()
        self.calls.append(call)

    async def post(self, frame: Frame) -> MessageRef:
        self.messages.append(frame.text)
        await self._call("post", len(self.messages) - 1, frame)
        return MessageRef(str(len(self.messages) - 1), budget=self.budget)

    async def edit(self, ref: MessageRef, frame: Frame) -> None:
        if self.rate_limit_edits:
            self.refused.append(self.clock())
            raise PlatformRateLimited(self.rate_limit_edits.pop(0))
        await self._call("edit", int(ref.id), frame)
        self.messages[int(ref.id)] = frame.text

    async def notify(self, text: str) -> None:
        self.notices.append(text)

    async def show_waiting(self, state: WaitingState) -> None:
        self.waiting.append(state)

    @property
    def edits(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "edit"]

    @property
    def text(self) -> str:
        return "\n".join(self.messages)
