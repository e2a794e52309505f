"""What the model is sent: system prompt, as much thread history as fits, the newest turn."""

from __future__ import annotations

from collections.abc import Mapping

from bot.backends.base import Image, Message
from bot.state import HistoryEntry

CHARS_PER_TOKEN = 4  # a rough, model-independent estimate; errs towards sending less
PER_MESSAGE_TOKENS = 4
IMAGE_TOKENS = 800  # what an image of ≤ 1,568 px costs a vision model, roughly


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + PER_MESSAGE_TOKENS


def speaker_content(entry: HistoryEntry, several_people: bool) -> str:
    """In a thread with several people the model sees who said what."""
    if entry.role == "user" and several_people and entry.user_name:
        return f"{entry.user_name}: {entry.content}"
    return entry.content


def build_messages(
    *,
    system: str,
    history: list[HistoryEntry],
    turn: HistoryEntry,
    budget_tokens: int,
    images: Mapping[str, Image] | None = None,
) -> list[Message]:
    """System prompt + the newest history that fits the budget + the new turn.

    The system prompt and the new turn are always kept; older entries go first, whole. With
    `images` (the thread's, by id; for a model that sees) each message carries its images, at
    IMAGE_TOKENS each; without, a model that cannot see gets the text alone.
    """
    people = {e.user_id or e.user_name for e in [*history, turn] if e.role == "user"}
    several = len(people) > 1
    found = images or {}

    def message(entry: HistoryEntry) -> tuple[Message, int]:
        content = speaker_content(entry, several)
        pictures = tuple(found[i] for i in entry.images if i in found)
        return Message(entry.role, content, pictures), estimate_tokens(
            content
        ) + IMAGE_TOKENS * len(pictures)

    newest, used = message(turn)
    used += estimate_tokens(system)
    kept: list[Message] = []
    for entry in reversed(history):
        said, cost = message(entry)
        if used + cost > budget_tokens:
            break
        kept.append(said)
        used += cost
    kept.reverse()
    # a history that starts with the assistant reads oddly to most chat templates
    while kept and kept[0].role == "assistant":
        kept.pop(0)
    head = [Message("system", system)] if system else []
    return [*head, *kept, newest]
