"""Slack text both ways: what the model reads, and what Slack may show without pinging anyone."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.slack_text import (
    JOINER,
    classify,
    mentioned_user_ids,
    neutralise,
    settled,
    to_model_text,
)

BOT = "U0PARLEY"
NAMES = {"U0BOB": "Bob Builder", "U0ALICE": "Alice"}

# What Slack would turn into a notification: complete special or user mentions, and the
# literal broadcast words (markdown_text's handling of those is undocumented).
PINGS = re.compile(
    r"<!(?:here|channel|everyone|group|subteam\^\w+)(?:\|[^>]*)?>"
    r"|&lt;!(?:here|channel|everyone|group|subteam\^\w+)(?:\|.*?)?&gt;"
    r"|<@[UW]\w+(?:\|[^>]*)?>"
    r"|&lt;@[UW]\w+(?:\|.*?)?&gt;"
    r"|@(?:here|channel|everyone)\b",
    re.IGNORECASE,
)


# --- incoming -------------------------------------------------------------------------------


def test_the_bots_mention_is_stripped() -> None:
    assert to_model_text(f"<@{BOT}> what is Redis?", bot_user_id=BOT, names={}) == (
        "what is Redis?"
    )
    assert to_model_text(f"<@{BOT}>: model qwen3:8b", bot_user_id=BOT, names={}) == (
        "model qwen3:8b"
    )
    assert to_model_text(f"hey <@{BOT}>, explain this", bot_user_id=BOT, names={}) == (
        "hey, explain this"
    )


def test_people_become_display_names_for_the_model() -> None:
    text = f"<@{BOT}> say hi to <@U0BOB> and <@U0CAROL|carol>"
    assert to_model_text(text, bot_user_id=BOT, names=NAMES) == (
        "say hi to @Bob Builder and @carol"
    )
    assert mentioned_user_ids(text) == {BOT, "U0BOB", "U0CAROL"}


def test_slack_markup_becomes_readable_text() -> None:
    text = (
        "see <#C024BE7LR|general>, <https://example.com/a?b=1&amp;c=2|the docs> and "
        "<https://example.com>; mail <mailto:bob@example.com|bob@example.com>; "
        "if a &lt; b &amp;&amp; c &gt; d; <!here> <!subteam^S0DEV|@devs> "
        "<!date^1392734382^{date}|Feb 18, 2014>"
    )
    assert to_model_text(text, bot_user_id=BOT, names={}) == (
        "see #general, [the docs](https://example.com/a?b=1&c=2) and https://example.com; "
        "mail bob@example.com; if a < b && c > d; @here @devs Feb 18, 2014"
    )


def test_multiline_messages_keep_their_lines() -> None:
    text = f"<@{BOT}> fix this:\n```\nx = 1\n```"
    assert to_model_text(text, bot_user_id=BOT, names={}) == "fix this:\n```\nx = 1\n```"


# --- outgoing -------------------------------------------------------------------------------


def test_broadcasts_and_group_pings_are_neutralised() -> None:
    text = "Hey <!channel> and <!here|here>, <!everyone>! Ping <!subteam^S0DEV|@devs> <!group>."
    safe = neutralise(text)
    assert PINGS.search(safe) is None
    assert safe == (
        f"Hey @{JOINER}channel and @{JOINER}here, @{JOINER}everyone! "
        f"Ping @{JOINER}devs @{JOINER}group."
    )


def test_literal_broadcast_words_are_neutralised() -> None:
    safe = neutralise("@here: read this, @Channel and @everyone")
    assert PINGS.search(safe) is None
    assert safe.replace(JOINER, "") == "@here: read this, @Channel and @everyone"


def test_invented_user_pings_become_names() -> None:
    safe = neutralise("Ask <@U0BOB> or <@U0ZED|zed> or <@W0GRID>", names=NAMES)
    assert safe == f"Ask @{JOINER}Bob Builder or @{JOINER}zed or @{JOINER}W0GRID"


def test_entity_escaped_pings_are_neutralised_too() -> None:
    safe = neutralise("&lt;!channel&gt; &lt;@U0BOB&gt; <!here|a&amp;b>")
    assert PINGS.search(safe) is None


def test_ordinary_text_is_left_alone() -> None:
    text = "Use `a < b` and <https://x.y|links>; email bob@example.com; #general; <#C1>."
    assert neutralise(text) == text


pingy = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "<!here>",
                "<!channel|channel>",
                "<!everyone>",
                "<!subteam^S01|@devs>",
                "<@U0BOB>",
                "<@W0X|x>",
                "@here",
                "@channel",
                "@everyone",
                "&lt;!here&gt;",
                "<",
                ">",
                "@",
                "&",
                "&lt;",
                "&gt;",
                "|",
                "!",
                "here",
                " ",
                "\n",
            ]
        ),
        st.text(alphabet="ab@<>!&;|^US0 \n", max_size=12),
    ),
    max_size=30,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=pingy)
def test_neutralised_text_never_pings(text: str) -> None:
    assert PINGS.search(neutralise(text, names=NAMES)) is None


@settings(max_examples=200, deadline=None)
@given(text=pingy, cut=st.integers(min_value=0, max_value=400))
def test_a_settled_prefix_stays_a_prefix_of_the_neutralised_whole(text: str, cut: int) -> None:
    """Native streaming appends only: what was sent must never need taking back."""
    sent = neutralise(settled(text[:cut]), names=NAMES)
    assert neutralise(text, names=NAMES).startswith(sent)


def test_settled_holds_back_what_the_next_token_may_complete() -> None:
    assert settled("Hello <!her") == "Hello"
    assert settled("Tell @ever") == "Tell"
    assert settled("a &l") == "a"
    assert settled("a &lt;!here") == "a"
    assert settled("done. \n\n") == "done."
    assert settled("<@U0BOB> ok") == "<@U0BOB> ok"


# --- which events need an answer ------------------------------------------------------------


def message(**fields: object) -> dict[str, object]:
    return {"type": "message", "user": "U0ALICE", "text": "hi", "ts": "2.0", **fields}


def test_mentions_dms_and_thread_replies_are_candidates() -> None:
    assert classify({**message(), "type": "app_mention"}, bot_user_id=BOT) == "mention"
    assert classify(message(text=f"<@{BOT}> hi"), bot_user_id=BOT) == "mention"
    assert classify(message(channel_type="im"), bot_user_id=BOT) == "dm"
    assert classify(message(thread_ts="1.0"), bot_user_id=BOT) == "thread"


def test_top_level_channel_chatter_is_not() -> None:
    assert classify(message(channel_type="channel"), bot_user_id=BOT) is None
    assert classify(message(thread_ts="2.0"), bot_user_id=BOT) is None  # a thread's parent


def test_bots_ourselves_and_edits_never_trigger() -> None:
    assert classify(message(bot_id="B0OTHER", text=f"<@{BOT}>"), bot_user_id=BOT) is None
    assert classify(message(user=BOT, channel_type="im"), bot_user_id=BOT) is None
    assert classify(message(subtype="bot_message", channel_type="im"), bot_user_id=BOT) is None
    changed = message(
        subtype="message_changed",
        channel_type="im",
        message={"user": "U0ALICE", "text": f"<@{BOT}> edited"},
    )
    assert classify(changed, bot_user_id=BOT) is None
    assert classify(message(subtype="message_deleted", thread_ts="1.0"), bot_user_id=BOT) is None
