"""The renderer: a placeholder at once, coalesced edits, clean splits, and always a final state.

Reading the backend never waits for the platform: `feed()` only appends to a buffer; one writer
task per reply sends the newest text, at most one call in flight, no sooner than the sink's
interval after the previous one (later when the platform says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from bot.backends.base import Chunk, Content, Done, Thinking
from bot.turn import MessageRef, PlatformRateLimited, ReplySink

log = logging.getLogger(__name__)

PLACEHOLDER = "…"
THINKING = "💭 _Thinking…_"
CURSOR = " ▍"
EMPTY_ANSWER = "_The model returned an empty answer._"
STOPPED = "_⏹ Stopped._"
WAITING_REPEAT = 8.0  # Discord's typing indicator lasts 10 s
FINAL_RETRY_BUDGET = 300.0  # give up retrying the last edit after this many seconds of 429s

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_CUTS: tuple[tuple[str, float], ...] = (
    ("\n\n", 0.5),  # paragraph
    ("\n", 0.5),  # line
    (". ", 0.3),  # sentence
    ("! ", 0.3),
    ("? ", 0.3),
    (" ", 0.3),  # word
)


# --- pure text functions ------------------------------------------------------------------


def open_fence(text: str) -> str | None:
    """The opening line of a code fence still open at the end of `text`, else None."""
    opener: tuple[str, str] | None = None
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if not match:
            continue
        run, info = match[1], match[2].strip()
        if opener is None:
            if run[0] != "`" or "`" not in info:  # a backtick fence's info has no backtick
                opener = (run, info)
        elif run[0] == opener[0][0] and len(run) >= len(opener[0]) and not info:
            opener = None
    if opener is None:
        return None
    language = opener[1].split()[0][:20] if opener[1].split() else ""
    return opener[0] + language


def fence_closer(opening: str) -> str:
    return re.match(r"`+|~+", opening)[0]  # type: ignore[index]


def _best_cut(window: str) -> int:
    for sep, min_fraction in _CUTS:
        pos = window.rfind(sep)
        if pos > 0 and pos >= len(window) * min_fraction:
            return pos + len(sep)
    return len(window)


def split_first(text: str, limit: int) -> tuple[str, str]:
    """Split `text` into a first message of at most `limit` chars and the rest.

    Cuts at a paragraph, line, sentence, then word boundary; a code fence open at the cut is
    closed at the end of the first part and reopened at the start of the rest.
    """
    if len(text) <= limit:
        return text, ""
    if limit < 40:
        raise ValueError("limit too small to split cleanly")
    room = limit - 8  # "\n" + a closing fence
    while True:
        head, tail = _cut(text, room)
        if len(head) <= limit:
            return head, tail
        room -= len(head) - limit  # an unusually long fence closer: cut earlier


def _cut(text: str, room: int) -> tuple[str, str]:
    cut = _best_cut(text[:room])
    # never cut through a fence line itself: move the cut to that line's start
    line_start = text.rfind("\n", 0, cut) + 1
    line_end = text.find("\n", cut)
    line = text[line_start : line_end if line_end != -1 else len(text)]
    if line_start > 0 and cut > line_start and _FENCE.match(line):
        cut = line_start
    before = text[:cut].strip()
    if not before or ("\n" not in before and _FENCE.match(before)):
        # nothing before the cut but whitespace or a fence's opening line: hard cut instead
        cut = room
        line_start = text.rfind("\n", 0, cut) + 1
    # a cut inside a line must not start the next message with something that reads as a fence
    while cut > line_start + 1 and text[cut] in "`~ ":
        cut -= 1
    head, tail = text[:cut].rstrip(), text[cut:].lstrip("\n")
    if (shown := open_fence(head)) is not None:
        head = head + "\n" + fence_closer(shown)
    # reopen only a fence the text really has open (judged on whole lines), and only when that
    # still makes progress (a pathological fence line longer than a message is left alone)
    line_end = text.find("\n", cut)
    line_end = len(text) if line_end == -1 else line_end
    inside_fence_line = cut > line_start and _FENCE.match(text[line_start:line_end]) is not None
    real = open_fence(text[: line_end if inside_fence_line else line_start])
    if real is not None and len(real) + 1 + len(tail) < len(text):
        tail = real + "\n" + tail
    return head, tail


def split_message(text: str, limit: int) -> list[str]:
    """All the messages `text` becomes at `limit` chars each (what streaming produces too)."""
    pages: list[str] = []
    rest = text
    while len(rest) > limit:
        page, rest = split_first(rest, limit)
        pages.append(page)
    pages.append(rest)
    return [p for p in pages if p.strip()] or [""]


def in_progress(text: str) -> str:
    """What a reply looks like while it streams: open fences closed, a cursor at the end."""
    fence = open_fence(text)
    shown = text + ("\n" + fence_closer(fence) if fence else "")
    return shown + CURSOR


# --- the renderer -------------------------------------------------------------------------


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
    shown: str = ""  # what the platform shows now


@dataclass
class Renderer:
    sink: ReplySink
    clock: Callable[[], float] = time.monotonic
    on_post: Callable[[MessageRef], Awaitable[None]] | None = None  # after each message posted
    text: str = ""  # all content so far
    thinking: str = ""
    done: Done | None = None
    edits: int = 0
    posts: int = 0
    rate_limited: int = 0
    first_visible_at: float | None = None
    _body: str = ""  # the current page's text (may start with a reopened fence)
    _pages: list[_Page] = field(default_factory=list)
    _next_at: float = 0.0  # no call before this (cadence)
    _hard_until: float = 0.0  # no call before this (the platform said so)
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _finishing: asyncio.Event = field(default_factory=asyncio.Event)
    _writer: asyncio.Task[None] | None = None
    _waiting: asyncio.Task[None] | None = None
    _final: asyncio.Future[RenderResult] | None = None

    @property
    def limit(self) -> int:
        return self.sink.max_chars - len(CURSOR) - 8  # room for the cursor and a fence closer

    async def begin(self) -> None:
        """Post the placeholder and start the writer."""
        ref = await self._call_post(PLACEHOLDER, final=False)
        self._pages.append(_Page(ref, PLACEHOLDER))
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
                return  # the thinking placeholder is already showing
        elif isinstance(chunk, Done):
            self.done = chunk
            return
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
        suffix = ""
        if status is Status.STOPPED:
            suffix = notice if notice else STOPPED
        elif notice:
            suffix = f"⚠️ {notice}"
        elif footer:
            suffix = footer
        body = self._body.rstrip()
        if not self.text.strip() and status is Status.COMPLETE:
            body = EMPTY_ANSWER
        final = f"{body}\n\n{suffix}" if body and suffix else (body or suffix or EMPTY_ANSWER)
        await self._flush(final, final=True)
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
                await self._flush(self._body, final=False)
            elif self.thinking:
                await self._show(self._pages[-1], THINKING, final=False)

    async def _waiting_loop(self) -> None:
        while not self.text:
            try:
                await self.sink.show_waiting("thinking" if self.thinking else "loading")
            except Exception as e:  # an indicator is a nicety, never a reason to fail
                log.debug("show_waiting failed: %s", e)
            await asyncio.sleep(WAITING_REPEAT)

    async def _flush(self, body: str, *, final: bool) -> None:
        """Show `body` on the current page, spilling finished pages into new messages."""
        while True:
            limit = self.limit if not final else self.sink.max_chars
            if len(body) <= limit:
                break
            page, rest = split_first(body, self.limit)
            await self._show(self._pages[-1], page, final=True)
            opening = PLACEHOLDER if final else in_progress(rest[: self.limit])
            ref = await self._call_post(opening, final=False)
            self._pages.append(_Page(ref, opening))
            if final:
                body = rest
            else:  # chunks fed while this page was finished and the next posted follow rest
                self._body = body = rest + self._body[len(body) :]
        shown = body if final else in_progress(body)
        await self._show(self._pages[-1], shown, final=final)

    async def _show(self, page: _Page, text: str, *, final: bool) -> None:
        if page.shown == text and not final:
            return
        if page.ref is None:  # the placeholder never got posted: post instead
            page.ref = await self._call_post(text, final=final)
            page.shown = text
            return
        started = time.monotonic()
        while True:
            await self._respect_limits(final)
            self._next_at = self.clock() + self.sink.min_edit_interval
            try:
                await self.sink.edit(page.ref, text, final=final)
            except PlatformRateLimited as e:
                self.rate_limited += 1
                self._hard_until = self.clock() + e.retry_after
                if not final or time.monotonic() - started > FINAL_RETRY_BUDGET:
                    if final:
                        log.error("giving up the final edit after repeated rate limits")
                    self._dirty.set()
                    return
                continue
            except Exception:
                log.exception("editing the reply failed")
                if final:
                    await self._post_fallback(page, text)
                return
            self.edits += 1
            # the interval counts from when the platform answered: under load, a call that was
            # slow to leave must not land closer than the interval to the next one
            self._next_at = self.clock() + self.sink.min_edit_interval
            page.shown = text
            self._visible(text)
            return

    async def _respect_limits(self, final: bool) -> None:
        """Wait for the platform's retry-after always; for the cadence only mid-stream."""
        until = self._hard_until if final else max(self._hard_until, self._next_at)
        delay = until - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _call_post(self, text: str, *, final: bool) -> MessageRef | None:
        started = time.monotonic()
        while True:
            await self._respect_limits(final=True)
            try:
                ref = await self.sink.post(text, final=final)
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
            if text not in (PLACEHOLDER, THINKING):  # the first answer text may follow at once
                self._next_at = self.clock() + self.sink.min_edit_interval
            self._visible(text)
            return ref

    async def _post_fallback(self, page: _Page, text: str) -> None:
        """The final edit failed for good (message deleted?): post the final text anew."""
        ref = await self._call_post(text, final=True)
        if ref is not None:
            page.ref, page.shown = ref, text

    def _visible(self, text: str) -> None:
        if self.first_visible_at is None and self.text and text not in (PLACEHOLDER, THINKING):
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
