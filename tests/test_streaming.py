"""The renderer: cadence, coalescing, splitting, final states."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import unicodedata

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.backends.base import Content, Done, Thinking
from bot.markdown import (
    CURSOR,
    EMPTY_ANSWER,
    THINKING,
    clean_text,
    in_progress,
    open_fence,
    split_message,
)
from bot.ratelimit import EditBudgets
from bot.streaming import Renderer, Status
from bot.turn import EditBudget, Phase
from tests.sinks import RecordingSink

FENCE_LINE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*$", re.M)


def words(text: str) -> list[str]:
    """The text's words with fence lines dropped (splitting adds and removes only those)."""
    return FENCE_LINE.sub("", text).split()


def loses_nothing(original: str, pages: str) -> bool:
    """Every visible character of the original appears, in order, in the pages."""
    remaining = iter("".join(pages.split()))
    return all(ch in remaining for ch in "".join(original.split()))


# --- splitting ------------------------------------------------------------------------------


def test_short_text_is_one_message() -> None:
    assert split_message("hello", 100) == ["hello"]


def test_split_prefers_paragraph_boundaries() -> None:
    text = ("a" * 50 + "\n\n") * 4
    pages = split_message(text, 120)
    assert all(len(p) <= 120 for p in pages)
    assert all(set(p.replace("\n\n", "")) == {"a"} for p in pages)


def test_split_inside_code_closes_and_reopens_the_fence() -> None:
    code = "\n".join(f"line_{i} = {i}" for i in range(60))
    text = f"Here:\n\n```python\n{code}\n```\n\nDone."
    pages = split_message(text, 300)
    assert len(pages) > 2
    for page in pages:
        assert len(page) <= 300
        assert open_fence(page) is None
    assert pages[1].startswith("```python\n")
    assert words("\n".join(pages)) == words(text)


markdownish = st.lists(
    st.one_of(
        st.text(alphabet="abc .!?\n`~", min_size=0, max_size=80),
        st.sampled_from(["```", "```python", "~~~", "\n\n", "\n", " ", "````"]),
        st.text(alphabet="xyz", min_size=50, max_size=400),
    ),
    max_size=40,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=markdownish, limit=st.integers(min_value=60, max_value=500))
def test_splitting_never_exceeds_the_limit_nor_leaves_a_fence_open(text: str, limit: int) -> None:
    pages = split_message(text, limit)
    for page in pages[:-1]:
        assert len(page) <= limit
        assert open_fence(page) is None  # every finished message balances its fences
    assert len(pages[-1]) <= limit
    if open_fence(text) is None:
        assert open_fence(pages[-1]) is None
    assert loses_nothing(text, "\n".join(pages))


def test_in_progress_text_closes_an_open_fence_and_shows_a_cursor() -> None:
    shown = in_progress("look:\n```py\nx = 1")
    assert shown.endswith("```" + CURSOR)
    assert open_fence(shown.removesuffix(CURSOR)) is None


# --- renderer -------------------------------------------------------------------------------
#
# These run on looptime's fake loop clock: sleeps take no real time and the renderer, the
# recording platform and the token feeder all read the same clock, so timings are exact however
# loaded the machine is.


def on_loop_clock(**options: object) -> tuple[RecordingSink, Renderer]:
    clock = asyncio.get_running_loop().time
    sink = RecordingSink(clock=clock, **options)  # type: ignore[arg-type]
    return sink, Renderer(sink, clock=clock)


async def stream(renderer: Renderer, pieces: list[str], delay: float) -> None:
    for piece in pieces:
        renderer.feed(Content(piece))
        await asyncio.sleep(delay)
    renderer.feed(Done())


@pytest.mark.looptime
async def test_500_token_stream_edits_at_most_duration_over_interval_plus_two() -> None:
    sink, renderer = on_loop_clock(max_chars=12000, min_edit_interval=1.0, latency=0.05)
    started = renderer.clock()
    await renderer.begin()
    await stream(renderer, [f"tok{i} " for i in range(500)], 0.005)
    result = await renderer.finish(Status.COMPLETE)
    duration = renderer.clock() - started
    assert result.text == "".join(f"tok{i} " for i in range(500))
    assert sink.messages[-1] == result.text.rstrip()
    assert len(sink.edits) <= math.ceil(duration / 1.0) + 2
    assert sink.max_in_flight == 1  # no two calls ever overlap
    for before, after in itertools.pairwise(sink.calls):
        assert after.started >= before.ended
    mid = [c for c in sink.edits if not c.final]
    for before, after in itertools.pairwise(mid):
        assert after.started - before.started >= 1.0  # the cadence holds between edits


