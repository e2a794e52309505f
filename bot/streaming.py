"""The renderer: a placeholder at once, coalesced edits, clean splits, and always a final state.

Reading the backend never waits for the platform: `feed()` only appends to a buffer; one writer
task per reply sends the newest text, at most one call in flight, no sooner than the reply's
cadence after the previous one (later when the platform says so). The renderer hands the sink
typed frames (phase and Markdown), and takes every edit from the message's shared edit budget
first (`bot/ratelimit.py` `EditBudgets`): "our budget says wait" only delays the next streaming
edit, while a platform's 429 (PlatformRateLimited) holds every call until its retry-after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from bot.backends.base import Chunk, Content, Done, Thinking
from bot.markdown import (
    CURSOR,
    EMPTY_ANSWER,
    STOPPED,
    THINKING_SHOWN_AFTER,
    split_first,
    thinking_for,
)
from bot.ratelimit import EditBudgets
from bot.state import REDIS_DOWN
from bot.turn import EditBudget, Frame, MessageRef, Phase, PlatformRateLimited, ReplySink

log = logging.getLogger(__name__)

WAITING_REPEAT = 8.0  # Discord's typing indicator lasts 10 s
THINKING_TICK = 10.0  # seconds between two showings of how long the model has been thinking
FINAL_RETRY_BUDGET = 300.0  # give up retrying the last edit after this many seconds of 429s


class Status(StrEnum):
    COMPLETE = "complete"
    ERROR = "error"
    STOPPED = "stopped"


@dataclass
class RenderResult:
    status: Status
    text: str  # the model's whole answer (content only), as it goes into history
    messages: int = 0
    edits: int = 0
    first_visible_at: float | None = None  # clock time the first answer text went out
    done: Done | None = None
    rate_limited: int = 0  # platform 429s met on the way


@dataclass
class _Page:
    ref: MessageRef | None = None
    shown: Frame | None = None  # what the platform shows now


@dataclass
class Renderer:
    sink: ReplySink
    budgets: EditBudgets | None = None  # None: no shared edit budget (only the cadence)
    clock: Callable[[], float] = time.monotonic
    on_post: Callable[[MessageRef], Awaitable[None]] | None = None  # after each message posted
    reply_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # in the budgets' count
    notes: list[str] = field(default_factory=list)  # lines the reply ends with, whatever its end
    controls: bool = False  # the reply's final message carries Regenerate, 👍 and 👎
    before_final: Callable[[], Awaitable[None]] | None = None  # before the final frame shows
    text: str = ""  # all content so far
    thinking: str = ""
    done: Done | None = None
    edits: int = 0
    posts: int = 0
    rate_limited: int = 0
    first_visible_at: float | None = None
    _thinking_since: float | None = None  # clock time of the first thinking chunk
    _thinking_shown: str = ""  # the thinking placeholder's text ("": the plain one)
    _activity: str = ""  # what the reply is doing meanwhile (a tool running), shown under it
    _body: str = ""  # the current page's text (may start with a reopened fence)
    _pages: list[_Page] = field(default_factory=list)
    _next_at: float = 0.0  # no streaming edit before this (cadence, our budget)
    _hard_until: float = 0.0  # no call at all before this (the platform said so)
    _share: float = 0.0  # this reply's fair spacing of streaming edits in its shared budget
    _budgets_used: set[EditBudget] = field(default_factory=set)
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _finishing: asyncio.Event = field(default_factory=asyncio.Event)
    _writer: asyncio.Task[None] | None = None
    _waiting: asyncio.Task[None] | None = None
    _final: asyncio.Future[RenderResult] | None = None

    @property
    def limit(self) -> int:
        return self.sink.max_chars - len(CURSOR) - 8  # room for the cursor and a fence closer

    @property
    def cadence(self) -> float:
        """Seconds between two streaming edits of this reply's message."""
        return max(self.sink.min_edit_interval, self._share)

    async def begin(self) -> None:
        """Post the placeholder and start the writer."""
        placeholder = Frame(Phase.PLACEHOLDER)
        ref = await self._call_post(placeholder)
        self._pages.append(_Page(ref, placeholder))
        self._writer = asyncio.create_task(self._write_loop())
        self._waiting = asyncio.create_task(self._waiting_loop())

    def feed(self, chunk: Chunk) -> None:
        """Take a chunk; never waits."""
        if isinstance(chunk, Content):
            self.text += chunk.text
            self._body += chunk.text
        elif isinstance(chunk, Thinking):
            was_thinking = bool(self.thinking)
            self.thinking += chunk.text
            if was_thinking:
                return  # the thinking placeholder is already showing (the waiting loop counts)
            self._thinking_since = self.clock()
            if self._waiting is not None and not self._waiting.done():
                self._waiting.cancel()  # again at once, as thinking, counting from now
                self._waiting = asyncio.create_task(self._waiting_loop())
        elif isinstance(chunk, Done):
            self.done = chunk
            return
        self._dirty.set()

    def working(self, activity: str) -> None:
        """Show what the reply is doing while no text comes (a tool running; "" when it is
        done): under the text so far, or in place of the placeholder. Never waits."""
        self._activity = activity
        self._dirty.set()

    async def finish(
        self, status: Status, notice: str | None = None, footer: str | None = None
    ) -> RenderResult:
        """Bring the reply to its final state: the full text, plus a notice or footer.

        The first call decides; it runs to the end even if its caller is cancelled meanwhile
        (a later call, e.g. "stopped" on shutdown, gets the same result instead of a second one).
        """
        if self._final is None:
            self._final = asyncio.ensure_future(self._finish(status, notice, footer))
        return await asyncio.shield(self._final)

    async def _finish(self, status: Status, notice: str | None, footer: str | None) -> RenderResult:
        self._finishing.set()
        for task in (self._waiting, self._writer):
            if task is not None:
                if task is self._waiting:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if status is Status.STOPPED:
            last = notice if notice else STOPPED
        elif notice:
            last = f"⚠️ {notice}"
        else:
            last = footer or ""
        closing = "\n".join(part for part in ("\n".join(self.notes), last) if part)
        body = self._body.rstrip()
        if not self.text.strip() and status is Status.COMPLETE:
            body = EMPTY_ANSWER
        ending = Frame(Phase(status.value), notice=closing, controls=self.controls)
        if self.controls and self.before_final is not None:
            await self.before_final()
        await self._flush(body, ending=ending)
        await self._leave_budgets()
        return RenderResult(
            status=status,
            text=self.text,
            messages=self.posts,
            edits=self.edits,
            first_visible_at=self.first_visible_at,
            done=self.done,
            rate_limited=self.rate_limited,
        )

    # --- writer ---

    async def _write_loop(self) -> None:
        while not self._finishing.is_set():
            await wait_first(self._dirty.wait(), self._finishing.wait())
            if self._finishing.is_set():
                return
            delay = max(self._next_at, self._hard_until) - self.clock()
            if delay > 0:
                await wait_first(asyncio.sleep(delay), self._finishing.wait())
                if self._finishing.is_set():
                    return
            self._dirty.clear()
            if self.text:
                await self._flush(self._body)
            elif self.thinking or self._activity:
                shown = self._activity or self._thinking_shown
                await self._show(self._pages[-1], Frame(Phase.THINKING, shown))

    async def _waiting_loop(self) -> None:
        """Until the answer's text comes: the platform's waiting indicator, repeated; and once
        the model has thought a few seconds, how long, every THINKING_TICK seconds."""
        indicate_at = self.clock()
        while not self.text:
            now = self.clock()
            if now >= indicate_at:
                try:
                    await self.sink.show_waiting("thinking" if self.thinking else "loading")
                except Exception as e:  # an indicator is a nicety, never a reason to fail
                    log.debug("show_waiting failed: %s", e)
                indicate_at = now + WAITING_REPEAT
            wake = indicate_at
            if self._thinking_since is not None:
                thought = now - self._thinking_since
                ticks = (thought - THINKING_SHOWN_AFTER) // THINKING_TICK  # -1: none yet
                if ticks >= 0:  # it counts in whole ticks: one edit each
                    shown = thinking_for(THINKING_SHOWN_AFTER + ticks * THINKING_TICK)
                    if shown != self._thinking_shown:
                        self._thinking_shown = shown
                        self._dirty.set()
                next_tick = THINKING_SHOWN_AFTER + (max(ticks, -1) + 1) * THINKING_TICK
                wake = min(wake, self._thinking_since + next_tick)
            await asyncio.sleep(max(0.05, wake - self.clock()))

    async def _flush(self, body: str, *, ending: Frame | None = None) -> None:
        """Show `body` on the current page, spilling finished pages into new messages;
        `ending`: the reply's final frame (phase and notice), else it is still streaming."""
        closing = len(ending.notice) + 2 if ending is not None and ending.notice else 0
        while True:
            if ending is None and len(body) <= self.limit:
                break
            if ending is not None and len(body) + closing <= self.sink.max_chars:
                break
            page, rest = split_first(body, self.limit)
            await self._show(self._pages[-1], Frame(Phase.COMPLETE, page))
            opening = Frame(Phase.STREAMING, rest[: self.limit])
            if ending is not None:
                opening = Frame(Phase.PLACEHOLDER)
            ref = await self._call_post(opening)
            self._pages.append(_Page(ref, opening))
            if ending is not None:
                body = rest
            else:  # chunks fed while this page was finished and the next posted follow rest
                self._body = body = rest + self._body[len(body) :]
        if ending is None:
            fits = len(body) + len(self._activity) + 2 <= self.limit
            frame = Frame(Phase.STREAMING, body, notice=self._activity if fits else "")
        else:
            frame = replace(ending, body=body)
        await self._show(self._pages[-1], frame)

    async def _show(self, page: _Page, frame: Frame) -> None:
        if page.shown == frame and not frame.final:
            return
        if page.ref is None:  # the placeholder never got posted: post instead
            page.ref = await self._call_post(frame)
            page.shown = frame
            return
        started = time.monotonic()
        while True:
            await self._respect_limits(frame.final)
            if not await self._take_budget(page.ref, frame):
                if not frame.final:
                    self._dirty.set()  # the writer comes back, with the newest text, later
                    return
                if time.monotonic() - started > FINAL_RETRY_BUDGET:
                    log.error("giving up the final edit: the edit budget stayed spent")
                    return
                continue
            self._next_at = self.clock() + self.cadence
            try:
                await self.sink.edit(page.ref, frame)
            except PlatformRateLimited as e:
                self.rate_limited += 1
                self._hard_until = self.clock() + e.retry_after
                if not frame.final or time.monotonic() - started > FINAL_RETRY_BUDGET:
                    if frame.final:
                        log.error("giving up the final edit after repeated rate limits")
                    self._dirty.set()
                    return
                continue
            except Exception:
                log.exception("editing the reply failed")
                if frame.final:
                    await self._post_fallback(page, frame)
                return
            self.edits += 1
            # the interval counts from when the platform answered: under load, a call that was
            # slow to leave must not land closer than the interval to the next one
            self._next_at = self.clock() + self.cadence
            page.shown = frame
            self._visible(frame)
            return

    async def _take_budget(self, ref: MessageRef, frame: Frame) -> bool:
        """Take this edit from the message's shared budget; False if it must wait.

        A final frame and the reply's first answer text go first (they may use the part of the
        budget streaming edits leave); a final frame waits here for its turn, anything else
        moves the next streaming edit back instead. Without Redis, edits go on at the cadence:
        the platform's own 429s still hold them back.
        """
        budget, budgets = ref.budget, self.budgets
        if budget is None or budgets is None:
            return True
        first_text = self.first_visible_at is None and frame.phase is Phase.STREAMING
        try:
            grant = await budgets.take(budget, self.reply_id, priority=frame.final or first_text)
        except REDIS_DOWN as e:
            log.warning("redis unavailable: edits go on without the shared budget: %s", e)
            self.budgets = None
            return True
        self._budgets_used.add(budget)
        self._share = grant.interval
        if not grant.wait:
            return True
        if frame.final:
            await asyncio.sleep(grant.wait)
        else:
            self._next_at = max(self._next_at, self.clock() + grant.wait)
        return False

    async def _leave_budgets(self) -> None:
        """This reply no longer counts in the division of its budgets."""
        if self.budgets is None:
            return
        for budget in self._budgets_used:
            try:
                await self.budgets.leave(budget, self.reply_id)
            except REDIS_DOWN as e:  # its entry lapses by itself
                log.warning("could not leave an edit budget: %s", e)

    async def _respect_limits(self, final: bool) -> None:
        """Wait for the platform's retry-after always; for the cadence only mid-stream."""
        until = self._hard_until if final else max(self._hard_until, self._next_at)
        delay = until - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _call_post(self, frame: Frame) -> MessageRef | None:
        started = time.monotonic()
        while True:
            await self._respect_limits(final=True)
            try:
                ref = await self.sink.post(frame)
            except PlatformRateLimited as e:
                self.rate_limited += 1
                self._hard_until = self.clock() + e.retry_after
                if time.monotonic() - started > FINAL_RETRY_BUDGET:
                    return None
                continue
            except Exception:
                log.exception("posting the reply failed")
                return None
            self.posts += 1
            if self.on_post is not None:
                await self.on_post(ref)
            if frame.phase not in (Phase.PLACEHOLDER, Phase.THINKING):
                self._next_at = self.clock() + self.cadence  # the first text may follow at once
            self._visible(frame)
            return ref

    async def _post_fallback(self, page: _Page, frame: Frame) -> None:
        """The final edit failed for good (message deleted?): post the final text anew."""
        ref = await self._call_post(frame)
        if ref is not None:
            page.ref, page.shown = ref, frame

    def _visible(self, frame: Frame) -> None:
        waiting = frame.phase in (Phase.PLACEHOLDER, Phase.THINKING)
        if self.first_visible_at is None and self.text and not waiting:
            self.first_visible_at = self.clock()


async def wait_first(*aws: object) -> None:
    """Wait until the first of several awaitables completes; cancel the others.

    Results and errors are left for whoever owns the awaitables (a shielded task keeps its own).
    """
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
