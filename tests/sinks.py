"""A recording ReplySink: a stand-in *platform* (not our code) that remembers every call."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from bot.turn import MessageRef, PlatformRateLimited


@dataclass
class Call:
    kind: str  # post | edit
    message: int
    text: str
    started: float
    ended: float = 0.0
    final: bool = False


@dataclass
class RecordingSink:
    max_chars: int = 2000
    min_edit_interval: float = 0.2
    latency: float = 0.0  # seconds each call takes, like a platform round trip
    rate_limit_edits: list[float] = field(default_factory=list)  # retry-afters to answer, in order
    calls: list[Call] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    refused: list[float] = field(default_factory=list)  # times a 429 was answered

    async def _call(self, kind: str, message: int, text: str, final: bool = False) -> None:
        if len(text) > self.max_chars:
            raise AssertionError(f"{kind} of {len(text)} chars exceeds {self.max_chars}")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        call = Call(kind, message, text, time.monotonic(), final=final)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        call.ended = time.monotonic()
        self.calls.append(call)

    async def post(self, text: str, *, final: bool = True) -> MessageRef:
        self.messages.append(text)
        await self._call("post", len(self.messages) - 1, text)
        return MessageRef(str(len(self.messages) - 1))

    async def edit(self, ref: MessageRef, text: str, *, final: bool = False) -> None:
        if self.rate_limit_edits:
            self.refused.append(time.monotonic())
            raise PlatformRateLimited(self.rate_limit_edits.pop(0))
        await self._call("edit", int(ref.id), text, final)
        self.messages[int(ref.id)] = text

    async def notify(self, text: str) -> None:
        self.notices.append(text)

    async def show_waiting(self, state: str) -> None:
        self.waiting.append(state)

    @property
    def edits(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "edit"]

    @property
    def text(self) -> str:
        return "\n".join(self.messages)