@pytest.mark.looptime
async def test_edits_are_coalesced_while_one_is_in_flight() -> None:
    sink, renderer = on_loop_clock(min_edit_interval=0.05, latency=0.2)
    await renderer.begin()
    await stream(renderer, ["x"] * 100, 0.005)  # 0.5 s of tokens, 0.2 s per edit
    await renderer.finish(Status.COMPLETE)
    assert len(sink.edits) <= 5
    assert sink.messages == ["x" * 100]


@pytest.mark.looptime
async def test_final_edit_is_not_held_back_by_the_cadence() -> None:
    sink, renderer = on_loop_clock(min_edit_interval=5.0)
    await renderer.begin()
    renderer.feed(Content("hello"))
    await asyncio.sleep(0.05)
    renderer.feed(Content(" world"))
    finishing = renderer.clock()
    await renderer.finish(Status.COMPLETE)
    assert sink.edits[-1].started == finishing  # not 5 s after the first text
    assert sink.messages == ["hello world"]


@pytest.mark.looptime
async def test_platform_rate_limit_pushes_the_next_edit_back() -> None:
    sink, renderer = on_loop_clock(min_edit_interval=0.05, rate_limit_edits=[0.5])
    await renderer.begin()
    await stream(renderer, ["a ", "b ", "c "], 0.05)
    await asyncio.sleep(0.1)
    result = await renderer.finish(Status.COMPLETE)
    assert sink.refused, "the fake platform answered 429 once"
    assert sink.edits[0].started - sink.refused[0] >= 0.5
    assert sink.messages == ["a b c"]
    assert result.status is Status.COMPLETE and result.rate_limited == 1


@pytest.mark.looptime
async def test_long_reply_continues_in_new_messages_within_the_limit() -> None:
    sink, renderer = on_loop_clock(max_chars=500, min_edit_interval=0.02)
    await renderer.begin()
    paragraph = "word " * 30 + "\n\n"
    code = "```js\n" + "\n".join(f"let v{i} = {i};" for i in range(40)) + "\n```\n\n"
    await stream(renderer, list(paragraph * 5 + code + paragraph * 3), 0.0005)
    result = await renderer.finish(Status.COMPLETE)
    assert len(sink.messages) >= 4
    for message in sink.messages:
        assert len(message) <= 500
        assert open_fence(message) is None
        assert CURSOR not in message
    assert words("\n".join(sink.messages)) == words(result.text)
    # every page but the newest was finished (its Stop button taken off) before the next
    assert [c.final for c in sink.calls if c.kind == "post"] == [False] * len(sink.messages)
    assert sum(1 for c in sink.edits if c.final) >= len(sink.messages)


@pytest.mark.looptime
async def test_thinking_shows_a_thinking_state_and_never_an_empty_message() -> None:
    sink, renderer = on_loop_clock(min_edit_interval=0.02)
    await renderer.begin()
    for piece in ["Let me", " think"]:
        renderer.feed(Thinking(piece))
        await asyncio.sleep(0.05)
    assert sink.messages == [THINKING]
    renderer.feed(Content("Answer."))
    renderer.feed(Done())
    await renderer.finish(Status.COMPLETE)
    assert sink.messages == ["Answer."]
    assert all(c.text.strip() for c in sink.calls)
    assert "thinking" in sink.waiting  # the platform indicator says so too
    phases = [c.frame.phase for c in sink.calls if c.frame is not None]
    assert phases[:2] == [Phase.PLACEHOLDER, Phase.THINKING] and phases[-1] is Phase.COMPLETE


@pytest.mark.looptime
async def test_error_keeps_the_partial_text_and_adds_a_notice() -> None:
    sink, renderer = on_loop_clock(min_edit_interval=0.02)
    await renderer.begin()
    renderer.feed(Content("The first half"))
    result = await renderer.finish(Status.ERROR, "The model stopped with an error: boom")
    assert sink.messages == ["The first half\n\n⚠️ The model stopped with an error: boom"]
    assert result.text == "The first half"
    final = sink.calls[-1].frame
    assert final is not None and final.phase is Phase.ERROR and final.body == "The first half"


@pytest.mark.looptime
async def test_empty_answer_is_said_not_left_blank() -> None:
    sink, renderer = on_loop_clock()
    await renderer.begin()
    renderer.feed(Done())
    await renderer.finish(Status.COMPLETE)
    assert sink.messages == [EMPTY_ANSWER]


