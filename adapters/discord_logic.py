"""Discord decisions without I/O: who may use the bot, where a conversation lives, what it reads.

The adapter (`adapters/discord.py`) gathers facts from discord.py objects and asks these
functions; tests call them directly.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bot.settings import Settings
from bot.turn import ConversationKey

PLATFORM = "discord"
MAX_CHARS = 2000  # message content limit
MAX_CHOICES = 25  # autocomplete choices per response
CHOICE_CHARS = 100  # a choice's name and value
THREAD_NAME_CHARS = 100
CUSTOM_ID_CHARS = 100  # a message component's custom_id
STOP_PREFIX = "parley:stop:"  # a Stop button's custom_id: this, then the core's stop token
STOP_LABEL = "⏹ Stop"  # in the label, not as an emoji: no emoji name for Discord to refuse

# Words the adapter itself shows: Discord-only situations the core cannot know about.
CONTENT_WITHHELD = (
    "I can't read this message: Discord is withholding message text from me. "
    "An operator needs to turn on the **Message Content** intent for Parley in the Discord "
    "developer portal (Bot → Privileged Gateway Intents)."
)
NOT_ALLOWED = "Parley isn't enabled for you here."
MODEL_SWITCH_ADMINS = "Only server administrators can switch models here."
MODEL_SWITCH_ROLE = (
    "Only administrators and members with the <@&{role}> role can switch models here."
)

_USER = re.compile(r"<@!?(\d+)>")
_ROLE = re.compile(r"<@&(\d+)>")
_CHANNEL = re.compile(r"<#(\d+)>")
_SPACES = re.compile(r"[ \t]{2,}")


# --- where a conversation lives -------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """Where a message was said or a command was used."""

    guild_id: int | None  # None in DMs
    channel_id: int  # the thread's own id inside a thread
    parent_id: int | None = None  # the thread's channel, when channel_id is a thread

    @property
    def is_dm(self) -> bool:
        return self.guild_id is None

    @property
    def is_thread(self) -> bool:
        return self.parent_id is not None

    @property
    def home_channel(self) -> int:
        """The channel whose settings apply: a thread belongs to its parent channel."""
        return self.parent_id if self.parent_id is not None else self.channel_id


def conversation_key(place: Place, *, root_id: int | None = None) -> ConversationKey:
    """The thread, the root of the reply chain, or the DM.

    Inside a thread the thread is the conversation (and its parent channel holds the model
    preference); a DM is one running conversation; in a channel each reply chain is its own,
    named by its root message. Without a root (a slash command in a channel) the channel itself.
    """
    if place.is_dm:
        return ConversationKey(PLATFORM, "dm", str(place.channel_id), str(place.channel_id))
    space = str(place.guild_id)
    if place.is_thread:
        return ConversationKey(PLATFORM, space, str(place.parent_id), str(place.channel_id))
    thread = root_id if root_id is not None else place.channel_id
    return ConversationKey(PLATFORM, space, str(place.channel_id), str(thread))


def thread_name(text: str) -> str:
    """A thread title from the question: its first line, within Discord's 100 characters."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        return "Parley"
    if len(first) <= THREAD_NAME_CHARS:
        return first
    cut = first[: THREAD_NAME_CHARS - 1].rsplit(" ", 1)[0]
    return cut + "…"


# --- what the model reads -------------------------------------------------------------------


def to_model_text(
    text: str,
    *,
    bot_id: int,
    bot_name: str,
    users: Mapping[int, str],
    roles: Mapping[int, str],
    channels: Mapping[int, str],
) -> str:
    """A Discord message as the model should read it.

    A leading or trailing mention of the bot is dropped (it is how people address it); a
    mention of the bot mid-sentence becomes its name. Other people become `@Display Name`,
    roles `@role`, channels `#name`. Unknown ids become a neutral word rather than a number.
    """
    own = re.compile(rf"<@!?{bot_id}>")
    text = re.sub(rf"^\s*(?:{own.pattern}[\s,:]*)+", "", text)
    text = re.sub(rf"(?:[\s,]*{own.pattern})+\s*$", "", text)
    text = own.sub(f"@{bot_name}", text)
    text = _USER.sub(lambda m: "@" + users.get(int(m[1]), "someone"), text)
    text = _ROLE.sub(lambda m: "@" + roles.get(int(m[1]), "role"), text)
    text = _CHANNEL.sub(lambda m: "#" + channels.get(int(m[1]), "channel"), text)
    return _SPACES.sub(" ", text).strip()


