"""Hostile gateway input, generated: Parley answers what it can read and drops the rest.

Hypothesis makes MESSAGE_CREATE and INTERACTION_CREATE payloads — broken fields, random JSON,
any code point (lone surrogates, NUL, control characters), huge fields — and the fake Discord
dispatches each to one Parley started per test (the real discord.py client, real Redis). Every
example then checks what a person or an operator would see: no traceback in the log, one line
for each event dropped, nothing posted for an event that cannot be answered and a final answer
(not a half-finished one) for one that can, the gateway still answering, and no thread lock,
in-flight slot or Stop owner left in Redis.

Examples stay independent though they share one Parley: each asks as a new person (rate limits
and in-flight slots are per person) with a new message (de-duplication and reply chains are per
message), and is judged only by the requests and log lines since it began. The fake's rate-limit
buckets are made large: Discord's own (5 edits per 5 s per channel) would make this a test of
waiting, which test_discord covers.

PARLEY_FUZZ_EXAMPLES sets the number of examples of each test (default 100).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.discord import DiscordAdapter
from adapters.discord_logic import MAX_CONTENT_CHARS, NAME_CHARS, OPTION_CHARS, is_snowflake
from bot.markdown import CURSOR, PLACEHOLDER, THINKING
from tests.fakes.discord import FakeDiscord, Recorded
from tests.fakes.model_server import FakeModelServer
from tests.support import (
    discord_settings,
    held_in_redis,
    mention,
    running_discord,
    stop_buttons,
    tracebacks,
    until,
)

T = TypeVar("T")
Json = dict[str, Any]

EXAMPLES = int(os.environ.get("PARLEY_FUZZ_EXAMPLES", "100"))
ANSWER_WITHIN = 10.0  # seconds for a final answer (a model turn) or the gateway's next answer
QUIET = 0.02  # seconds without a request after which an example's event is taken as handled
HELP_WITHIN = 2.0  # seconds for /help's answer (a few milliseconds while the gateway is read)
STOP_PREFIX = "parley:stop:discord:"
SLASH, PRESS, AUTOCOMPLETE = 2, 3, 4


# --- what hypothesis makes ------------------------------------------------------------------

# Characters as the gateway can carry them: any code point, lone surrogates included (JSON's
# "\ud800" escape), NUL and the other controls, marks that change direction or join, markup.
CHARACTERS = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),
    st.characters(categories=["Cc", "Cf", "Mn", "Zl", "Zp"]),
    st.sampled_from("\x00<@!&#>:`*_~|\\ \n"),
)


def texts(*, min_size: int = 0, max_size: int) -> st.SearchStrategy[str]:
    """Text of CHARACTERS (`st.text` would quietly leave the lone surrogates out)."""
    return st.lists(CHARACTERS, min_size=min_size, max_size=max_size).map("".join)


def repeated(shortest: int, longest: int) -> st.SearchStrategy[str]:
    """Text of `shortest` to `longest` characters, a short random piece repeated (hypothesis
    makes long text rarely, and slowly, on its own)."""
    return st.tuples(texts(min_size=1, max_size=8), st.integers(shortest, longest)).map(
        lambda piece_and_length: (piece_and_length[0] * piece_and_length[1])[: piece_and_length[1]]
    )


TEXT = texts(max_size=60)
# Any JSON value (what json.loads can give back), text of every kind included
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
NOT_SNOWFLAKES = JSON.filter(lambda value: not is_snowflake(value))
NOT_TEXT = JSON.filter(lambda value: not isinstance(value, str))
NOT_OBJECTS = JSON.filter(lambda value: not isinstance(value, dict))
NOT_LISTS = JSON.filter(lambda value: not isinstance(value, list))
NOT_NUMBERS = JSON.filter(lambda value: type(value) is not int)
NOT_BOOLEANS = JSON.filter(lambda value: value is not None and not isinstance(value, bool))
SNOWFLAKES = st.integers(1, 2**64 - 1).map(str)


def longer_than(limit: int, most: int = 20 * MAX_CONTENT_CHARS) -> st.SearchStrategy[str]:
    """Text still longer than `limit` characters once it has crossed the wire (up to `most`).

    JSON reads a high and a low surrogate escaped side by side as one character, so a text
    may arrive up to half as long as it was sent: twice the limit is always over it."""
    return repeated(2 * (limit + 1), most)


@dataclass(frozen=True)
class Change:
    """One change to a payload: the value at `path` (keys and list indexes) set, or removed."""

    path: tuple[str | int, ...]
    value: Any = None
    remove: bool = False

    def apply(self, payload: Any) -> Any:
        if not self.path:
            return self.value
        target = payload
        for key in self.path[:-1]:
            target = target[key]
        if self.remove:
            del target[self.path[-1]]
        else:
            target[self.path[-1]] = self.value
        return payload


def removed(*path: str | int) -> st.SearchStrategy[Change]:
    return st.just(Change(path, remove=True))


def set_to(values: st.SearchStrategy[Any], *path: str | int) -> st.SearchStrategy[Change]:
    return values.map(lambda value: Change(path, value))


# Unknown fields Discord may add at any time, at the top of a payload: never a reason to drop it
EXTRA_FIELDS = st.dictionaries(st.text(min_size=1, max_size=10).map("x-".__add__), JSON, max_size=3)

# Ways a MESSAGE_CREATE breaks what Discord's API promises about the fields Parley reads
MESSAGE_BREAKAGES = st.one_of(
    *(removed(key) for key in ("id", "channel_id", "type", "content", "author", "mentions")),
    removed("mention_roles"),
    removed("author", "id"),
    removed("author", "username"),
    removed("author", "discriminator"),
    removed("author", "avatar"),
    set_to(NOT_SNOWFLAKES, "id"),
    set_to(NOT_SNOWFLAKES, "channel_id"),
    set_to(NOT_SNOWFLAKES, "author", "id"),
    set_to(NOT_SNOWFLAKES, "mentions", 0, "id"),
    set_to(NOT_SNOWFLAKES.filter(lambda value: value is not None), "guild_id"),
    set_to(NOT_NUMBERS, "type"),
    set_to(NOT_TEXT, "content"),
    set_to(longer_than(MAX_CONTENT_CHARS), "content"),
    set_to(NOT_OBJECTS, "author"),
    set_to(NOT_TEXT.filter(lambda value: value is not None), "author", "username"),
    set_to(longer_than(NAME_CHARS, 10 * NAME_CHARS), "author", "username"),
    set_to(NOT_BOOLEANS, "author", "bot"),
    set_to(NOT_OBJECTS.filter(lambda value: value is not None), "member"),
    set_to(NOT_LISTS, "mentions"),
    set_to(NOT_OBJECTS, "mentions", 0),
    set_to(NOT_LISTS, "mention_roles"),
    set_to(NOT_OBJECTS.filter(lambda value: value is not None), "message_reference"),
    set_to(
        NOT_SNOWFLAKES.filter(lambda value: value is not None).map(
            lambda value: {"message_id": value}
        ),
        "message_reference",
    ),
    set_to(SNOWFLAKES, "channel_id"),  # a channel nobody has seen
)


@dataclass(frozen=True)
class Breaking:
    """A question to the bot, broken in one way, with harmless oddities around it."""

    breakage: Change
    text: str
    extra: dict[str, Any]
    in_dm: bool

    @property
    def possible(self) -> bool:
        # discord.py knows no DM channel before its first message: any id may be a new one
        unknown_channel = self.breakage.path == ("channel_id",) and is_snowflake(
            self.breakage.value
        )
        return not (self.in_dm and unknown_channel)


BROKEN_MESSAGES = st.builds(Breaking, MESSAGE_BREAKAGES, TEXT, EXTRA_FIELDS, st.booleans()).filter(
    lambda broken: broken.possible
)


@dataclass(frozen=True)
class OddQuestion:
    """A question to the bot that Discord could send: any text, in an unusual shape."""

    text: str
    mention_at: int  # where in the text the bot's mention goes
    extra: dict[str, Any]
    name: str | None  # the asker's global name (None: none set)
    nick: str | None
    ids_as_numbers: bool  # ids as JSON numbers rather than strings
    to_deleted: bool  # a reply to a message that is gone
    in_dm: bool


ODD_QUESTIONS = st.builds(
    OddQuestion,
    text=st.one_of(TEXT, repeated(0, MAX_CONTENT_CHARS - 30)),  # with the mention: 4,000 at most
    mention_at=st.integers(0, MAX_CONTENT_CHARS),
    extra=EXTRA_FIELDS,
    name=st.none() | texts(max_size=NAME_CHARS),
    nick=st.none() | texts(max_size=NAME_CHARS),
    ids_as_numbers=st.booleans(),
    to_deleted=st.booleans(),
    in_dm=st.booleans(),
)

# Anything at all: a valid question with fields (of its own or its author's) set to any JSON or
# removed, or a payload that is any JSON
TOP_FIELDS = [
    "id",
    "channel_id",
    "guild_id",
    "type",
    "content",
    "author",
    "member",
    "mentions",
    "mention_roles",
    "attachments",
    "embeds",
    "flags",
    "timestamp",
    "components",
    "sticker_items",
    "message_reference",
    "referenced_message",
    "tts",
]
AUTHOR_FIELDS = ["id", "username", "global_name", "discriminator", "avatar", "bot"]
MESSAGE_PATHS = [
    (),  # the whole payload
    *((key,) for key in TOP_FIELDS),
    *(("author", key) for key in AUTHOR_FIELDS),
]
ANY_CHANGES = st.tuples(
    st.booleans(),  # in a DM
    st.lists(
        st.builds(Change, st.sampled_from(MESSAGE_PATHS), JSON, st.booleans()),
        min_size=1,
        max_size=3,
    ),
)


@dataclass(frozen=True)
class Interacting:
    """An interaction: a slash command, an autocomplete or a button press, perhaps broken."""

    kind: int
    data: Any
    breakage: Change | None  # None: as Discord could send it


def _option(value: st.SearchStrategy[str], *, focused: bool = False) -> st.SearchStrategy[Json]:
    """/model's one option, `name`, with this value (being typed, if `focused`)."""
    typing = {"focused": True} if focused else {}
    return value.map(lambda v: {"name": "name", "type": 3, "value": v, **typing})


