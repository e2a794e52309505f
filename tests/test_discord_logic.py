"""Discord decisions without I/O: conversation keys, what the model reads, who may do what."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.discord_logic import (
    MODEL_SWITCH_ADMINS,
    Access,
    Place,
    content_withheld,
    conversation_key,
    may_switch_model,
    may_use,
    model_switch_refusal,
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


def test_a_message_with_nothing_readable_was_withheld() -> None:
    assert content_withheld("", attachments=0, embeds=0, stickers=0, has_poll=False)
    assert not content_withheld("hi", attachments=0, embeds=0, stickers=0, has_poll=False)
    assert not content_withheld("", attachments=1, embeds=0, stickers=0, has_poll=False)


# --- who may do what ------------------------------------------------------------------------


def test_without_allowlists_everyone_may_use_the_bot_everywhere() -> None:
    for place in (IN_CHANNEL, IN_THREAD, IN_DM):
        assert may_use(Access(), place, user_id=7, role_ids=[])


def test_user_and_role_allowlists_admit_listed_people_or_role_holders() -> None:
    access = Access(users=frozenset({7}), roles=frozenset({70}))
    assert may_use(access, IN_CHANNEL, user_id=7, role_ids=[])
    assert may_use(access, IN_CHANNEL, user_id=8, role_ids=[70])
    assert not may_use(access, IN_CHANNEL, user_id=8, role_ids=[71])


def test_channel_allowlist_covers_threads_of_listed_channels() -> None:
    access = Access(channels=frozenset({CHANNEL}))
    assert may_use(access, IN_THREAD, user_id=7, role_ids=[])
    assert not may_use(access, Place(GUILD, 11), user_id=7, role_ids=[])


def test_guild_allowlist_excludes_other_guilds() -> None:
    access = Access(guilds=frozenset({GUILD}))
    assert may_use(access, IN_CHANNEL, user_id=7, role_ids=[])
    assert not may_use(access, Place(2, CHANNEL), user_id=7, role_ids=[])


def test_dms_with_where_allowlists_are_for_listed_users_only() -> None:
    assert not may_use(Access(guilds=frozenset({GUILD})), IN_DM, user_id=7, role_ids=[])
    listed = Access(guilds=frozenset({GUILD}), users=frozenset({7}))
    assert may_use(listed, IN_DM, user_id=7, role_ids=[])


def test_model_switching_is_open_unless_restricted() -> None:
    assert may_switch_model(Access(), IN_CHANNEL, is_admin=False, role_ids=[])


def test_admin_only_model_switching() -> None:
    access = Access(model_admin_only=True, model_role=70)
    assert may_switch_model(access, IN_CHANNEL, is_admin=True, role_ids=[])
    assert not may_switch_model(access, IN_CHANNEL, is_admin=False, role_ids=[70])
    assert model_switch_refusal(access) == MODEL_SWITCH_ADMINS


def test_model_role_or_administrators_may_switch() -> None:
    access = Access(model_role=70)
    assert may_switch_model(access, IN_THREAD, is_admin=False, role_ids=[70])
    assert may_switch_model(access, IN_THREAD, is_admin=True, role_ids=[])
    assert not may_switch_model(access, IN_THREAD, is_admin=False, role_ids=[71])
    assert "<@&70>" in model_switch_refusal(access)


def test_a_dms_model_is_its_users_own_choice() -> None:
    assert may_switch_model(Access(model_admin_only=True), IN_DM, is_admin=False, role_ids=[])


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
