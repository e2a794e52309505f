"""Discord decisions without I/O: conversation keys, what the model reads, what is readable."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.discord_logic import (
    MAX_CONTENT_CHARS,
    OPTION_CHARS,
    Place,
    content_withheld,
    conversation_key,
    interaction_problem,
    is_snowflake,
    message_problem,
    payload_id,
    rank_models,
    stop_custom_id,
    stop_token_of,
    thread_name,
    to_model_text,
)
from bot.conversation import stop_token
from bot.turn import ConversationKey, Turn

BOT = 900
GUILD, CHANNEL, THREAD = 1, 10, 20
IN_CHANNEL = Place(GUILD, CHANNEL)
IN_THREAD = Place(GUILD, THREAD, parent_id=CHANNEL)
IN_DM = Place(None, 30)


def read(text: str, **names: dict[int, str]) -> str:
    return to_model_text(
        text,
        bot_id=BOT,
        bot_name="Parley",
        users=names.get("users", {}),
        roles=names.get("roles", {}),
        channels=names.get("channels", {}),
    )


Json = dict[str, Any]

# Any JSON value, with text of any code point (lone surrogates and control characters too)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(st.characters(exclude_categories=[]), max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


# --- which gateway events are readable ------------------------------------------------------


def user(uid: str = "7", name: str = "alice") -> Json:
    return {
        "id": uid,
        "username": name,
        "global_name": name.title(),
        "discriminator": "0",
        "avatar": None,
        "bot": False,
    }


def message(**fields: Any) -> Json:
    """A MESSAGE_CREATE payload as Discord sends one (the fields Parley reads), in a guild."""
    payload: Json = {
        "id": "1300000000000000001",
        "channel_id": "10",
        "guild_id": "1",
        "type": 0,
        "content": f"<@{BOT}> hello",
        "author": user(),
        "member": {"nick": None, "roles": ["70"]},
        "mentions": [{**user(str(BOT), "parley"), "member": {"roles": []}}],
        "mention_roles": [],
    }
    return {**payload, **fields}


def slash(kind: int = 2, **data: Any) -> Json:
    """An INTERACTION_CREATE payload of a slash command (kind 2) or autocomplete (4)."""
    return {
        "id": "1300000000000000002",
        "type": kind,
        "token": "interaction-token",
        "channel_id": "10",
        "guild_id": "1",
        "member": {"user": user(), "roles": [], "nick": None, "permissions": "2147483648"},
        "data": {"id": "55", "name": "model", "type": 1, "options": [], **data},
    }


def press(custom_id: object = "parley:stop:discord:1300000000000000001") -> Json:
    payload = slash(3)
    payload["data"] = {"custom_id": custom_id, "component_type": 2}
    return payload


def test_snowflakes_are_positive_64_bit_numbers_however_they_are_written() -> None:
    assert is_snowflake("1300000000000000001") and is_snowflake(1300000000000000001)
    assert is_snowflake(str(2**64 - 1))
    for wrong in ("", "0", "-5", str(2**64), "12a", "١٢٣", " 12", "1_0", True, 1.0, None, [1]):
        assert not is_snowflake(wrong), wrong


def test_messages_and_interactions_as_discord_sends_them_are_readable() -> None:
    assert message_problem(message()) is None
    dm = {k: v for k, v in message().items() if k not in ("guild_id", "member")}
    assert message_problem(dm) is None
    assert message_problem(message(id=1300000000000000001)) is None  # an id as a number
    reply = message(type=19, message_reference={"message_id": "99"}, referenced_message=None)
    assert message_problem(reply) is None  # a reply to a deleted message
    assert message_problem(message(type=19, referenced_message=message(id="99"))) is None
    assert message_problem(message(type=12345, flags="odd", unknown={"new": "field"})) is None
    assert interaction_problem(slash()) is None
    assert (
        interaction_problem(slash(options=[{"name": "name", "type": 3, "value": "qwen3"}])) is None
    )
    typing = [{"name": "name", "type": 3, "value": "qw", "focused": True}]
    assert interaction_problem(slash(4, options=typing)) is None
    assert interaction_problem(press()) is None
    assert interaction_problem(press("anything else")) is None  # not ours: for discord.py
    assert interaction_problem({"type": 1}) is None  # a ping: not Parley's to check


def _set(path: str, value: object) -> Callable[[Json], None]:
    def breaking(payload: Json) -> None:
        *inside, last = path.split(".")
        target: Any = payload
        for key in inside:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[last] = value

    return breaking


def _drop(key: str) -> Callable[[Json], None]:
    return lambda payload: payload.pop(key)


def _drop_from(inside: str, key: str) -> Callable[[Json], None]:
    return lambda payload: payload[inside].pop(key)


@pytest.mark.parametrize(
    ("breaking", "problem"),
    [
        (_drop("author"), "its author is not an object"),
        (_set("author", "alice"), "its author is not an object"),
        (_set("author.id", "abc"), "its author's id is not a snowflake"),
        (_set("author.username", 5), "its author's name is not a name"),
        (_set("author.global_name", "x" * 101), "its author's name is not a name"),
        (_set("author.bot", "yes"), "its author's bot flag is not a boolean"),
        (_drop_from("author", "avatar"), "its author's discriminator or avatar is missing"),
        (_drop_from("author", "discriminator"), "its author's discriminator or avatar"),
        (_drop("content"), "its content is not text"),
        (_set("content", None), "its content is not text"),
        (_set("content", "x" * (MAX_CONTENT_CHARS + 1)), "its content is 4,001 characters"),
        (_drop("id"), "its id is not a snowflake"),
        (_set("id", "-5"), "its id is not a snowflake"),
        (_set("channel_id", "general"), "its channel_id is not a snowflake"),
        (_set("guild_id", "x"), "its guild_id is not a snowflake"),
        (_set("type", "0"), "its type is not a number"),
        (_set("mentions", "everyone"), "its mentions are not a list"),
        (_set("mentions", [1]), "its mentioned user is not an object"),
        (_set("mentions.0.member", []), "its mentioned member is not an object"),
        (_set("mention_roles", ["mods"]), "its mention_roles are not a list of snowflakes"),
        (_set("member", "x"), "its member is not an object"),
        (_set("member.roles", [None]), "its member's roles are not a list of snowflakes"),
        (_set("guild_id", None), "it has a member but no guild"),
        (_set("message_reference", "x"), "its message_reference is not an object"),
        (_set("message_reference", {"message_id": "x"}), "its message_reference's message_id"),
        (_set("referenced_message", {"id": "1"}), "the message it replies to: its channel_id"),
    ],
)
def test_a_message_missing_or_mistyping_a_field_parley_reads_is_unreadable(
    breaking: Callable[[Json], None], problem: str
) -> None:
    payload = message()
    breaking(payload)
    found = message_problem(payload)
    assert found is not None and found.startswith(problem)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({**slash(), "id": "x"}, "its id is not a snowflake"),
        ({**slash(), "token": None}, "its token is not text"),
        ({**slash(), "member": None}, "its member is not an object"),
        ({**slash(), "member": {"roles": [], "permissions": "8"}}, "its member's user is not"),
        ({**slash(), "member": {"user": user(), "permissions": "x"}}, "its member's permiss"),
        ({**slash(), "guild_id": None}, "its user is not an object"),  # a DM names a user
        ({**slash(), "data": "x"}, "its data is not an object"),
        (slash(name=5), "its command name is not a name"),
        (slash(type=2), "it is not a slash command"),
        (slash(options="x"), "its options are not a list"),
        (slash(options=[1]), "an option has no name"),
        (slash(options=[{"name": "name", "type": 4, "value": 5}]), "an option is not text"),
        (slash(options=[{"name": "name", "type": 3, "value": 5}]), "an option's value is not"),
        (
            slash(options=[{"name": "name", "type": 3, "value": "q" * (OPTION_CHARS + 1)}]),
            "an option's value is not text of at most 100",
        ),
        (slash(resolved={"users": {"1": {}}}), "it carries users"),
        (slash(4, options=[{"name": "name", "type": 3, "value": "q"}]), "autocomplete without"),
        (press(5), "its custom_id is not 1 to 100"),
        (press(""), "its custom_id is not 1 to 100"),
        (press("parley:stop:discord:" + "1" * 100), "its custom_id is not 1 to 100"),
        ({**press(), "data": {"custom_id": "x"}}, "its component_type is not a number"),
    ],
)
def test_an_interaction_missing_or_mistyping_a_field_parley_reads_is_unreadable(
    payload: Json, problem: str
) -> None:
    found = interaction_problem(payload)
    assert found is not None and found.startswith(problem)


def _broken_somewhere(base: Json) -> Any:
    """`base` with one field, at any depth, replaced by any JSON or removed."""

    def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        found = [prefix] if prefix else []
        if isinstance(value, dict | list):
            for key, inner in value.items() if isinstance(value, dict) else enumerate(value):
                found += paths(inner, (*prefix, key))
        return found

    def broken(path: tuple[Any, ...], value: Any, remove: bool) -> Any:
        payload = copy.deepcopy(base)
        target = payload
        for key in path[:-1]:
            target = target[key]
        if remove and isinstance(target, dict):
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return payload

    return st.builds(broken, st.sampled_from(paths(base)), JSON_VALUES, st.booleans())


@given(
    st.one_of(
        JSON_VALUES,
        _broken_somewhere(message()),
        _broken_somewhere(
            message(
                type=19, message_reference={"message_id": "99"}, referenced_message=message(id="99")
            )
        ),
    )
)
def test_any_json_is_read_or_refused_in_words_that_repeat_nothing_of_it(data: Any) -> None:
    for problem in (message_problem(data), interaction_problem(data)):
        assert problem is None or _in_own_words(problem, data)
    assert payload_id(data) == "?" or is_snowflake(payload_id(data))


@given(st.one_of(_broken_somewhere(slash()), _broken_somewhere(press())))
def test_any_broken_interaction_is_read_or_refused_in_words_that_repeat_nothing_of_it(
    data: Any,
) -> None:
    problem = interaction_problem(data)
    assert problem is None or _in_own_words(problem, data)


def _in_own_words(problem: str, data: Any) -> bool:
    """A short line that quotes no text of the payload (none of its longer string values)."""

    def strings(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for inner in value.values() for s in strings(inner)]
        if isinstance(value, list):
            return [s for inner in value for s in strings(inner)]
        return []

    quoted = [s for s in strings(data) if len(s) >= 12 and s in problem]
    return len(problem) < 120 and not quoted


# --- conversation keys ----------------------------------------------------------------------


def test_a_thread_is_one_conversation_under_its_parent_channel() -> None:
    assert conversation_key(IN_THREAD, root_id=555) == ConversationKey("discord", "1", "10", "20")


def test_each_reply_chain_in_a_channel_is_its_own_conversation() -> None:
    assert conversation_key(IN_CHANNEL, root_id=555) == ConversationKey("discord", "1", "10", "555")
    assert conversation_key(IN_CHANNEL, root_id=556) != conversation_key(IN_CHANNEL, root_id=555)


def test_a_dm_is_one_running_conversation() -> None:
    assert conversation_key(IN_DM, root_id=1) == conversation_key(IN_DM, root_id=2)
    assert conversation_key(IN_DM).space == "dm"


def test_a_slash_command_in_a_channel_addresses_the_channel() -> None:
    assert conversation_key(IN_CHANNEL).thread == "10"


def test_thread_name_is_the_first_line_within_100_chars() -> None:
    assert thread_name("\n  What is Redis?\nMore detail") == "What is Redis?"
    long = thread_name("word " * 50)
    assert len(long) <= 100 and long.endswith("…")
    assert thread_name("   ") == "Parley"


# --- what the model reads -------------------------------------------------------------------


def test_the_bots_leading_mention_is_dropped() -> None:
    assert read(f"<@{BOT}> what is 2+2?") == "what is 2+2?"
    assert read(f"<@!{BOT}>, what is 2+2?") == "what is 2+2?"
    assert read(f"what is 2+2? <@{BOT}>") == "what is 2+2?"


def test_the_bot_mentioned_mid_sentence_becomes_its_name() -> None:
    assert read(f"ask <@{BOT}> about it") == "ask @Parley about it"


def test_people_roles_and_channels_become_names() -> None:
    text = f"<@{BOT}> tell <@1> and <@!2> in <#3> to ping <@&4>"
    names = read(text, users={1: "Alice", 2: "Bob"}, roles={4: "mods"}, channels={3: "general"})
    assert names == "tell @Alice and @Bob in #general to ping @mods"


def test_unknown_ids_become_neutral_words_not_numbers() -> None:
    assert read("<@123> <@&456> <#789>") == "@someone @role #channel"


def test_only_ascii_ids_of_snowflake_length_are_mentions() -> None:
    assert read("<@١٢٣> <@" + "9" * 21 + ">") == "<@١٢٣> <@" + "9" * 21 + ">"


def _as_regexes_read_it(text: str) -> str:
    """What to_model_text did with two regexes, before the trailing one (quadratic in the
    length of a run of spaces) was replaced by stripping from the end."""
    own = rf"<@!?{BOT}>"
    text = re.sub(rf"^\s*(?:{own}[\s,:]*)+", "", text)
    text = re.sub(rf"(?:[\s,]*{own})+\s*$", "", text)
    text = re.sub(own, "@Parley", text)
    text = re.sub(r"<@!?([0-9]{1,20})>", "@someone", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


@given(
    st.lists(
        st.sampled_from([" ", ",", ":", "\n", "\u2003", "x", f"<@{BOT}>", f"<@!{BOT}>", "<@9>"]),
        max_size=14,
    ).map("".join)
)
def test_mentions_of_the_bot_at_either_end_are_dropped_as_the_regexes_did(text: str) -> None:
    assert read(text) == _as_regexes_read_it(text)


def test_a_message_with_nothing_readable_was_withheld() -> None:
    assert content_withheld("", attachments=0, embeds=0, stickers=0, has_poll=False)
    assert not content_withheld("hi", attachments=0, embeds=0, stickers=0, has_poll=False)
    assert not content_withheld("", attachments=1, embeds=0, stickers=0, has_poll=False)


# --- the Stop button ------------------------------------------------------------------------


def test_a_stop_buttons_custom_id_names_the_cores_token_and_reads_back() -> None:
    turn = Turn(ConversationKey("discord", "1", "10", "10"), "7", "Alice", "hi", "1234567890123")
    token = stop_token(turn)
    custom_id = stop_custom_id(token)
    assert custom_id == "parley:stop:discord:1234567890123"
    assert len(custom_id) <= 100
    assert stop_token_of(custom_id) == token


@given(st.text(max_size=120))
def test_only_our_own_discord_stop_buttons_are_read(custom_id: str) -> None:
    token = stop_token_of(custom_id)
    assert token is None or (
        custom_id == "parley:stop:" + token
        and token.startswith("discord:")
        and token.removeprefix("discord:").isascii()
        and token.removeprefix("discord:").isdigit()
    )


def test_other_components_and_other_platforms_tokens_are_not_stop_buttons() -> None:
    assert stop_token_of("parley:stop:slack:Ev123") is None
    assert stop_token_of("parley:stop:discord:") is None
    assert stop_token_of("parley:stop:") is None
    assert stop_token_of("something:else:discord:123") is None
    assert stop_token_of("parley:stop:discord:١٢٣") is None  # digits, but not a snowflake


def test_a_stop_custom_id_longer_than_discord_allows_or_naming_no_snowflake_is_not_read() -> None:
    assert stop_token_of("parley:stop:discord:" + "1" * 81) is None  # 101 characters
    assert stop_token_of("parley:stop:discord:0") is None
    assert stop_token_of("parley:stop:discord:" + str(2**64)) is None


def test_a_token_too_long_for_a_custom_id_is_refused() -> None:
    with pytest.raises(ValueError):
        stop_custom_id("discord:" + "9" * 100)


def test_rank_puts_exact_then_prefix_then_substring_then_close_spellings() -> None:
    names = ["qwen3:8b", "my-llama3:latest", "llama3.2:latest", "llama3", "lama3:1b", "gemma3"]
    assert rank_models("llama3", names) == [
        "llama3",
        "llama3.2:latest",
        "my-llama3:latest",
        "lama3:1b",
    ]


def test_rank_without_a_query_lists_the_catalog_in_order() -> None:
    assert rank_models("", ["b", "a", "c"]) == ["b", "a", "c"]


def test_rank_ignores_case() -> None:
    assert rank_models("QWEN", ["qwen3:8b"]) == ["qwen3:8b"]


@given(
    query=st.text(max_size=12),
    names=st.lists(st.text(min_size=1, max_size=30), max_size=80),
)
def test_rank_returns_at_most_25_distinct_catalog_names(query: str, names: list[str]) -> None:
    ranked = rank_models(query, names)
    assert len(ranked) <= 25
    assert len(set(ranked)) == len(ranked)
    assert set(ranked) <= set(names)
    if query.strip() and query.strip().lower() in {n.lower() for n in names}:
        assert ranked[0].lower() == query.strip().lower()
