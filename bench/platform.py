"""A fake platform for the benchmarks: ~50 ms per API call, Discord's and Slack's limits, 429s.

`FakePlatform` holds what the platform holds: one token bucket per rate-limit scope and the
counters. `BenchSink` is the ReplySink one reply gets (as an adapter would hand the core): every
call waits half the latency (the request travelling), is checked against the buckets, waits the
other half, then either applies or answers `PlatformRateLimited(retry_after)` — a 429, counted.

Limits (shared/PLATFORMS.md):
  discord  message edits ≈ 1/s per channel with a small burst (2); posts 5 per 5 s per channel;
           max 2,000 chars.
  slack    chat.update Tier 3: 50 per minute per workspace, shared by every stream in it;
           chat.postMessage ≈ 1/s per channel (burst 3); max 3,900 chars (as Parley keeps it).

Each reply records when its first answer text became visible, when its last call completed,
its edits, posts and 429s, and the fake backend's stamps it finds in the text (see
bench/fake_backend.py): r = request received, s = first token sent, e = last token sent.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

from bot.turn import EditBudget, Frame, MessageRef, Phase, PlatformRateLimited, WaitingState

STAMP = re.compile(r"\[\[r=([\d.]+),s=([\d.]+)\]\]|\[\[e=([\d.]+)\]\]")


@dataclass(frozen=True)
class PlatformSpec:
    name: str
    max_chars: int
    edit_per_second: float
    edit_burst: float
    edit_scope: str  # "channel" | "space": who shares one edit budget
    post_per_second: float
    post_burst: float
    budget: tuple[int, float] | None  # the edit budget the adapter's messages declare

    def edit_budget(self, space: str, channel: str) -> EditBudget | None:
        if self.budget is None:
            return None
        scope = space if self.edit_scope == "space" else channel
        return EditBudget(f"{self.name}:edits:{scope}", *self.budget)


# the budgets are the adapters' own: adapters/discord.py EDIT_BUDGET, Slack's chat.update 50/min
DISCORD = PlatformSpec("discord", 2000, 1.0, 2.0, "channel", 1.0, 5.0, (5, 5.0))
SLACK = PlatformSpec("slack", 3900, 50 / 60, 50.0, "space", 1.0, 3.0, (50, 60.0))
NO_LIMITS = PlatformSpec("discord", 2000, 0.0, 0.0, "channel", 0.0, 0.0, None)  # rate 0: unlimited
PLATFORMS = {"discord": DISCORD, "slack": SLACK}


@dataclass
class Bucket:
    """A token bucket: `rate` per second, at most `burst` saved up."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, at: float) -> float:
        """0 if a call may go now (and take it), else the seconds until one may."""
        if self.rate <= 0:
            return 0.0
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, at
        self.tokens = min(self.burst, self.tokens + (at - self.stamp) * self.rate)
        self.stamp = at
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class ReplyRecord:
    """What the platform saw of one reply (times are time.time(), comparable across processes)."""

    event_at: float
    outcome: str = ""
    first_visible_at: float | None = None
    last_call_at: float = 0.0
    edits: int = 0
    posts: int = 0
    rate_limited: int = 0
    waiting_calls: int = 0
    requested_at: float | None = None  # stamp r: the backend had the whole request
    first_token_at: float | None = None  # stamp s: the backend sent the first token
    last_token_at: float | None = None  # stamp e: the backend sent the last token
    texts: dict[str, str] = field(default_factory=dict)  # message id → what it shows

    def stamps(self, text: str) -> None:
        for match in STAMP.finditer(text):
            if match[1] is not None and self.requested_at is None:
                self.requested_at, self.first_token_at = float(match[1]), float(match[2])
            elif match[3] is not None:
                self.last_token_at = float(match[3])


class FakePlatform:
    def __init__(self, spec: PlatformSpec, latency: float = 0.05) -> None:
        self.spec = spec
        self.latency = latency
        self.edit_buckets: dict[str, Bucket] = {}
        self.post_buckets: dict[str, Bucket] = {}
        self.calls = 0
        self.refused = 0  # 429s answered
        self.ids = 0

    def sink(self, space: str, channel: str, record: ReplyRecord) -> BenchSink:
        return BenchSink(self, space, channel, record)

    def admit(self, kind: str, space: str, channel: str) -> float:
        spec = self.spec
        if kind == "edit":
            scope = space if spec.edit_scope == "space" else channel
            bucket = self.edit_buckets.get(scope)
            if bucket is None:
                bucket = self.edit_buckets[scope] = Bucket(spec.edit_per_second, spec.edit_burst)
        else:
            bucket = self.post_buckets.get(channel)
            if bucket is None:
                bucket = self.post_buckets[channel] = Bucket(spec.post_per_second, spec.post_burst)
        return bucket.take(time.monotonic())


class BenchSink:
    """The ReplySink of one reply on the fake platform."""

    def __init__(self, platform: FakePlatform, space: str, channel: str, record: ReplyRecord):
        self.platform = platform
        self.space = space
        self.channel = channel
        self.record = record
        self.max_chars = platform.spec.max_chars
        self.min_edit_interval = 1.0

    async def _call(self, kind: str, text: str) -> None:
        platform = self.platform
        if len(text) > self.max_chars:
            raise ValueError(f"{kind} of {len(text)} chars exceeds {self.max_chars}")
        platform.calls += 1
        half = platform.latency / 2
        await asyncio.sleep(half)
        wait = platform.admit(kind, self.space, self.channel)
        await asyncio.sleep(half)
        if wait > 0:
            platform.refused += 1
            self.record.rate_limited += 1
            raise PlatformRateLimited(wait)

    def _shown(self, frame: Frame) -> None:
        record = self.record
        record.last_call_at = time.time()
        waiting = frame.phase in (Phase.PLACEHOLDER, Phase.THINKING)
        if record.first_visible_at is None and not waiting and frame.text.strip():
            record.first_visible_at = record.last_call_at
        record.stamps(frame.text)

    async def post(self, frame: Frame) -> MessageRef:
        await self._call("post", frame.text)
        self.platform.ids += 1
        budget = self.platform.spec.edit_budget(self.space, self.channel)
        ref = MessageRef(str(self.platform.ids), self.channel, budget)
        self.record.posts += 1
        self.record.texts[ref.id] = frame.text
        self._shown(frame)
        return ref

    async def edit(self, ref: MessageRef, frame: Frame) -> None:
        await self._call("edit", frame.text)
        self.record.edits += 1
        self.record.texts[ref.id] = frame.text
        self._shown(frame)

    async def notify(self, text: str) -> None:
        await asyncio.sleep(self.platform.latency)

    async def show_waiting(self, state: WaitingState) -> None:
        self.record.waiting_calls += 1  # a typing indicator / status: its own call, own route
        await asyncio.sleep(self.platform.latency)
