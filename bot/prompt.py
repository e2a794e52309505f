"""What the model is sent: system prompt, as much thread history as fits, the newest turn."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bot.backends.base import Image, Message
from bot.state import HistoryEntry

CHARS_PER_TOKEN = 4.0  # until a model's own is measured: rough, errs towards sending less
PER_MESSAGE_TOKENS = 4  # a chat template's role markers around each message
IMAGE_TOKENS = 800  # what an image of ≤ 1,568 px costs a vision model, roughly
MEASURED_RANGE = (1.5, 8.0)  # characters per token a measurement may say (CJK ~1.5, code ~3)
MEASURE_FROM_CHARS = 200  # shorter prompts say too little (template tokens dominate)


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    return int(len(text) / chars_per_token) + PER_MESSAGE_TOKENS


def measure(messages: list[Message], prompt_tokens: int) -> float | None:
    """Characters per token, from what a backend counted for a prompt (`prompt_eval_count`,
    `usage.prompt_tokens`); None when the prompt says too little: short, with images (their
    tokens are not characters), or counted as nothing (an old Ollama omits a cached prompt)."""
    chars = sum(len(m.content) for m in messages)
    text_tokens = prompt_tokens - PER_MESSAGE_TOKENS * len(messages)
    if chars < MEASURE_FROM_CHARS or text_tokens <= 0 or any(m.images for m in messages):
        return None
    low, high = MEASURED_RANGE
    return min(high, max(low, chars / text_tokens))


def speaker_content(entry: HistoryEntry, several_people: bool) -> str:
    """In a thread with several people the model sees who said what."""
    if entry.role == "user" and several_people and entry.user_name:
        return f"{entry.user_name}: {entry.content}"
    return entry.content


SUMMARY_HEADING = "Summary of the earlier conversation (its messages are no longer shown):"


def with_summary(system: str, summary: str) -> str:
    """The system prompt, followed by what the thread's folded turns said."""
    if not summary:
        return system
    told = f"{SUMMARY_HEADING}\n{summary}"
    return f"{system}\n\n{told}" if system else told


def entry_tokens(entry: HistoryEntry, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """What a stored entry costs when sent (its images counted as if the model sees them)."""
    return estimate_tokens(entry.content, chars_per_token) + IMAGE_TOKENS * len(entry.images)


@dataclass(frozen=True)
class Prompt:
    messages: list[Message]
    left_out: int  # the oldest history entries that did not fit


def build_messages(
    *,
    system: str,
    history: list[HistoryEntry],
    turn: HistoryEntry,
    budget_tokens: int,
    images: Mapping[str, Image] | None = None,
    chars_per_token: float = CHARS_PER_TOKEN,
    summary: str = "",
    tools: bool = False,
) -> Prompt:
    """System prompt (with the thread's `summary`) + the newest history that fits the budget +
    the new turn.

    The system prompt and the new turn are always kept; older entries go first, whole. With
    `images` (the thread's, by id; for a model that sees) each message carries its images, at
    IMAGE_TOKENS each; without, a model that cannot see gets the text alone. Text is counted
    at `chars_per_token` (the model's measured rate, else a cautious guess). Tool calls and
    their results go to a model that is offered `tools`; another reads the answers they made.
    """
    if not tools:  # a model offered no tools reads the answers their calls and results made
        history = [e for e in history if e.role != "tool" and not (e.calls and not e.content)]
    people = {e.user_id or e.user_name for e in [*history, turn] if e.role == "user"}
    several = len(people) > 1
    found = images or {}

    def message(entry: HistoryEntry) -> tuple[Message, int]:
        content = speaker_content(entry, several)
        pictures = tuple(found[i] for i in entry.images if i in found)
        cost = estimate_tokens(content, chars_per_token) + IMAGE_TOKENS * len(pictures)
        said = Message(
            entry.role,
            content,
            pictures,
            tool_calls=entry.calls if tools else (),
            tool_call_id=entry.tool_call_id,
            tool_name=entry.tool_name,
        )
        return said, cost

    system = with_summary(system, summary)
    newest, used = message(turn)
    used += estimate_tokens(system, chars_per_token)
    kept: list[Message] = []
    for entry in reversed(history):
        said, cost = message(entry)
        if used + cost > budget_tokens:
            break
        kept.append(said)
        used += cost
    left_out = len(history) - len(kept)
    kept.reverse()
    # a history that starts with the assistant reads oddly to most chat templates, and a tool's
    # result without the call it answers is refused by OpenAI-kind servers
    while kept and kept[0].role != "user":
        kept.pop(0)
    head = [Message("system", system)] if system else []
    return Prompt([*head, *kept, newest], left_out)
