"""The platform-neutral shapes every adapter speaks to the core: Turn in, ReplySink out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol, runtime_checkable

from bot.access import Asker
from bot.markdown import EMPTY_ANSWER, PLACEHOLDER, THINKING, clean_text, in_progress


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
class Attachment:
    """A file someone attached, as the platform describes it. `read(limit)` downloads it: at
    most `limit` + 1 bytes (so a file over the cap shows as such); it may raise
    AttachmentUnavailable(reason) when the platform refuses. The core decides what is read,
    how much, and how long it may take."""

    name: str
    media_type: str  # as the platform says ("" if it does not)
    size: int | None  # bytes, as the platform says (None if it does not)
    read: Callable[[int], Awaitable[bytes]] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Turn:
    """One message from one person that the bot should act on."""

    key: ConversationKey  # with a reply chain: where a new conversation would live
    user_id: str
    user_name: str  # for multi-person threads: the model sees who said what
    text: str  # bot mention stripped, platform markup normalised
    event_id: str  # for de-duplication across retries and replicas
    is_admin: bool = False  # Discord administrator, Slack workspace admin: may stop any reply
    roles: frozenset[str] = frozenset()  # Discord role ids, for the access rules
    in_dm: bool = False
    from_bot: bool = False  # another bot wrote it (answered only with PARLEY_ALLOW_BOTS)
    regenerates: str = ""  # the token of the reply to answer again (Regenerate was pressed)
    only_if_active: bool = False  # answer only in a conversation the bot is already part of
    chain: ReplyChain | None = None
    attachments: tuple[Attachment, ...] = ()

    def __post_init__(self) -> None:
        # what people write is cleaned once, here, whatever platform it came from
        object.__setattr__(self, "text", clean_text(self.text))
        object.__setattr__(self, "user_name", clean_text(self.user_name))

    @property
    def asker(self) -> Asker:
        """Who asks and where, as the access rules read it."""
        space = "" if self.in_dm else self.key.space
        return Asker(self.user_id, space, self.key.channel, self.in_dm, self.roles, self.is_admin)


@dataclass(frozen=True)
class EditBudget:
    """Edits a platform allows in one scope, shared by every reply streaming there on every
    replica: `count` per `seconds` (a Slack workspace's chat.update, a Discord channel's)."""

    scope: str  # who shares it, e.g. "slack:chat.update:T1"
    count: int
    seconds: float


@dataclass(frozen=True)
class MessageRef:
    """A message the sink posted, as the platform names it, and the budget its edits take."""

    id: str
    channel: str = ""
    budget: EditBudget | None = None  # None: its edits share no budget (only the cadence)


class Phase(StrEnum):
    """Where a reply's message is in its life."""

    PLACEHOLDER = "placeholder"  # posted at once: the reply is on its way
    THINKING = "thinking"  # the model reasons; no answer text yet
    STREAMING = "streaming"  # the answer so far; more to come
    COMPLETE = "complete"  # final: a finished page, or the whole answer
    ERROR = "error"  # final: what was written, and what went wrong
    STOPPED = "stopped"  # final: stopped by someone, or by a shutdown


@dataclass(frozen=True)
class Frame:
    """What one message of a reply should show: its phase and its Markdown.

    Post-and-edit sinks show `text`; a sink with native streaming appends `body` and ends the
    stream with `text` when the frame is final.
    """

    phase: Phase
    body: str = ""  # the message's Markdown: the model's text on this page (THINKING: for how long)
    notice: str = ""  # a closing line: final, what went wrong, stopped, a footer; streaming,
    # what the reply is doing meanwhile (post-and-edit sinks show it; a native stream does not)
    controls: bool = False  # the reply's last message, final: it carries Regenerate, 👍 and 👎

    @property
    def final(self) -> bool:
        """The message's last state: no further edits, no Stop button."""
        return self.phase in (Phase.COMPLETE, Phase.ERROR, Phase.STOPPED)

    @property
    def text(self) -> str:
        match self.phase:
            case Phase.PLACEHOLDER:
                return PLACEHOLDER
            case Phase.THINKING:
                return self.body or THINKING  # the body: how long it has been thinking
            case Phase.STREAMING:
                shown = in_progress(self.body)
                return f"{shown}\n\n{self.notice}" if self.notice else shown
        if self.body and self.notice:
            return f"{self.body}\n\n{self.notice}"
        return self.body or self.notice or EMPTY_ANSWER


def message(text: str) -> Frame:
    """A message that is final as posted (a command's answer, a notice)."""
    return Frame(Phase.COMPLETE, text)


class PlatformRateLimited(Exception):
    """The platform refused a call for now; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"platform rate limited; retry after {retry_after:.1f}s")
        self.retry_after = retry_after


WaitingState = Literal["loading", "thinking"]


@runtime_checkable
class ReplySink(Protocol):
    """Shows one reply on one platform: posts and edits its messages within the platform's
    limits. It only translates frames into platform calls; the renderer decides what and when
    (the cadence, the shared budget, splitting)."""

    max_chars: int  # Discord 2000; Slack markdown_text 12000 (kept lower for readability)
    min_edit_interval: float  # seconds between edits of one message

    async def post(self, frame: Frame) -> MessageRef:
        """Post a new message in the reply's place (the thread, the reply chain).

        A message posted with a frame that is not final will be edited as the reply streams
        (adapters add a Stop button to it; its last edit comes with a final frame).
        """
        ...

    async def edit(self, ref: MessageRef, frame: Frame) -> None:
        """Show `frame` on a message. May raise PlatformRateLimited(retry_after): the platform
        itself refused (a 429), never a budget of Parley's own."""
        ...

    async def notify(self, text: str) -> None:
        """A short notice only the asking person needs (ephemeral where the platform allows)."""
        ...

    async def show_waiting(self, state: WaitingState) -> None:
        """Show that the reply is on its way but has no visible text yet.

        Called when the state begins and again every few seconds while it lasts (Discord's
        typing indicator lasts 10 s); a sink whose indicator lasts longer may ignore repeats.
        """
        ...