@pytest.mark.looptime
async def test_stopped_reply_is_finalised_as_stopped() -> None:
    sink, renderer = on_loop_clock()
    await renderer.begin()
    renderer.feed(Content("partial"))
    await renderer.finish(Status.STOPPED)
    assert sink.messages == ["partial\n\n_⏹ Stopped._"]
    assert sink.calls[-1].final


@pytest.mark.looptime
async def test_first_answer_text_is_shown_at_once_not_after_the_interval() -> None:
    sink, renderer = on_loop_clock(min_edit_interval=5.0)
    await renderer.begin()
    posted = renderer.clock()
    renderer.feed(Content("Hello"))
    await asyncio.sleep(0.01)
    assert sink.edits, "the first text waited for the edit interval"
    assert sink.edits[0].started == posted
    assert sink.edits[0].text.startswith("Hello")
    await renderer.finish(Status.COMPLETE)


# --- the renderer and a shared edit budget (real Redis) --------------------------------------


async def test_a_spent_streaming_budget_delays_streaming_but_never_the_final_edit(
    redis_client: aioredis.Redis,
) -> None:
    budget = EditBudget("test:edits:C1", 10, 60.0)  # eight for streaming, two kept
    budgets = EditBudgets(redis_client)
    for i in range(8):  # other replies streaming in the same scope spent the streaming part
        assert (await budgets.take(budget, f"other{i}")).wait == 0
    sink = RecordingSink(min_edit_interval=0.02, budget=budget)
    renderer = Renderer(sink, budgets=budgets)
    await renderer.begin()
    await stream(renderer, [f"w{i} " for i in range(30)], 0.01)
    finishing = asyncio.get_running_loop().time()
    result = await renderer.finish(Status.COMPLETE)
    # the first text went first; then the budget said wait, for streaming edits only: the
    # final edit went out at once (not a window later), and no 429 was counted for it
    assert [c.final for c in sink.edits] == [False, True]
    assert asyncio.get_running_loop().time() - finishing < 5.0
    assert sink.messages == [result.text.rstrip()]
    assert result.rate_limited == 0
    assert await redis_client.zscore("parley:editors:{test:edits:C1}", renderer.reply_id) is None


async def test_a_replys_first_text_goes_before_other_replies_streaming_edits(
    redis_client: aioredis.Redis,
) -> None:
    budget = EditBudget("test:edits:C2", 5, 60.0)
    budgets = EditBudgets(redis_client)
    for i in range(4):  # other replies have used all of the streaming part
        assert (await budgets.take(budget, f"other{i}")).wait == 0
    sink = RecordingSink(min_edit_interval=0.02, budget=budget)
    renderer = Renderer(sink, budgets=budgets)
    await renderer.begin()
    renderer.feed(Content("Hello"))
    for _ in range(100):
        if sink.edits:
            break
        await asyncio.sleep(0.01)
    assert [c.text for c in sink.edits] == ["Hello" + CURSOR]
    assert (await budgets.take(budget, "other0")).wait > 0  # streaming still waits
    await renderer.finish(Status.COMPLETE)


def test_a_cut_before_a_fence_like_run_moves_to_the_start_of_its_line() -> None:
    # found by hypothesis: a cut after "? " left the next message starting with " ```xxx…"
    text = "?" * 9 + "x" * 56 + "?\n? ```" + "x" * 50
    pages = split_message(text, 60)
    assert all(open_fence(page) is None for page in pages[:-1])
    assert open_fence(pages[-1]) is None
    assert loses_nothing(text, "\n".join(pages))


# --- text as it comes in --------------------------------------------------------------------

UNCLEAN = st.lists(
    st.one_of(
        st.text(),
        st.characters(exclude_categories=[]),  # lone surrogates included
        st.sampled_from(["\ud800", "\udfff", "\x00", "\r\n", "\r", "\x1b[31m", "\x85", "\t"]),
    ),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=UNCLEAN)
def test_clean_text_can_be_encoded_and_keeps_only_tabs_and_line_breaks(text: str) -> None:
    cleaned = clean_text(text)
    cleaned.encode("utf-8")  # no lone surrogate left
    assert all(unicodedata.category(c) != "Cc" or c in "\t\n" for c in cleaned)
    assert clean_text(cleaned) == cleaned
    kept = [c for c in text if c in "\t\n" or unicodedata.category(c) not in ("Cc", "Cs")]
    assert [c for c in cleaned if c != "\ufffd"] == [c for c in kept if c != "\ufffd"]


def test_clean_text_marks_a_lone_surrogate_and_joins_crlf() -> None:
    assert clean_text("a\ud800b\r\nc\x00d") == "a\ufffdb\ncd"
