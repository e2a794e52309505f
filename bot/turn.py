"""The platform-neutral shapes every adapter speaks to the core: Turn in, ReplySink out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ConversationKey:
    """Where a conversation's history lives."""

    platform: str  # "slack" | "discord" | "console"
    space: str  # Slack team id, Discord guild id, "dm", "local"
    channel: str
    thread: str  # Slack thread_ts, Discord thread id / reply-chain root id

    @property
    def tag(self) -> str:
        """The Redis hash tag shared by every key of this conversation."""
        return f"{self.platform}:{self.space}:{self.channel}:{self.thread}"


@dataclass(frozen=True)
class ReplyChain:
    """Where a conversation is a chain of replies (a Discord channel): this message's id and
    the id of the message it replies to. The core remembers every message of a conversation,
    so a reply to any of them continues it."""

    message_id: str
    replies_to: str = ""


@dataclass(frozen=True)
class Turn:
    """One message from one person that the bot should act on."""

    key: ConversationKey  # with a reply chain: where a new conversation would live
    user_id: str
    user_name: str  # for multi-person threads: the model sees who said what
    text: str  # bot mention stripped, platform markup normalised
    event_id: str  # for de-duplication across retries and replicas
    is_admin: bool = False  # may stop anyone's reply
    may_switch_model: bool = True  # False where the platform's rules restrict `model <name>`
    only_if_active: bool = False  # answer only in a conversation the bot is already part of
    chain: ReplyChain | None = None


@dataclass(frozen=True)
class MessageRef:
    """A message the sink posted, as the platform names it."""

    id: str
    channel: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


class PlatformRateLimited(Exception):
    """The platform refused a call for now; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"platform rate limited; retry after {retry_after:.1f}s")
        self.retry_after = retry_after


@runtime_checkable
class ReplySink(Protocol):
    """Posts and edits the bot's reply on one platform, within that platform's limits."""

    max_chars: int  # Discord 2000; Slack markdown_text 12000 (kept lower for readability)
    min_edit_interval: float  # seconds between edits of one message

    async def post(self, text: str, *, final: bool = True) -> MessageRef:
        """Post a new message in the reply's place (the thread, the reply chain).

        `final=False`: the message will be edited as the reply streams (adapters add a Stop
        button to such a message; its last edit comes with `final=True`).
        """
        ...

    async def edit(self, ref: MessageRef, text: str, *, final: bool = False) -> None:
        """Replace a message's text. May raise PlatformRateLimited(retry_after).

        `final` marks the message's last edit (adapters drop stop buttons, cursors, status).
        """
        ...

    async def notify(self, text: str) -> None:
        """A short notice only the asking person needs (ephemeral where the platform allows)."""
        ...

    async def show_waiting(self, state: str) -> None:
        """Show that the reply is on its way but has no visible text yet.

        `state` is "loading" (no chunk yet) or "thinking" (only thinking chunks so far). Called
        when the state begins and again every few seconds while it lasts (Discord's typing
        indicator lasts 10 s); a sink whose indicator lasts longer may ignore repeats.
        """
        ...
