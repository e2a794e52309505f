"""bot/fastjson.py reads what json reads, as json reads it; history and images as json.dumps wrote
them read as they did, from Redis too."""

from __future__ import annotations

import json
import math

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from bot import fastjson
from bot.backends.base import Image
from bot.state import HistoryEntry, State, _image_json, _images
from bot.turn import ConversationKey

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def same(a: object, b: object) -> bool:
    """Equal, NaN included, and of the same types (1 is not 1.0)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(value=JSON, ascii_only=st.booleans())
def test_loads_reads_what_json_writes_as_json_reads_it(value: object, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)  # NaN, Infinity, lone surrogates too
    assert same(fastjson.loads(text), json.loads(text))
    assert same(fastjson.loads(text.encode()), json.loads(text))


@pytest.mark.parametrize(
    "text",
    ['{"a": NaN}', "[Infinity, -Infinity]", '{"n": 1e999}', '"\\ud800"', '{"a": "\\udfff x"}'],
)
def test_what_orjson_refuses_reads_as_json_reads_it(text: str) -> None:
    assert same(fastjson.loads(text), json.loads(text))


@pytest.mark.parametrize("text", ["", "{", '{"a": 1', "nul", '{"a": 1} x', "[1,]"])
def test_what_json_refuses_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        fastjson.loads(text)


ENTRY = HistoryEntry(
    role="user",
    content='Ünïcode, 日本語, emoji 🙂, a quote " and a line\nbreak',
    user_id="U1",
    user_name="Zoë",
    model="",
    images=("0001-abc", "0002-def"),
    reply="tok",
)


def written_before(entry: HistoryEntry, *, ascii_only: bool = False) -> str:
    """A history entry as json.dumps wrote it before bot/fastjson.py (and still writes it)."""
    data = json.loads(entry.to_json())
    return json.dumps(data, ensure_ascii=ascii_only)


def test_a_history_entry_json_wrote_reads_as_it_did() -> None:
    assert HistoryEntry.from_json(ENTRY.to_json()) == ENTRY
    assert HistoryEntry.from_json(written_before(ENTRY)) == ENTRY
    assert HistoryEntry.from_json(written_before(ENTRY, ascii_only=True)) == ENTRY
    assert HistoryEntry.from_json('{"role": "user", "content": "\\ud800 x"}') == HistoryEntry(
        role="user", content="\ud800 x"
    )  # what orjson refuses reads as json reads it
    assert HistoryEntry.from_json('{"role": "user"') is None  # a corrupt entry is skipped


def test_an_image_json_wrote_reads_as_it_did() -> None:
    image = Image("image/png", "iVBORw0KGgo=")
    old = json.dumps({"t": image.media_type, "d": image.data})
    assert _images({b"id1": old.encode(), "id2": _image_json(image)}) == {
        "id1": image,
        "id2": image,
    }


async def test_a_thread_written_before_reads_from_redis_and_goes_on(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    state = State(redis, prefix="fj:")
    key = ConversationKey("slack", "T1", "C1", "1.0")
    answer = HistoryEntry(role="assistant", content="Ça va ✓", model="llama3.2")
    try:
        # the thread as an older Parley left it, then a turn written now
        await redis.rpush(state.history_key(key), written_before(ENTRY).encode())
        await state.append(key, answer)
        assert await state.history(key) == [ENTRY, answer]
    finally:
        await redis.aclose()
