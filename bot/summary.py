"""Summaries of long threads: the turns that no longer fit a model's window are folded into a
summary, which is sent ahead of the turns that remain.

A fold runs after a reply is finished (never delaying it), on the replica that answered, while
no other replica folds the same thread (a `folding` claim in Redis). It reads the whole stored
history, keeps the newest turns that fill at most KEEP_SHARE of the prompt budget, and asks a
model (PARLEY_SUMMARY_MODEL, else the thread's own) to fold the older ones into the summary so
far. The result replaces exactly those entries, in one script that first checks they are still
the thread's oldest; if anything fails, the history stays as it was and the next turn tries again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bot.backends.base import Content, Done, Message, Options
from bot.errors import BackendError, ParleyError
from bot.markdown import clean_text
from bot.options import Plan, plan
from bot.prompt import (
    CHARS_PER_TOKEN,
    Prompt,
    entry_tokens,
    estimate_tokens,
)
from bot.router import Router
from bot.settings import Settings
from bot.state import REDIS_DOWN, HistoryEntry, State, Summary
from bot.turn import ConversationKey

log = logging.getLogger(__name__)

KEEP_SHARE = 0.5  # after a fold, the remaining turns fill at most this share of the budget
KEEP_ENTRIES = 2  # the newest exchange is never folded (a follow-up refers to it; Regenerate)
SUMMARY_TOKENS = 400  # the summary's cap: what it may cost every later prompt
SUMMARY_WORDS = 200
MIN_ROOM = 64  # tokens of conversation a summary request must have room for
RETRY_AFTER = 60.0  # seconds a thread's folds rest after one failed


class Unfolded(Exception):
    """A fold that could not be done (the history stays whole)."""


INSTRUCTIONS = (
    "You maintain the running summary of a team chat between people and an AI assistant, for "
    "the assistant to continue the conversation from. Write in the conversation's language."
)


def summary_cap(window: int) -> int:
    """A summary's cap in tokens: SUMMARY_TOKENS, less in a small window."""
    return min(SUMMARY_TOKENS, window // 4)


@dataclass(frozen=True)
class Fold:
    """One fold to do: the thread, the model whose window it is for, and that window's budget."""

    key: ConversationKey
    model: str
    budget_tokens: int  # what the history may use in the thread model's prompt
    chars_per_token: float = CHARS_PER_TOKEN

    @classmethod
    def wanted(
        cls,
        key: ConversationKey,
        model: str,
        asking: Plan,
        system: str,
        prompt: Prompt,
        stored: int,
        history_max: int,
        chars_per_token: float = CHARS_PER_TOKEN,
    ) -> Fold | None:
        """The fold a turn's prompt calls for, if its history did not fit (`prompt.left_out`)
        or the thread's `stored` entries will soon be trimmed at `history_max`: the history's
        budget is the prompt's less the system prompt and the summary to come."""
        if not prompt.left_out and stored + 2 <= history_max:
            return None
        room = asking.prompt_tokens - estimate_tokens(system, chars_per_token)
        return cls(key, model, room - summary_cap(asking.window), chars_per_token)


def span(entries: Sequence[HistoryEntry], fold: Fold) -> int:
    """How many of the oldest entries to fold: enough that the rest fill at most KEEP_SHARE of
    the budget, never the newest KEEP_ENTRIES, and ending before a person's turn (a question is
    not folded away from its answer)."""
    room = int(fold.budget_tokens * KEEP_SHARE)
    kept, used = 0, 0
    for entry in reversed(entries):
        cost = entry_tokens(entry, fold.chars_per_token)
        if kept >= KEEP_ENTRIES and used + cost > room:
            break
        kept, used = kept + 1, used + cost
    n = len(entries) - kept
    while 0 < n < len(entries) and entries[n].role != "user":
        n += 1  # the remaining turns start with a question
    return n if len(entries) - n >= KEEP_ENTRIES else 0


def transcript(entries: Sequence[HistoryEntry]) -> str:
    lines = []
    for e in entries:
        if e.role == "tool":
            lines.append(f"({e.tool_name or 'a tool'} answered: {e.content})")
            continue
        who = (e.user_name or "Someone") if e.role == "user" else "Assistant"
        called = ", ".join(f"{c.name} {json.dumps(c.arguments)}" for c in e.calls)
        said = f"{e.content} [called {called}]".strip() if called else e.content
        lines.append(f"{who}: {said}")
    return "\n\n".join(lines)


def request(previous: str, entries: Sequence[HistoryEntry]) -> list[Message]:
    so_far = f"The summary so far:\n{previous}\n\n" if previous else ""
    ask = (
        f"{so_far}Messages to fold into it:\n\n{transcript(entries)}\n\n"
        f"Write the updated summary in at most {SUMMARY_WORDS} words: who asked what, the facts, "
        "numbers, names, links and decisions, what the assistant answered or promised, and open "
        "questions. Write only the summary."
    )
    return [Message("system", INSTRUCTIONS), Message("user", ask)]


class Summaries:
    """Folds threads' oldest turns into summaries, in the background of the replies."""

    def __init__(self, *, settings: Settings, state: State, router: Router) -> None:
        self.settings = settings
        self.state = state
        self.router = router
        self._running: set[asyncio.Task[bool]] = set()

    def start(self, fold: Fold) -> asyncio.Task[bool]:
        """Fold in the background; the task's result says whether the history was folded."""
        task = asyncio.create_task(self.fold(fold))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    @property
    def running(self) -> int:
        return len(self._running)

    async def wait(self) -> None:
        """Until the folds in progress are done."""
        await asyncio.gather(*self._running, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop folds in progress (the history stays as it was) and wait for them."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    async def fold(self, fold: Fold) -> bool:
        """Fold the thread's turns that no longer fit; never raises. After a failure the
        thread's claim is kept RETRY_AFTER seconds: a summary model that is down is not asked
        again by each of the thread's turns."""
        timeout = self.settings.turn_timeout
        try:
            claim = await self.state.claim_folding(fold.key, expire=timeout + 5)
            if claim is None:
                return False  # another turn or replica is folding this thread
            done = False
            try:
                async with asyncio.timeout(timeout):
                    folded = await self._fold(fold)
                done = True
                return folded
            finally:
                if done:
                    await self.state.release_folding(fold.key, claim)
                else:
                    await self.state.hold_folding(fold.key, claim, expire=RETRY_AFTER)
        except TimeoutError:
            log.warning("a thread's summary took over %.0f s: its history is kept whole", timeout)
        except REDIS_DOWN as e:
            log.warning("redis unavailable: a thread's summary is not kept: %s", e)
        except (BackendError, ParleyError, Unfolded) as e:
            log.warning("a thread's summary failed (its history is kept whole): %s", e)
        except Exception:
            log.exception("a thread's summary failed unexpectedly (its history is kept whole)")
        return False

    async def _fold(self, fold: Fold) -> bool:
        raw, summary = await self.state.whole_history(fold.key)
        stored = [HistoryEntry.from_json(r.decode("utf-8", "replace")) for r in raw]
        entries = [e for e in stored if e is not None]
        if len(entries) != len(stored):
            return False  # a corrupt entry: nothing to fold it with (it is skipped when read)
        n = span(entries, fold)
        if n == 0:
            return False
        model = self.settings.summary_model or fold.model
        profile = await self.router.profile(model)
        asking = plan(model, self.settings, profile)
        # what the summary model reads: the instructions, the summary so far and the span's
        # oldest part that fits; the rest waits for the next fold
        cap = summary_cap(asking.window)
        asked = request(summary.text, [])
        room = asking.window - cap - sum(estimate_tokens(m.content) for m in asked) - 16
        if room < MIN_ROOM:
            raise Unfolded(f"{model}'s window is too small to summarise a thread with")
        taken, used = 0, 0
        for entry in entries[:n]:
            cost = estimate_tokens(entry.content)  # (its per-message part: the speaker's name)
            if taken and used + cost > room:
                break
            taken, used = taken + 1, used + cost
        while taken < n and taken > 1 and entries[taken].role != "user":
            taken -= 1  # keep a question with its answer
        folding = entries[:taken]
        if used > room:  # the first message alone is larger than the room: its beginning
            chars = max(1, int(room * CHARS_PER_TOKEN))
            folding = [replace(folding[0], content=folding[0].content[:chars] + " …")]
        think = False if "thinking" in profile.capabilities else None
        options = Options(temperature=0.2, num_ctx=asking.window, num_predict=cap, think=think)
        text = await self._ask(model, request(summary.text, folding), options)
        if not text:
            raise Unfolded(f"{model} wrote an empty summary")
        folded = Summary(text, summary.folded + taken, model)
        if not await self.state.fold(fold.key, raw[:taken], folded):
            log.info("a thread's history moved on while it was summarised: not folded")
            return False
        log.info("folded %d messages of a thread into its summary (%s)", taken, model)
        return True

    async def _ask(self, model: str, messages: list[Message], options: Options) -> str:
        """The model's answer (its reasoning left out); one cut at its cap is kept as it is."""
        # at a backend with a cap, summaries queue as one person: behind people's first turns
        generation = await self.router.open(model, messages, options, person="parley:summaries")
        parts: list[str] = []
        finished = False
        async for chunk in generation:
            if isinstance(chunk, Content):
                parts.append(chunk.text)
            elif isinstance(chunk, Done):
                finished = True
        return clean_text("".join(parts)).strip() if finished else ""
