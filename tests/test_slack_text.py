"""Slack text both ways: what the model reads, and what Slack may show without pinging anyone."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.slack_text import (
    JOINER,
    classify,
    from_bot,
    mentioned_user_ids,
    neutralise,
    settled,
    to_model_text,
)
from tests.support import BROADCASTS, could_ping

BOT = "U0PARLEY"
NAMES = {"U0BOB": "Bob Builder", "U0ALICE": "Alice"}


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


J = "@" + JOINER  # how every neutralised ping starts

# Each form Slack treats, or may treat, as a ping (docs/slack.md), and what Parley shows instead.
DOCUMENTED = [
    ("<!here>", f"{J}here"),
    ("<!channel>", f"{J}channel"),
    ("<!everyone>", f"{J}everyone"),
    ("<!here|here>", f"{J}here"),
    ("<!channel|Channel>", f"{J}Channel"),
    ("<!group>", f"{J}group"),
    ("<!subteam^S0DEV>", f"{J}group"),
    ("<!subteam^S0DEV|@devs>", f"{J}devs"),
    ("<@U0BOB>", f"{J}Bob Builder"),
    ("<@U0ZED|zed>", f"{J}zed"),
    ("<@W0GRID>", f"{J}W0GRID"),
    ("@here", f"{J}here"),
    ("@channel", f"{J}channel"),
    ("@everyone", f"{J}everyone"),
    ("&lt;!here&gt;", f"{J}here"),  # Slack's own escape: text in mrkdwn, unknown in Markdown
]
ASSUMED = [
    ("< !here >", f"{J}here"),
    ("<!here\n>", f"{J}here"),
    ("<\n!channel\n>", f"{J}channel"),
    ("<! everyone>", f"{J}everyone"),
    ("<!\there |x>", f"{J}x"),
    ("<!HERE>", f"{J}here"),
    ("<!Channel>", f"{J}channel"),
    ("<!here|>", f"{J}here"),
    ("<!here please>", f"{J}here"),
    ("<!subteam ^S0DEV|devs>", f"{J}devs"),
    ("< @U0BOB >", f"{J}Bob Builder"),
    ("<@u0bob>", f"{J}Bob Builder"),
    ("<@U0BOB|>", f"{J}Bob Builder"),
    ("<@alice>", f"{J}alice"),
    ("@HERE", f"{J}HERE"),
    ("@Channel", f"{J}Channel"),
    ("@group", f"{J}group"),
    ("@here_", f"{J}here_"),
    ("@everyone.", f"{J}everyone."),
    ("&amp;lt;!here&amp;gt;", f"{J}here"),
    ("&#60;!channel&#62;", f"{J}channel"),
    ("&#x3C;@U0BOB&#x3e;", f"{J}Bob Builder"),
    ("&LT;!everyone&GT;", f"{J}everyone"),
    ("&lt!here&gt", f"{J}here"),
    ("<&excl;here>", f"{J}here"),
    ("<!&#104;ere>", f"{J}here"),
    ("&commat;channel", f"{J}channel"),
    ("&#64;everyone", f"{J}everyone"),
    ("<!channel|@here>", f"{J}here"),
    ("<!channel|<!here>>", f"{J}<{JOINER}!here>"),  # the label, its `<` made inert
]


@pytest.mark.parametrize(
    ("form", "shown"), DOCUMENTED + ASSUMED, ids=[f for f, _ in DOCUMENTED + ASSUMED]
)
def test_each_form_slack_may_read_as_a_ping_is_shown_inert(form: str, shown: str) -> None:
    assert could_ping(form), "the checker must know the form"
    safe = neutralise(f"Hey {form} look", names=NAMES)
    assert could_ping(safe) == []
    assert safe == f"Hey {shown} look"


def test_a_ping_stays_inert_inside_the_text_around_it() -> None:
    text = "Hey <!channel> and <!here|here>, <!everyone>! Ping <!subteam^S0DEV|@devs> <!group>."
    assert neutralise(text) == f"Hey {J}channel and {J}here, {J}everyone! Ping {J}devs {J}group."
    assert neutralise("@here: read this, @Channel and @everyone") == (
        f"{J}here: read this, {J}Channel and {J}everyone"
    )


@pytest.mark.parametrize(
    "text",
    [
        "Use `a < b` and <https://x.y|links>; email bob@example.com; #general; <#C1>.",
        "if (x < !y && z > 2) { return; }",
        "List<@NonNull String> and f <@> x",
        "<!date^1392734382^{date_short}|Feb 18, 2014>",
        "see youtube.com/@channelname and @heres, @everyones, @grouping",
        "a &lt; b &amp;&amp; c &gt; d; R&D; &copy; 2026",
        "<mailto:bob@example.com|bob> in <#C024BE7LR|general>",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert neutralise(text, names=NAMES) == text


def escaped(char: str) -> st.SearchStrategy[str]:
    """`char` itself or as a character reference, and that perhaps escaped again."""
    named = {"<": ["lt", "LT"], ">": ["gt", "GT"], "!": ["excl"], "@": ["commat"], "|": ["vert"]}
    code = ord(char)
    forms = [char, f"&#{code};", f"&#x{code:x};", f"&#X{code:X};", f"&#{code}"]
    forms += [f"&{name};" for name in named.get(char, [])]
    return st.sampled_from(forms).flatmap(
        lambda form: st.sampled_from([form, form.replace("&", "&amp;", 1)])
    )


def any_case(word: str) -> st.SearchStrategy[str]:
    flips = st.lists(st.booleans(), min_size=len(word), max_size=len(word))
    return flips.map(
        lambda up: "".join(c.upper() if u else c for c, u in zip(word, up, strict=True))
    )


space = st.sampled_from(["", "", " ", "\n", "\t", " \n ", "\u00a0"])
words = ["here", "channel", "everyone", "group", "subteam^S0DEV", "U0BOB", "w0grid", "alice", "x"]
control = st.tuples(
    escaped("<"),
    space,
    st.one_of(escaped("!"), escaped("@")),
    space,
    st.sampled_from(words).flatmap(any_case),
    space,
    st.one_of(
        st.just(""),
        st.tuples(
            escaped("|"), st.sampled_from(["", "here", "@devs", "x @her", "a&amp;b", "&"])
        ).map("".join),
    ),
    space,
    escaped(">"),
).map("".join)
literal = st.tuples(
    escaped("@"),
    st.sampled_from(BROADCASTS).flatmap(any_case),
    st.sampled_from(["", " ", ".", "_", "s", "!", "-", "\n"]),
).map("".join)
noise = st.one_of(
    st.sampled_from(["<", ">", "@", "&", "&lt;", "&gt;", "&amp;", "|", "!", "here", "`a < b`"]),
    st.text(alphabet="ab@<>!&;|^#xUW0 \n", max_size=8),
)
pingy = st.lists(st.one_of(control, literal, noise), max_size=25).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=pingy)
def test_neutralised_text_never_pings(text: str) -> None:
    assert could_ping(neutralise(text, names=NAMES)) == []


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_characters="<@&")))
def test_text_without_markup_is_shown_as_written(text: str) -> None:
    assert neutralise(text) == text


@settings(max_examples=500, deadline=None)
@given(text=pingy, cut=st.integers(min_value=0, max_value=600))
def test_a_settled_prefix_stays_a_prefix_of_the_neutralised_whole(text: str, cut: int) -> None:
    """Native streaming appends only: what was sent must never need taking back."""
    sent = neutralise(settled(text[:cut]), names=NAMES)
    assert neutralise(text, names=NAMES).startswith(sent)


@pytest.mark.parametrize(
    ("growing", "sent"),
    [
        ("Hello <!her", "Hello"),
        ("Hello < !here\n", "Hello"),
        ("Tell @ever", "Tell"),
        ("Tell &commat;ever", "Tell"),
        ("a &l", "a"),
        ("a &lt;!here", "a"),
        ("a &amp;l", "a"),  # `&amp;lt;` is `<` once decoded twice
        ("a &#6", "a"),  # `&#60;`
        ("a &#38;", "a"),  # `&` as a reference, which `lt;` would complete
        ("done. \n\n", "done."),
        ("<@U0BOB> ok", "<@U0BOB> ok"),
        ("a <<<<<<<<", "a"),
    ],
)
def test_settled_holds_back_what_the_next_token_may_complete(growing: str, sent: str) -> None:
    assert settled(growing) == sent


def test_hostile_runs_cost_little() -> None:
    """A reply is neutralised and settled on every edit, on the event loop: long runs of markup
    must not cost time growing with the square of their length (seconds at 12,000 characters)."""
    for hostile in (
        "<" * 12_000,
        "@ " * 6_000,
        "&#33;" * 2_400,
        "&amp;" * 2_400,
        "<!here|" * 1_700,
    ):
        started = time.perf_counter()
        safe, held = neutralise(hostile), settled(hostile)
        assert time.perf_counter() - started < 1.0, hostile[:10]
        assert could_ping(safe) == [] and held == ""


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


def test_ourselves_and_edits_never_trigger() -> None:
    assert classify(message(user=BOT, channel_type="im"), bot_user_id=BOT) is None
    ours = message(user="", bot_id="B0PARLEY", subtype="bot_message", channel_type="im")
    assert classify(ours, bot_user_id=BOT, bot_id="B0PARLEY") is None
    changed = message(
        subtype="message_changed",
        channel_type="im",
        message={"user": "U0ALICE", "text": f"<@{BOT}> edited"},
    )
    assert classify(changed, bot_user_id=BOT) is None
    assert classify(message(subtype="message_deleted", thread_ts="1.0"), bot_user_id=BOT) is None


def test_other_bots_may_trigger_and_say_so_for_the_core_to_decide() -> None:
    other = message(bot_id="B0OTHER", text=f"<@{BOT}> hi")
    assert classify(other, bot_user_id=BOT) == "mention" and from_bot(other)
    legacy = message(user="", bot_id="B0OTHER", subtype="bot_message", channel_type="im")
    assert classify(legacy, bot_user_id=BOT) == "dm" and from_bot(legacy)
    assert not from_bot(message(text="a person"))
