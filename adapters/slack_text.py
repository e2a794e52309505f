"""Slack text both ways: what the model reads from a message, and what Slack may show of a reply.

Incoming, Slack writes people, channels and links as `<…>` control sequences and escapes `&`,
`<`, `>`; the model gets readable text instead, without the bot's own mention. Outgoing, nothing
the model writes may ping anyone: broadcasts (`<!here>`, `@channel`…), user-group and user
mentions are turned into inert look-alikes on every post and edit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

# `<@U123>` / `<@U123|name>` (W… ids are Enterprise Grid users)
USER_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|([^>]*))?>")
_CONTROL = re.compile(r"<([^<>]*)>")
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?])")

# U+2060 WORD JOINER: invisible, keeps the word whole, and breaks Slack's mention parsing.
JOINER = "\u2060"
# Output: special mentions, raw or entity-escaped, with an optional `|label`.
_OUT_SPECIAL = re.compile(
    r"(?:<|&lt;)!(here|channel|everyone|group|subteam\^[A-Z0-9]+)(?:\|([^>]*?))?(?:>|&gt;)",
    re.IGNORECASE,
)
_OUT_USER = re.compile(r"(?:<|&lt;)@([UW][A-Z0-9]+)(?:\|([^>]*?))?(?:>|&gt;)", re.IGNORECASE)
# Output: the literal forms, which Slack may turn into broadcasts (link_names, Markdown).
_OUT_LITERAL = re.compile(r"@(here|channel|everyone)\b", re.IGNORECASE)
# the unfinished ends of a growing text that later text may turn into a mention
_UNFINISHED = re.compile(r"(?:@\w*|&(?:l|lt)?)$")

Trigger = Literal["mention", "dm", "thread"]


def mentioned_user_ids(text: str) -> set[str]:
    """User ids mentioned in a message (to look up their display names)."""
    return {m[1] for m in USER_MENTION.finditer(text)}


def _unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def to_model_text(text: str, *, bot_user_id: str, names: Mapping[str, str]) -> str:
    """A Slack message as the model should read it.

    The bot's own mention is dropped; other people become `@Display Name`; channels `#name`;
    links `[label](url)` or the bare URL; special mentions `@here`; entities are unescaped.
    """

    def control(match: re.Match[str]) -> str:
        inner = match[1]
        target, _, label = inner.partition("|")
        if target.startswith("@"):
            user = target[1:]
            if user == bot_user_id:
                return " "
            return "@" + (names.get(user) or label or user)
        if target.startswith("#"):
            return "#" + (label or target[1:])
        if target.startswith("!"):
            command = target[1:]
            if command.startswith("subteam^"):
                return label if label.startswith("@") else "@" + (label or "group")
            if command.startswith("date^"):
                return label
            return "@" + command.split("^")[0]
        if label and label != target and label != target.removeprefix("mailto:"):
            return f"[{_unescape(label)}]({_unescape(target)})"
        return _unescape(target.removeprefix("mailto:"))

    readable = _CONTROL.sub(control, text)
    readable = _unescape(readable)
    readable = _SPACES.sub(" ", readable)
    readable = _SPACE_BEFORE_PUNCT.sub(r"\1", readable)
    readable = "\n".join(line.strip() for line in readable.split("\n"))
    return readable.strip().lstrip(",:").strip()


def neutralise(text: str, *, names: Mapping[str, str] | None = None) -> str:
    """Model output Slack can show without pinging anyone.

    `<!here>` / `<!channel>` / `<!everyone>` / `<!subteam^…>` and `<@U…>` become `@` + a word
    joiner + the name (looked up in `names` for users), so they read the same and notify nobody;
    so do the literal `@here` / `@channel` / `@everyone`.
    """
    known = names or {}

    def special(match: re.Match[str]) -> str:
        what, label = match[1].lower(), (match[2] or "").lstrip("@")
        if what.startswith("subteam^"):
            return "@" + JOINER + (label or "group")
        return "@" + JOINER + (label or what)

    def user(match: re.Match[str]) -> str:
        return "@" + JOINER + (known.get(match[1]) or (match[2] or "").lstrip("@") or match[1])

    while True:  # a label may hide another mention: repeat until nothing changes
        safe = _OUT_SPECIAL.sub(special, text)
        safe = _OUT_USER.sub(user, safe)
        safe = _OUT_LITERAL.sub(lambda m: "@" + JOINER + m[1], safe)
        if safe == text:
            return safe
        text = safe


def settled(text: str) -> str:
    """The part of a growing text that later text cannot turn into a mention.

    Native streaming only ever appends, so it holds back trailing whitespace, an unclosed `<…`
    and a trailing `@word` until the text after them decides what they are.
    """
    while True:
        before = text
        text = text.rstrip()
        opened = max(text.rfind("<"), text.rfind("&lt;"))
        if opened != -1 and ">" not in text[opened:] and "&gt;" not in text[opened:]:
            text = text[:opened]
        text = _UNFINISHED.sub("", text)
        if text == before:
            return text


def classify(event: Mapping[str, object], *, bot_user_id: str) -> Trigger | None:
    """Why a message event might need an answer, or None when it never does.

    "mention": the bot is mentioned (also seen as `app_mention`); "dm": a direct message;
    "thread": a reply in a thread, answered only if the bot is already part of it. Bots
    (ourselves included), edits, deletions and other subtypes never trigger anything.
    """
    if event.get("subtype") not in (None, "file_share", "thread_broadcast"):
        return None
    if event.get("bot_id") or event.get("bot_profile") or not event.get("user"):
        return None
    if event.get("user") == bot_user_id:
        return None
    if event.get("channel_type") == "im":
        return "dm"
    text = str(event.get("text") or "")
    if event.get("type") == "app_mention" or (bot_user_id and f"<@{bot_user_id}" in text):
        return "mention"
    thread_ts, ts = event.get("thread_ts"), event.get("ts")
    if thread_ts and thread_ts != ts:
        return "thread"
    return None
