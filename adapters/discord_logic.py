"""Discord decisions without I/O: which events are readable, who may use the bot, where a
conversation lives, what it reads.

The adapter (`adapters/discord.py`) gathers facts from gateway payloads and discord.py objects
and asks these functions; tests call them directly.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bot.turn import ConversationKey

PLATFORM = "discord"
MAX_CHARS = 2000  # message content limit
MAX_CONTENT_CHARS = 4000  # what Discord delivers at most: 2,000, or 4,000 with Nitro
NAME_CHARS = 100  # a user name or nickname in a payload (Discord's own limit is 32)
COMMAND_NAME_CHARS = 32
MAX_OPTIONS = 25  # options of one slash command
MAX_CHOICES = 25  # autocomplete choices per response
CHOICE_CHARS = 100  # a choice's name and value
THREAD_NAME_CHARS = 100
CUSTOM_ID_CHARS = 100  # a message component's custom_id
OPTION_CHARS = 100  # a text option of Parley's slash commands (a model name), as declared
STOP_PREFIX = "parley:stop:"  # a Stop button's custom_id: this, then the core's stop token
STOP_LABEL = "⏹ Stop"  # in the label, not as an emoji: no emoji name for Discord to refuse

# Words the adapter itself shows: Discord-only situations the core cannot know about.
CONTENT_WITHHELD = (
    "I can't read this message: Discord is withholding message text from me. "
    "An operator needs to turn on the **Message Content** intent for Parley in the Discord "
    "developer portal (Bot → Privileged Gateway Intents)."
)

_USER = re.compile(r"<@!?([0-9]{1,20})>")
_ROLE = re.compile(r"<@&([0-9]{1,20})>")
_CHANNEL = re.compile(r"<#([0-9]{1,20})>")
_SPACES = re.compile(r"[ \t]{2,}")


# --- which gateway events are readable -----------------------------------------------------
#
# Discord's payloads are checked here, before discord.py parses them, for every field Parley
# reads: discord.py trusts them (it stores a `content` that is not text, and skips a handler
# silently when a key is missing), so a field it accepts can still fail later, in Parley.
# Each check returns why the payload is unusable, in words for one log line (never a value
# from the payload), or None.

# Interaction types Parley answers
SLASH_COMMAND, COMPONENT_PRESS, AUTOCOMPLETE = 2, 3, 4
TEXT_OPTION = 3  # Parley's commands take text options only


def is_snowflake(value: object) -> bool:
    """A Discord id: a positive 64-bit number, as a string of ASCII digits (as Discord sends
    it) or an int."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit() and len(value) <= 20):
            return False
        value = int(value)
    return type(value) is int and 0 < value < 1 << 64


def message_problem(data: object) -> str | None:
    """Why a MESSAGE_CREATE payload cannot be a message Parley reads (None: it can)."""
    return _message_problem(data, replied_to=False)


def _message_problem(data: object, *, replied_to: bool) -> str | None:
    if not isinstance(data, Mapping):
        return "it is not an object"
    for field in ("id", "channel_id"):
        if not is_snowflake(data.get(field)):
            return f"its {field} is not a snowflake"
    if data.get("guild_id") is not None and not is_snowflake(data["guild_id"]):
        return "its guild_id is not a snowflake"
    if type(data.get("type")) is not int:
        return "its type is not a number"
    content = data.get("content")
    if not isinstance(content, str):
        return "its content is not text"
    if len(content) > MAX_CONTENT_CHARS:
        return f"its content is {len(content):,} characters (Discord sends {MAX_CONTENT_CHARS:,})"
    problem = _user_problem(data.get("author"), "author")
    if problem is None and "member" in data:
        if data.get("guild_id") is None:
            problem = "it has a member but no guild"
        else:
            problem = _member_problem(data["member"], "member")
    if problem is None:
        problem = _mentions_problem(data.get("mentions"), data.get("mention_roles"))
    if problem is None:
        problem = _reference_problem(data.get("message_reference"))
    if problem is not None or data.get("referenced_message") is None:
        return problem
    if replied_to:
        return "its replied-to message replies to another one inline"
    inner = _message_problem(data["referenced_message"], replied_to=True)
    return None if inner is None else f"the message it replies to: {inner}"