MODEL_NAMES = texts(min_size=1, max_size=OPTION_CHARS)
COMMANDS = st.one_of(
    st.sampled_from(["help", "reset"]).map(lambda name: {"name": name, "type": 1}),
    st.lists(_option(MODEL_NAMES), max_size=1).map(
        lambda options: {"name": "model", "type": 1, "options": options}
    ),
)
AUTOCOMPLETES = _option(texts(max_size=OPTION_CHARS), focused=True).map(
    lambda option: {"name": "model", "type": 1, "options": [option]}
)
CUSTOM_IDS = st.one_of(
    SNOWFLAKES.map(STOP_PREFIX.__add__),
    texts(min_size=1, max_size=100),
    texts(max_size=80).map(STOP_PREFIX.__add__),
)
PRESSES = st.builds(lambda c: {"custom_id": c, "component_type": 2}, CUSTOM_IDS)

INTERACTION_BREAKAGES = st.one_of(
    removed("data"),
    set_to(NOT_OBJECTS, "data"),
    set_to(NOT_SNOWFLAKES, "id"),
    set_to(NOT_TEXT, "token"),
    set_to(NOT_OBJECTS, "member"),
    removed("member", "user"),
    set_to(NOT_SNOWFLAKES, "member", "user", "id"),
    set_to(NOT_TEXT.filter(lambda value: value is not None), "member", "user", "username"),
    set_to(NOT_SNOWFLAKES.filter(lambda value: value is not None), "channel_id"),
    set_to(JSON.filter(lambda value: not isinstance(value, str | type(None))), "member", "nick"),
)
COMMAND_BREAKAGES = st.one_of(
    set_to(NOT_TEXT, "data", "name"),
    set_to(NOT_LISTS.filter(lambda value: value is not None), "data", "options"),
    set_to(st.lists(NOT_OBJECTS, min_size=1, max_size=3), "data", "options"),
    set_to(
        st.lists(st.fixed_dictionaries({"name": st.just("name"), "type": NOT_NUMBERS}), min_size=1),
        "data",
        "options",
    ),
    set_to(
        st.lists(
            st.fixed_dictionaries({"name": st.just("name"), "type": st.just(3), "value": NOT_TEXT}),
            min_size=1,
        ),
        "data",
        "options",
    ),
    set_to(
        longer_than(OPTION_CHARS).map(lambda v: [{"name": "name", "type": 3, "value": v}]),
        "data",
        "options",
    ),
)
PRESS_BREAKAGES = st.one_of(
    removed("data", "custom_id"),
    set_to(NOT_TEXT, "data", "custom_id"),
    set_to(longer_than(100, 2000), "data", "custom_id"),
    set_to(NOT_NUMBERS, "data", "component_type"),
)


