"""Slack text both ways: what the model reads from a message, and what Slack may show of a reply.

Incoming, Slack writes people, channels and links as `<…>` control sequences and escapes `&`,
`<`, `>`; the model gets readable text instead, without the bot's own mention. Outgoing, nothing
the model writes may ping anyone: broadcasts (`<!here>`, `@channel`…), user-group and user
mentions, in any case, spacing or character references, are turned into inert look-alikes on
every post and edit.
"""

from __future__ import annotations

import html
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
# A character reference as HTML (and so Markdown) decodes it: named, decimal or hex, `;` optional.
_REFERENCE = re.compile(r"&(?:#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
# Output: whatever Slack could read as a ping (docs/slack.md, "What Parley never lets the model
# ping"), looked for once references are decoded, in any case, with any whitespace inside the
# brackets: `<!here>` `<!channel>` `<!everyone>` `<!group>` (with anything after the word, such as
# `|label`), `<!subteam^ID|label>`, `<@U…>` / `<@W…>` and the undocumented `<@name>`, and the
# words `@here` `@channel` `@everyone` `@group` (which link_names and Markdown may turn into pings).
_PING = re.compile(
    r"<\s*!\s*(?:(?P<special>here|channel|everyone|group)(?![^\W_])|(?P<group>subteam))"
    r"(?P<rest>[^>]*)>"
    r"|<\s*@\s*(?P<user>[UW][^|>]*|[\w.-]+\s*)(?P<label>\|[^>]*)?>"
    r"|@(?=(?:here|channel|everyone|group)(?![^\W_]))",
    re.IGNORECASE,
)
# the end of a growing text that later text may still turn into a reference or a mention:
# whitespace, `@word`s and the starts of references, as one run so that one step removes them
_UNFINISHED = re.compile(r"(?:\s|@\w*|&[^\s<&;]*;?)+$")

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


def _decoded(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` with its character references decoded until none is left (`&amp;lt;` is `<`, as
    repeated `html.unescape` would have it), and for each decoded character the span of `text`
    it comes from."""
    chars, spans = list(text), [(i, i + 1) for i in range(len(text))]
    while True:
        flat = "".join(chars)
        next_chars: list[str] = []
        next_spans: list[tuple[int, int]] = []
        done = 0
        for ref in _REFERENCE.finditer(flat):
            value = html.unescape(ref[0])
            if value == ref[0]:
                continue
            next_chars += chars[done : ref.start()] + list(value)
            whole = (spans[ref.start()][0], spans[ref.end() - 1][1])
            next_spans += spans[done : ref.start()] + [whole] * len(value)
            done = ref.end()
        if not done:
            return flat, spans
        chars, spans = next_chars + chars[done:], next_spans + spans[done:]


def neutralise(text: str, *, names: Mapping[str, str] | None = None) -> str:
    """Model output Slack can show without pinging anyone.

    Broadcasts (`<!here>` / `<!channel>` / `<!everyone>` / `<!group>`), user groups
    (`<!subteam^…>`) and people (`<@U…>`) become `@` + a word joiner + the name (looked up in
    `names` for people), so they read the same and notify nobody; so do the words `@here` /
    `@channel` / `@everyone` / `@group`. Any case, whitespace or newlines inside the brackets and
    any character references (`&lt;!here&gt;`, `&#60;@U1&#62;`) count the same.
    """
    while (safe := _neutralised_once(text, names or {})) != text:  # labels may hide more
        text = safe
    return safe


def _neutralised_once(text: str, known: Mapping[str, str]) -> str:
    """One pass of neutralise(): every ping found in the decoded text, rewritten in `text`."""
    decoded, spans = _decoded(text)

    def raw(begin: int, end: int) -> str:
        """The text behind decoded characters `begin` to `end`, or those characters themselves
        where a reference reaches past them (`&lt@a>` is `<@a>` all in one)."""
        if end <= begin:
            return ""
        if spans[begin] in spans[begin - 1 : begin] or spans[end - 1] in spans[end : end + 1]:
            return decoded[begin:end]
        return text[spans[begin][0] : spans[end - 1][1]]

    def shown(what: str) -> str:
        """`what` (a label, a name) made inert, and sealed so that no text after it completes
        it into a mention: a word joiner after each `<`, `@`, `&` of its unfinished end."""
        safe = neutralise(what.strip(), names=known)
        done = settled(safe)
        return done + re.sub("[<@&]", lambda sigil: sigil[0] + JOINER, safe[len(done) :])

    edits: list[tuple[int, int, str]] = []
    for ping in _PING.finditer(decoded):
        if ping["user"]:
            user = ping["user"].strip()
            label = raw(ping.start("label") + 1, ping.end("label")) if ping["label"] else ""
            name = known.get(user) or known.get(user.upper()) or label.strip().lstrip("@")
            inert = "@" + JOINER + shown(name or raw(*ping.span("user")))
        elif ping["special"] or ping["group"]:
            bar = decoded.find("|", *ping.span("rest"))
            label = raw(bar + 1, ping.end("rest")).strip().lstrip("@") if bar != -1 else ""
            word = ping["special"].lower() if ping["special"] else "group"
            inert = "@" + JOINER + shown(label or word)
        else:
            inert = "@" + JOINER
        # a reference standing for several characters may reach past the match: keep them
        first, last = _piece(spans, ping.start()), _piece(spans, ping.end() - 1)
        begin, end = spans[first.start][0], spans[last.stop - 1][1]
        inert = decoded[first.start : ping.start()] + inert + decoded[ping.end() : last.stop]
        if not edits or begin >= edits[-1][1]:  # overlaps are left to the next round
            edits.append((begin, end, inert))
    for begin, end, inert in reversed(edits):
        text = text[:begin] + inert + text[end:]
    return text


def _piece(spans: list[tuple[int, int]], at: int) -> range:
    """The decoded characters that come from the same piece of text as character `at`."""
    first = last = at
    while first and spans[first - 1] == spans[at]:
        first -= 1
    while last + 1 < len(spans) and spans[last + 1] == spans[at]:
        last += 1
    return range(first, last + 1)


def settled(text: str) -> str:
    """The part of a growing text that later text cannot turn into a mention.

    Native streaming only ever appends, so it holds back trailing whitespace, an unclosed `<…`,
    a trailing `@word` and a trailing character reference (`&am`, `&amp;`, `&#6`) until the text
    after them decides what they are.
    """
    while True:
        decoded, spans = _decoded(text)
        keep = len(decoded)  # decoded characters that stay
        while True:  # each step removes a whole run, so hostile text costs no more than a few
            before = keep
            while keep and spans[keep - 1][1] - spans[keep - 1][0] > 1:
                keep -= 1  # a reference: more text may extend it (`&#6` → `&#60;`)
            opened = decoded.find("<", decoded.rfind(">", 0, keep) + 1, keep)
            if opened != -1:
                keep = opened
            elif unfinished := _UNFINISHED.search(decoded, 0, keep):
                keep = unfinished.start()
            if keep == before:
                break
        kept = text[: spans[keep - 1][1]] if keep else ""
        if kept == text:
            return text
        text = kept


def classify(event: Mapping[str, object], *, bot_user_id: str, bot_id: str = "") -> Trigger | None:
    """Why a message event might need an answer, or None when it never does.

    "mention": the bot is mentioned (also seen as `app_mention`); "dm": a direct message;
    "thread": a reply in a thread, answered only if the bot is already part of it. Our own
    messages, edits, deletions and other subtypes never trigger anything; other bots' messages
    may (`from_bot`: the core answers them only when the operator allows it).
    """
    if event.get("subtype") not in (None, "file_share", "thread_broadcast", "bot_message"):
        return None
    if not (event.get("user") or event.get("bot_id")):
        return None
    if event.get("user") == bot_user_id or (bot_id and event.get("bot_id") == bot_id):
        return None  # our own
    if event.get("channel_type") == "im":
        return "dm"
    text = str(event.get("text") or "")
    if event.get("type") == "app_mention" or (bot_user_id and f"<@{bot_user_id}" in text):
        return "mention"
    thread_ts, ts = event.get("thread_ts"), event.get("ts")
    if thread_ts and thread_ts != ts:
        return "thread"
    return None


def from_bot(event: Mapping[str, object]) -> bool:
    """Another bot (or an app) wrote this message."""
    return bool(
        event.get("bot_id") or event.get("bot_profile") or event.get("subtype") == "bot_message"
    )