def _user_problem(user: object, what: str) -> str | None:
    if not isinstance(user, Mapping):
        return f"its {what} is not an object"
    if not is_snowflake(user.get("id")):
        return f"its {what}'s id is not a snowflake"
    if not _is_short_text(user.get("username")) or not _is_short_text(
        user.get("global_name"), optional=True
    ):
        return f"its {what}'s name is not a name"
    # discord.py needs both to make a user, and skips a message's author silently without them
    has_avatar = "avatar" in user and _is_short_text(user["avatar"], optional=True)
    if not _is_short_text(user.get("discriminator")) or not has_avatar:
        return f"its {what}'s discriminator or avatar is missing"
    if not isinstance(user.get("bot", False), bool):
        return f"its {what}'s bot flag is not a boolean"
    return None


def _member_problem(member: object, what: str) -> str | None:
    if not isinstance(member, Mapping):
        return f"its {what} is not an object"
    if not _is_short_text(member.get("nick"), optional=True):
        return f"its {what}'s nick is not a name"
    roles = member.get("roles", [])
    if not isinstance(roles, list) or not all(is_snowflake(r) for r in roles):
        return f"its {what}'s roles are not a list of snowflakes"
    return None


def _mentions_problem(mentions: object, roles: object) -> str | None:
    if not isinstance(mentions, list):
        return "its mentions are not a list"
    for user in mentions:
        problem = _user_problem(user, "mentioned user")
        if problem is None and user.get("member") is not None:
            problem = _member_problem(user["member"], "mentioned member")
        if problem is not None:
            return problem
    if not isinstance(roles, list) or not all(is_snowflake(r) for r in roles):
        return "its mention_roles are not a list of snowflakes"
    return None


def _reference_problem(reference: object) -> str | None:
    if reference is None:
        return None
    if not isinstance(reference, Mapping):
        return "its message_reference is not an object"
    for field in ("message_id", "channel_id", "guild_id"):
        if reference.get(field) is not None and not is_snowflake(reference[field]):
            return f"its message_reference's {field} is not a snowflake"
    return None


def _is_short_text(value: object, *, optional: bool = False) -> bool:
    """Text of at most NAME_CHARS (a name, a discriminator, an avatar hash), or None if optional."""
    if value is None:
        return optional
    return isinstance(value, str) and len(value) <= NAME_CHARS


def interaction_problem(data: object) -> str | None:
    """Why an INTERACTION_CREATE payload cannot be one Parley answers (None: it can, or it is
    of a kind Parley leaves to discord.py)."""
    if not isinstance(data, Mapping):
        return "it is not an object"
    kind = data.get("type")
    if type(kind) is not int or kind not in (SLASH_COMMAND, COMPONENT_PRESS, AUTOCOMPLETE):
        return None  # pings, modals…: nothing of Parley's, left to discord.py
    if not is_snowflake(data.get("id")):
        return "its id is not a snowflake"
    if not isinstance(data.get("token"), str):
        return "its token is not text"
    for field in ("channel_id", "guild_id"):
        if data.get(field) is not None and not is_snowflake(data[field]):
            return f"its {field} is not a snowflake"
    member = data.get("member")
    if data.get("guild_id") is None:  # a DM: discord.py reads `user` (and only it)
        problem = _user_problem(data.get("user"), "user")
    elif not isinstance(member, Mapping):  # in a guild: `member` (and only it)
        problem = "its member is not an object"
    elif (problem := _member_problem(member, "member")) is None:
        problem = _user_problem(member.get("user"), "member's user")
        permissions = member.get("permissions")
        if problem is None and permissions is not None and not _is_number(permissions):
            problem = "its member's permissions are not a number"
    if problem is not None:
        return problem
    if kind == COMPONENT_PRESS:
        return _press_problem(data.get("data"))
    return _command_problem(data.get("data"), autocomplete=kind == AUTOCOMPLETE)


def _is_number(value: object) -> bool:
    """A bit set as Discord sends one (permissions): a string of ASCII digits."""
    return isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 40


def _press_problem(data: object) -> str | None:
    if not isinstance(data, Mapping):
        return "its data is not an object"
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= CUSTOM_ID_CHARS:
        return f"its custom_id is not 1 to {CUSTOM_ID_CHARS} characters of text"
    if type(data.get("component_type")) is not int:
        return "its component_type is not a number"
    return None