def sometimes(changes: st.SearchStrategy[Change]) -> st.SearchStrategy[Change | None]:
    """One of `changes` half the time, else None (`st.none() | changes` would pick None as
    rarely as any one of the many strategies `changes` is made of)."""
    return st.booleans().flatmap(lambda broken: changes if broken else st.none())


INTERACTIONS = st.one_of(
    st.builds(
        Interacting, st.just(SLASH), COMMANDS, sometimes(INTERACTION_BREAKAGES | COMMAND_BREAKAGES)
    ),
    st.builds(Interacting, st.just(AUTOCOMPLETE), AUTOCOMPLETES, sometimes(INTERACTION_BREAKAGES)),
    st.builds(
        Interacting, st.just(PRESS), PRESSES, sometimes(INTERACTION_BREAKAGES | PRESS_BREAKAGES)
    ),
)


# --- running examples against one Parley ----------------------------------------------------


def examples(
    strategy: st.SearchStrategy[T], check: Callable[[T], Coroutine[Any, Any, None]]
) -> Coroutine[Any, Any, None]:
    """Run `check` on EXAMPLES examples of `strategy`, one at a time, on this event loop.

    Hypothesis drives them from a worker thread, so Parley keeps running on the loop between
    them; each example is a coroutine scheduled on the loop and waited for."""
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,  # every test runs this same function: one database would mix them up
        print_blob=True,
    )
    @given(strategy)
    def run(example: T) -> None:
        asyncio.run_coroutine_threadsafe(check(example), loop).result(ANSWER_WITHIN * 3)

    return asyncio.to_thread(run)