def content_withheld(
    content: str, *, attachments: int, embeds: int, stickers: int, has_poll: bool
) -> bool:
    """True when a message arrived with nothing readable at all.

    A message always has *something*; with the Message Content intent missing Discord blanks
    the text, attachments and embeds of messages that neither mention the bot nor are DMs.
    """
    return not content and not attachments and not embeds and not stickers and not has_poll


# --- who may do what ------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """The operator's allowlists and the model-switching rule (empty lists allow everyone)."""

    guilds: frozenset[int] = frozenset()
    channels: frozenset[int] = frozenset()
    roles: frozenset[int] = frozenset()
    users: frozenset[int] = frozenset()
    model_role: int | None = None
    model_admin_only: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        return cls(
            guilds=frozenset(settings.discord_allowed_guilds),
            channels=frozenset(settings.discord_allowed_channels),
            roles=frozenset(settings.discord_allowed_roles),
            users=frozenset(settings.discord_allowed_users),
            model_role=settings.discord_model_role,
            model_admin_only=settings.discord_model_admin_only,
        )


def may_use(access: Access, place: Place, *, user_id: int, role_ids: Iterable[int]) -> bool:
    """Whether this person may talk to the bot here.

    Who: with a user or role allowlist, the person must be listed or hold a listed role.
    Where: with a guild or channel allowlist, the message must be in a listed guild / channel
    (a thread counts as its parent channel). A DM is outside every guild and channel, so with
    either of those lists set only people on the user allowlist may use DMs.
    """
    listed_user = user_id in access.users
    if (access.users or access.roles) and not (
        listed_user or not access.roles.isdisjoint(role_ids)
    ):
        return False
    if place.is_dm:
        return listed_user or not (access.guilds or access.channels)
    if access.guilds and place.guild_id not in access.guilds:
        return False
    return not access.channels or place.home_channel in access.channels


def may_switch_model(
    access: Access, place: Place, *, is_admin: bool, role_ids: Iterable[int]
) -> bool:
    """Whether this person may change the model here (a DM's model is its one user's affair)."""
    if place.is_dm or is_admin:
        return True
    if access.model_admin_only:
        return False
    if access.model_role is not None:
        return access.model_role in set(role_ids)
    return True


def model_switch_refusal(access: Access) -> str:
    if access.model_role is not None and not access.model_admin_only:
        return MODEL_SWITCH_ROLE.format(role=access.model_role)
    return MODEL_SWITCH_ADMINS


# --- the Stop button -----------------------------------------------------------------------


def stop_custom_id(token: str) -> str:
    """The custom_id of the Stop button on a reply being written (`token`: the core's)."""
    custom_id = STOP_PREFIX + token
    if len(custom_id) > CUSTOM_ID_CHARS:
        raise ValueError(f"a stop token of {len(token)} characters does not fit a custom_id")
    return custom_id


def stop_token_of(custom_id: str) -> str | None:
    """The stop token a pressed component names, if it is one of our Stop buttons.

    Only Discord tokens (`discord:<message id>`): a custom_id is ours to read whatever process
    made it, so the listener needs no memory of the buttons it or another replica sent.
    """
    if not custom_id.startswith(STOP_PREFIX):
        return None
    token = custom_id.removeprefix(STOP_PREFIX)
    platform, _, event_id = token.partition(":")
    snowflake = event_id.isascii() and event_id.isdigit()
    return token if platform == PLATFORM and snowflake else None


# --- slash command helpers ------------------------------------------------------------------


def rank_models(query: str, names: Iterable[str], *, limit: int = MAX_CHOICES) -> list[str]:
    """Catalog names for an autocomplete box, best matches first, at most `limit`.

    Exact name, then names starting with the query, then names containing it, then close
    spellings; an empty query lists the catalog in its own order.
    """
    catalog = list(dict.fromkeys(names))
    wanted = query.strip().lower()
    if not wanted:
        return catalog[:limit]
    lowered = {name: name.lower() for name in catalog}
    exact = [n for n in catalog if lowered[n] == wanted]
    prefix = [n for n in catalog if lowered[n].startswith(wanted) and n not in exact]
    prefix.sort(key=len)
    inside = [n for n in catalog if wanted in lowered[n] and n not in exact and n not in prefix]
    inside.sort(key=lambda n: (lowered[n].index(wanted), len(n)))
    taken = {*exact, *prefix, *inside}
    rest = [n for n in catalog if n not in taken]
    close = difflib.get_close_matches(wanted, [lowered[n] for n in rest], n=limit, cutoff=0.6)
    by_lower = {lowered[n]: n for n in rest}
    return [*exact, *prefix, *inside, *(by_lower[c] for c in close)][:limit]