def _command_problem(data: object, *, autocomplete: bool) -> str | None:
    if not isinstance(data, Mapping):
        return "its data is not an object"
    name = data.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= COMMAND_NAME_CHARS:
        return "its command name is not a name"
    if data.get("type", 1) != 1:
        return "it is not a slash command"
    if data.get("guild_id") is not None and not is_snowflake(data["guild_id"]):
        return "its command's guild_id is not a snowflake"
    if data.get("resolved"):
        return "it carries users, roles or channels, which no command of Parley's takes"
    options = data.get("options", [])
    if not isinstance(options, list) or len(options) > MAX_OPTIONS:
        return f"its options are not a list of at most {MAX_OPTIONS}"
    for option in options:
        if not isinstance(option, Mapping) or not _is_short_text(option.get("name")):
            return "an option has no name"
        if option.get("type") != TEXT_OPTION:
            return "an option is not text, which every option of Parley's commands is"
        value = option.get("value")
        if not isinstance(value, str) or len(value) > OPTION_CHARS:
            return f"an option's value is not text of at most {OPTION_CHARS} characters"
        if not isinstance(option.get("focused", False), bool):
            return "an option's focused flag is not a boolean"
    focused = sum(1 for option in options if option.get("focused"))
    if focused != (1 if autocomplete else 0):
        return "autocomplete without one focused option" if autocomplete else "a focused option"
    return None


def payload_id(data: object) -> str:
    """The id a payload names, for a log line ("?" when it names none that is readable)."""
    value: Any = data.get("id") if isinstance(data, Mapping) else None
    return str(value) if is_snowflake(value) else "?"


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
    # trailing mentions one by one from the end: a regex searching for them would try every
    # position of the text, each scanning the spaces after it (quadratic in the text's length)
    at_end = re.compile(rf"{own.pattern}\Z")
    text = text.rstrip()
    while (found := at_end.search(text)) is not None:
        text = _without_trailing_separators(text[: found.start()])
    text = own.sub(f"@{bot_name}", text)
    text = _USER.sub(lambda m: "@" + users.get(int(m[1]), "someone"), text)
    text = _ROLE.sub(lambda m: "@" + roles.get(int(m[1]), "role"), text)
    text = _CHANNEL.sub(lambda m: "#" + channels.get(int(m[1]), "channel"), text)
    return _SPACES.sub(" ", text).strip()


def _without_trailing_separators(text: str) -> str:
    """`text` without the spaces and commas it ends with (a regex for them is quadratic too)."""
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] == ","):
        end -= 1
    return text[:end]


def content_withheld(
    content: str, *, attachments: int, embeds: int, stickers: int, has_poll: bool
) -> bool:
    """True when a message arrived with nothing readable at all.

    A message always has *something*; with the Message Content intent missing Discord blanks
    the text, attachments and embeds of messages that neither mention the bot nor are DMs.
    """
    return not content and not attachments and not embeds and not stickers and not has_poll


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
    return _token_after(STOP_PREFIX, custom_id)


CONTROLS = {"regenerate": "parley:regen:", "up": "parley:up:", "down": "parley:down:"}
CONTROL_LABELS = {"regenerate": "🔄 Regenerate", "up": "👍", "down": "👎"}


def control_custom_id(kind: str, token: str) -> str:
    """The custom_id of a finished reply's button: Regenerate, 👍 or 👎."""
    custom_id = CONTROLS[kind] + token
    if len(custom_id) > CUSTOM_ID_CHARS:
        raise ValueError(f"a reply token of {len(token)} characters does not fit a custom_id")
    return custom_id


def control_of(custom_id: str) -> tuple[str, str] | None:
    """Which of a finished reply's buttons was pressed, and the reply's token, if it is ours."""
    for kind, prefix in CONTROLS.items():
        if (token := _token_after(prefix, custom_id)) is not None:
            return kind, token
    return None


def _token_after(prefix: str, custom_id: str) -> str | None:
    if len(custom_id) > CUSTOM_ID_CHARS or not custom_id.startswith(prefix):
        return None
    token = custom_id.removeprefix(prefix)
    platform, _, message_id = token.partition(":")
    return token if platform == PLATFORM and is_snowflake(message_id) else None


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