@dataclass
class Edge:
    """One running Parley on a fake Discord, and what each example is judged by."""

    fake: FakeDiscord
    adapter: DiscordAdapter
    redis: aioredis.Redis
    caplog: pytest.LogCaptureFixture
    marker: Json  # who asks /help after each example
    _requests: int = 0
    _records: int = 0
    _pages: set[str] = field(default_factory=set)

    def begin(self) -> None:
        """An example begins: what is already there is not its doing."""
        self._requests, self._records = len(self.fake.requests), len(self.caplog.records)
        self._pages = {page["id"] for page in self.fake.bot_messages()}

    @property
    def records(self) -> list[logging.LogRecord]:
        return self.caplog.records[self._records :]

    def writes(self) -> list[Recorded]:
        """What Parley posted, edited or answered since the example began (typing aside)."""
        return [
            r
            for r in self.fake.requests[self._requests :]
            if r.method in ("POST", "PATCH") and not r.path.endswith("/typing")
        ]

    def pages(self) -> list[Json]:
        """The messages Parley posted in channels since the example began, as they are now."""
        return [page for page in self.fake.bot_messages() if page["id"] not in self._pages]

    def answered_in_full(self) -> bool:
        """Something was posted, and every page of it is in its final state."""
        pages = self.pages()
        return bool(pages) and all(
            stop_buttons(page) == []  # the Stop button goes with the final edit
            and page["content"] not in (PLACEHOLDER, THINKING)
            and not page["content"].endswith(CURSOR)
            for page in pages
        )

    def dropped(self) -> list[str]:
        return [
            r.getMessage()
            for r in self.records
            if r.name == "adapters.discord"
            and r.levelno == logging.WARNING
            and ("dropped Discord" in r.getMessage() or "not answered" in r.getMessage())
        ]

    async def settle(self) -> list[Recorded]:
        """Wait until the example's event has been handled; return the requests that answered
        the /help asked meanwhile.

        /help is dispatched after the event and answered: the gateway is still read, and the
        event was parsed and its handler started. Then Parley is left alone until no request
        has come for a moment and no turn holds anything in Redis: a turn that started is over.
        """
        iid = await self.fake.slash(self.marker, "help")
        try:
            await self.fake.wait_for(lambda f: f.interaction_replies(iid), within=HELP_WITHIN)
        except TimeoutError:
            ended = "" if self.adapter.ready else ": the gateway connection has ended"
            raise AssertionError(f"/help was not answered{ended}") from None
        await self.quiet()
        return [r for r in self.fake.requests if iid in r.path]

    async def quiet(self) -> None:
        seen = -1
        while seen != len(self.fake.requests):
            seen = len(self.fake.requests)
            await asyncio.sleep(QUIET)
            await until(self._nothing_held, within=ANSWER_WITHIN)

    async def _nothing_held(self) -> bool:
        return await held_in_redis(self.redis) == []

    async def message(self, payload: Any) -> None:
        await self.fake.dispatch("MESSAGE_CREATE", payload, guild_id=self.fake.guild_id)


