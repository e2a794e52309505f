"""The text Parley handles: cleaned once where it comes in, and the Markdown a reply is written
in — code fences, clean splits at a message's length limit, and what a message shows in each
phase of a reply. Pure functions, tested directly."""

from __future__ import annotations

import re

PLACEHOLDER = "…"
THINKING = "💭 _Thinking…_"
CURSOR = " ▍"
EMPTY_ANSWER = "_The model returned an empty answer._"
STOPPED = "_⏹ Stopped._"
THINKING_SHOWN_AFTER = 5.0  # seconds of thinking before the placeholder counts them


def thinking_for(seconds: float) -> str:
    """The thinking placeholder once the model has reasoned a while: how long, in whole
    seconds (minutes past two)."""
    whole = int(seconds)
    shown = f"{whole} s" if whole < 120 else f"{whole // 60} min"
    return f"💭 _Thinking… ({shown})_"


def queued(ahead: int) -> str:
    """A reply waiting for a place at its model's backend, and how many go first."""
    if ahead <= 0:
        return "⏳ Waiting for the model — you're next"
    return f"⏳ Waiting for the model — {ahead} ahead of you"


def cut_short(tokens: int | None) -> str:
    """The line a reply ends with when it stopped at its length cap."""
    cap = f" of {tokens:,} tokens" if tokens else ""
    return f"✂️ _Cut short at the reply limit{cap}. Say “continue” for the rest._"


# NUL and the other C0/C1 control characters but tab and line feed; and lone surrogates, which
# JSON can carry (`"\ud800"`) but no UTF-8 encoder takes
_UNCLEAN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_CUTS: tuple[tuple[str, float], ...] = (
    ("\n\n", 0.5),  # paragraph
    ("\n", 0.5),  # line
    (". ", 0.3),  # sentence
    ("! ", 0.3),
    ("? ", 0.3),
    (" ", 0.3),  # word
)


# --- pure text functions ------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Text every encoder takes and every screen shows as meant: a lone surrogate becomes U+FFFD,
    CR LF becomes LF, NUL and other control characters go (tabs and line breaks stay)."""
    if _UNCLEAN.search(text) is None:
        return text
    text = text.replace("\r\n", "\n")
    return _UNCLEAN.sub(lambda m: "\ufffd" if m[0] >= "\ud800" else "", text)


def open_fence(text: str) -> str | None:
    """The opening line of a code fence still open at the end of `text`, else None."""
    opener: tuple[str, str] | None = None
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if not match:
            continue
        run, info = match[1], match[2].strip()
        if opener is None:
            if run[0] != "`" or "`" not in info:  # a backtick fence's info has no backtick
                opener = (run, info)
        elif run[0] == opener[0][0] and len(run) >= len(opener[0]) and not info:
            opener = None
    if opener is None:
        return None
    language = opener[1].split()[0][:20] if opener[1].split() else ""
    return opener[0] + language


def fence_closer(opening: str) -> str:
    return re.match(r"`+|~+", opening)[0]  # type: ignore[index]


def _best_cut(window: str) -> int:
    for sep, min_fraction in _CUTS:
        pos = window.rfind(sep)
        if pos > 0 and pos >= len(window) * min_fraction:
            return pos + len(sep)
    return len(window)


def split_first(text: str, limit: int) -> tuple[str, str]:
    """Split `text` into a first message of at most `limit` chars and the rest.

    Cuts at a paragraph, line, sentence, then word boundary; a code fence open at the cut is
    closed at the end of the first part and reopened at the start of the rest.
    """
    if len(text) <= limit:
        return text, ""
    if limit < 40:
        raise ValueError("limit too small to split cleanly")
    room = limit - 8  # "\n" + a closing fence
    while True:
        head, tail = _cut(text, room)
        if len(head) <= limit:
            return head, tail
        room -= len(head) - limit  # an unusually long fence closer: cut earlier


def _cut(text: str, room: int) -> tuple[str, str]:
    cut = _best_cut(text[:room])
    # never cut through a fence line itself: move the cut to that line's start
    line_start = text.rfind("\n", 0, cut) + 1
    line_end = text.find("\n", cut)
    line = text[line_start : line_end if line_end != -1 else len(text)]
    if line_start > 0 and cut > line_start and _FENCE.match(line):
        cut = line_start
    before = text[:cut].strip()
    if not before or ("\n" not in before and _FENCE.match(before)):
        # nothing before the cut but whitespace or a fence's opening line: hard cut instead
        cut = room
        line_start = text.rfind("\n", 0, cut) + 1
    # a cut inside a line must not start the next message with something that reads as a fence
    # (up to three spaces, then ``` or ~~~): move it back, to the line's start if need be
    moved = cut
    while moved > line_start and text[moved] in "`~ ":
        moved -= 1
    if moved > 0:  # not back to the very start: a fence line longer than a message stays cut
        cut = moved
    head, tail = text[:cut].rstrip(), text[cut:].lstrip("\n")
    if (shown := open_fence(head)) is not None:
        head = head + "\n" + fence_closer(shown)
    # reopen only a fence the text really has open (judged on whole lines), and only when that
    # still makes progress (a pathological fence line longer than a message is left alone)
    line_end = text.find("\n", cut)
    line_end = len(text) if line_end == -1 else line_end
    inside_fence_line = cut > line_start and _FENCE.match(text[line_start:line_end]) is not None
    real = open_fence(text[: line_end if inside_fence_line else line_start])
    if real is not None and len(real) + 1 + len(tail) < len(text):
        tail = real + "\n" + tail
    return head, tail


def split_message(text: str, limit: int) -> list[str]:
    """All the messages `text` becomes at `limit` chars each (what streaming produces too)."""
    pages: list[str] = []
    rest = text
    while len(rest) > limit:
        page, rest = split_first(rest, limit)
        pages.append(page)
    pages.append(rest)
    return [p for p in pages if p.strip()] or [""]


def in_progress(text: str) -> str:
    """What a reply looks like while it streams: open fences closed, a cursor at the end."""
    fence = open_fence(text)
    shown = text + ("\n" + fence_closer(fence) if fence else "")
    return shown + CURSOR