@asynccontextmanager
async def edge(
    redis_url: str,
    model_server: FakeModelServer,
    redis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> AsyncIterator[Edge]:
    """A running Parley for one test; at the end a plain question must still be answered."""
    caplog.set_level(logging.INFO)
    async with FakeDiscord(bucket_size=1000) as fake:
        settings = discord_settings(redis_url, model_server, fake)
        async with running_discord(settings, edit_budget=(1000, 1)) as adapter:
            at = Edge(fake, adapter, redis, caplog, marker=fake.add_user("marker"))
            yield at
            at.begin()
            await fake.say(fake.add_user("last"), f"{mention(fake)} still there?")
            await fake.wait_for(lambda f: at.answered_in_full(), within=ANSWER_WITHIN)
            await at.quiet()
    # nothing at all: not discord.py's, the adapter's, asyncio's (never-retrieved task exceptions
    # are logged when collected) nor the core's, which cleans text as it comes in
    assert tracebacks(caplog.records) == []


def question(fake: FakeDiscord, text: str, *, in_dm: bool) -> Json:
    """A new person's question to the bot, in a channel or a DM, as a MESSAGE_CREATE payload."""
    asker = fake.add_user("asker")
    where = fake.dm_channel_id(asker) if in_dm else None
    return fake.message_event(asker, f"{mention(fake)} {text}", channel_id=where)


# --- the tests --------------------------------------------------------------------------------


async def test_a_message_breaking_a_field_parley_reads_is_dropped_with_one_line_posting_nothing(
    redis_url: str,
    model_server: FakeModelServer,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with edge(redis_url, model_server, redis_client, caplog) as at:

        async def check(broken: Breaking) -> None:
            at.begin()
            payload = {**question(at.fake, broken.text, in_dm=broken.in_dm), **broken.extra}
            await at.message(broken.breakage.apply(payload))
            marker = await at.settle()
            assert tracebacks(at.records) == []
            assert len(at.dropped()) == 1, at.dropped()
            assert [r for r in at.writes() if r not in marker] == []

        await examples(BROKEN_MESSAGES, check)


async def test_a_question_in_any_odd_shape_gets_a_final_answer(
    redis_url: str,
    model_server: FakeModelServer,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with edge(redis_url, model_server, redis_client, caplog) as at:

        async def check(odd: OddQuestion) -> None:
            at.begin()
            cut = min(odd.mention_at, len(odd.text))
            payload = question(at.fake, "", in_dm=odd.in_dm)
            asked = payload["id"]
            payload["content"] = f"{odd.text[:cut]} {mention(at.fake)} {odd.text[cut:]}"
            payload["author"]["global_name"] = odd.name
            if not odd.in_dm:
                payload["member"]["nick"] = odd.nick
            payload.update(odd.extra)
            if odd.to_deleted:
                gone = {"message_id": str(int(asked) + 2**62), "channel_id": payload["channel_id"]}
                payload.update(type=19, message_reference=gone, referenced_message=None)
            if odd.ids_as_numbers:
                payload["id"] = int(payload["id"])
                payload["author"]["id"] = int(payload["author"]["id"])
            await at.message(payload)
            await at.fake.wait_for(lambda f: at.answered_in_full(), within=ANSWER_WITHIN)
            await at.quiet()  # a long answer goes on in a second page
            assert at.answered_in_full() and at.dropped() == []
            first = at.pages()[0]["message_reference"]["message_id"]
            assert first == asked
            assert tracebacks(at.records) == []  # lone surrogates and all: the core cleans text

        await examples(ODD_QUESTIONS, check)


async def test_any_json_as_a_message_is_answered_in_full_or_dropped_posting_nothing(
    redis_url: str,
    model_server: FakeModelServer,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with edge(redis_url, model_server, redis_client, caplog) as at:

        async def check(in_dm_and_changes: tuple[bool, list[Change]]) -> None:
            in_dm, changes = in_dm_and_changes
            at.begin()
            payload: Any = question(at.fake, "what now?", in_dm=in_dm)
            for change in changes:
                with contextlib.suppress(KeyError, IndexError, TypeError):  # that path is gone
                    payload = change.apply(payload)
            await at.message(payload)
            marker = await at.settle()
            if at.pages():  # answered: in full
                await at.fake.wait_for(lambda f: at.answered_in_full(), within=ANSWER_WITHIN)
                await at.quiet()
                assert at.answered_in_full()
                assert tracebacks(at.records) == []
            else:  # or not at all
                assert [r for r in at.writes() if r not in marker] == []
                assert tracebacks(at.records) == []
            assert len(at.dropped()) <= 1, at.dropped()

        await examples(ANY_CHANGES, check)


async def test_an_interaction_is_answered_once_or_dropped_with_one_line(
    redis_url: str,
    model_server: FakeModelServer,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with edge(redis_url, model_server, redis_client, caplog) as at:
        reply = at.fake.message_event(at.fake.bot, "an earlier answer")["id"]

        async def check(interacting: Interacting) -> None:
            at.begin()
            user = at.fake.add_user("presser")
            on = reply if interacting.kind == PRESS else None
            payload = at.fake.interaction_event(
                user, interacting.kind, interacting.data, message_id=on
            )
            iid = str(payload["id"])
            if interacting.breakage is not None:
                payload = interacting.breakage.apply(payload)
            await at.fake.dispatch("INTERACTION_CREATE", payload, guild_id=at.fake.guild_id)
            marker = await at.settle()
            answers = at.fake.callbacks[iid]
            if interacting.breakage is not None:
                assert answers == [] and len(at.dropped()) == 1, at.dropped()
            elif expects_answer(interacting):
                await at.fake.wait_for(lambda f: answered(f, iid), within=ANSWER_WITHIN)
                assert len(answers) == 1  # once, whatever it says
            else:  # a button that is not Parley's
                assert answers == [] and at.dropped() == []
            assert tracebacks(at.records) == []
            assert [r for r in at.writes() if r not in marker and iid not in r.path] == []

        await examples(INTERACTIONS, check)


def expects_answer(interacting: Interacting) -> bool:
    """Whether Parley answers this unbroken interaction: every command it has, and a press of
    what names a Stop button (which says that reply has finished)."""
    if interacting.kind != PRESS:
        return True
    custom_id = interacting.data["custom_id"]
    return custom_id.startswith(STOP_PREFIX) and is_snowflake(custom_id.removeprefix(STOP_PREFIX))


def answered(fake: FakeDiscord, iid: str) -> bool:
    """Acknowledged, and (unless it was an autocomplete or a silent Stop) followed up."""
    callbacks = fake.callbacks[iid]
    if not callbacks:
        return False
    if callbacks[0]["type"] in (5, 6):  # deferred: an answer follows
        return bool(fake.interaction_replies(iid))
    return True
