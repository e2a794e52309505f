"""Discord on discord.py: gateway events become Turns, and a ReplySink posts and edits replies.

Decisions (which events are readable, who may talk, which conversation, what the model reads)
are in `discord_logic`; everything about answering is the core's. This module only translates,
and keeps Discord safe: a message or interaction Parley cannot read is dropped with one log line
before discord.py parses it (and whatever discord.py cannot parse costs that one event, not the
connection), no send or edit can ping anyone, each message declares its channel's edit budget
(which the core shares among the replies streaming there), and rate limits are waited out, never
retried blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import discord
import yarl
from discord import app_commands

from adapters.discord_logic import (
    CHOICE_CHARS,
    CONTENT_WITHHELD,
    CONTROL_LABELS,
    MAX_CHARS,
    OPTION_CHARS,
    PLATFORM,
    STOP_LABEL,
    Place,
    content_withheld,
    control_custom_id,
    control_of,
    conversation_key,
    interaction_problem,
    message_problem,
    payload_id,
    rank_models,
    stop_custom_id,
    stop_token_of,
    thread_name,
    to_model_text,
)
from bot.access import Access, Asker
from bot.app import Parley
from bot.commands import CommandReply, parse_text_command
from bot.conversation import stop_token
from bot.errors import AttachmentUnavailable
from bot.markdown import split_message
from bot.turn import (
    Attachment,
    ConversationKey,
    EditBudget,
    Frame,
    MessageRef,
    PlatformRateLimited,
    ReplyChain,
    Turn,
    WaitingState,
)

log = logging.getLogger(__name__)

# discord.py parses the gateway (and writes REST bodies) with orjson whenever it can import it,
# and orjson is installed for Parley's own JSON (bot/fastjson.py). orjson refuses JSON that json
# reads (a lone surrogate in a \u escape, NaN, a number beyond a double): one such event would
# then fail in the gateway before the edge below checks it (tests/test_discord_fuzz.py).
# discord.py keeps the stdlib's json, as it has without orjson installed.
discord.utils._from_json = json.loads  # type: ignore[assignment]  # as discord.py sets it
discord.utils._to_json = functools.partial(json.dumps, separators=(",", ":"), ensure_ascii=True)

# Every send and edit carries this: nobody is pinged, not even the person replied to, whatever
# the model writes (`@everyone`, `<@id>`, `<@&role>`).
NO_PINGS = discord.AllowedMentions.none()

# Edits per channel per window, shared by every reply streaming in that channel on every replica.
# Discord no longer documents the edit limit; in practice a channel takes about one edit a
# second, in short bursts: five per five seconds keeps the long-run rate at one a second.
# discord.py still honours each bucket's X-RateLimit-* headers and 429s on top of this.
EDIT_BUDGET = (5, 5)
# Rate limits longer than this surface as discord.RateLimited (→ PlatformRateLimited) instead
# of discord.py sleeping inside the call; discord.py's minimum.
MAX_RATELIMIT_WAIT = 30.0
PROMPT_OPTION_CHARS = 4000  # a slash command's string option: Discord's own limit is 6,000
DEFER_AFTER = 1.0  # seconds: slower slash commands are deferred (Discord allows 3)
AUTOCOMPLETE_TIMEOUT = 2.5  # Discord discards autocomplete answers after 3 s
STOP_GRACE = 10.0  # seconds in-flight replies get to reach their final state on stop
WITHHELD_NOTICE_EVERY = 600.0  # seconds between "content withheld" notices per channel
THREAD_ALREADY_CREATED = 160004  # Discord's error code: this message already has a thread
ERROR_CHARS = 200  # of a parser's exception, in the line that says an event was dropped

# The gateway events checked at the edge (see _check_events_at_the_edge), with what Parley
# checks in their payload before discord.py parses it (None: only that discord.py can). Each
# carries one message or interaction, so dropping one that cannot be read loses only itself.
CHECKED_EVENTS: dict[str, Callable[[object], str | None] | None] = {
    "MESSAGE_CREATE": message_problem,
    "MESSAGE_UPDATE": None,  # Parley acts on none, but Discord echoes every edit, its own too
    "INTERACTION_CREATE": interaction_problem,
}

Channel = (
    discord.TextChannel
    | discord.Thread
    | discord.DMChannel
    | discord.VoiceChannel
    | discord.StageChannel
    | discord.PartialMessageable
)


def _check_events_at_the_edge(client: discord.Client) -> None:
    """Drop, with one log line, a message or interaction whose payload Parley cannot read.

    discord.py 2.7 parses a gateway event inside the loop that reads the websocket, and catches
    nothing there: one exception from a parser (a key missing, an id that is not a number) ends
    `Client.connect()` for good, while the socket stays open and its heartbeats go on, so Discord
    shows Parley online and it hears nothing more. No public hook reaches that code
    (`Client.on_error` covers event handlers, not parsers), so this replaces the parsers of
    CHECKED_EVENTS in the connection state's parser table, in which the gateway looks up each
    event it receives. The one place Parley touches discord.py's internals.
    """
    parsers = client._connection.parsers
    for event, problem_of in CHECKED_EVENTS.items():
        parsers[event] = _checked(event, parsers[event], problem_of)


def _checked(
    event: str, parse: Callable[[Any], None], problem_of: Callable[[object], str | None] | None
) -> Callable[[Any], None]:
    def parse_checked(data: Any) -> None:
        try:
            problem = problem_of(data) if problem_of is not None else None
            if problem is None:
                parse(data)
                return
        except Exception as e:  # discord.py's parser, on input nobody has checked all of
            problem = f"discord.py could not read it ({type(e).__name__}: {e})"[:ERROR_CHARS]
        log.warning("dropped Discord %s %s: %s", event, payload_id(data), problem)

    return parse_checked


def _attachment(attachment: discord.Attachment) -> Attachment:
    """A file on a message, fetched from Discord's CDN (its URL is signed and expires: the core
    reads it while answering the message that brought it)."""

    async def read(limit: int) -> bytes:
        try:
            data = await attachment.read()
        except discord.HTTPException as e:
            raise AttachmentUnavailable(f"Discord answered {e.status} for it.") from e
        return data[: limit + 1]

    return Attachment(attachment.filename, attachment.content_type or "", attachment.size, read)


def _place(channel: Any, guild_id: int | None) -> Place:
    if isinstance(channel, discord.Thread):
        return Place(guild_id, channel.id, channel.parent_id)
    return Place(guild_id, channel.id)


def _roles(user: discord.abc.User) -> frozenset[str]:
    return (
        frozenset(str(r.id) for r in user.roles)
        if isinstance(user, discord.Member)
        else frozenset()
    )


def _asker(place: Place, user: discord.abc.User) -> Asker:
    """Who asks where, as the core's access rules read it."""
    space = "" if place.is_dm else str(place.guild_id)
    channel = str(place.home_channel)
    return Asker(str(user.id), space, channel, place.is_dm, _roles(user), _is_admin(user))


def _is_admin(user: discord.abc.User) -> bool:
    return isinstance(user, discord.Member) and user.guild_permissions.administrator


def _may_reply(channel: Channel) -> bool:
    """Whether the bot may post a reply here (from the cached roles and overwrites)."""
    if isinstance(channel, discord.DMChannel | discord.PartialMessageable):
        return True  # nothing cached to tell: try
    permissions = channel.permissions_for(channel.guild.me)
    may_send = (
        permissions.send_messages_in_threads
        if isinstance(channel, discord.Thread)
        else permissions.send_messages
    )
    return may_send and permissions.read_message_history  # replies need the history


class StopButton(discord.ui.View):
    """The Stop button a reply carries while it is written.

    Pressing it is answered by the client's `on_interaction` listener from the custom_id alone,
    on whichever replica Discord delivers the press to. So discord.py must not keep this view
    in its per-process view store (it would, for every reply, for good): it is never
    "dispatchable" here.
    """

    def __init__(self, token: str) -> None:
        super().__init__(timeout=None)
        self.add_item(
            discord.ui.Button[discord.ui.View](
                label=STOP_LABEL,
                style=discord.ButtonStyle.secondary,
                custom_id=stop_custom_id(token),
            )
        )

    def is_dispatchable(self) -> bool:
        return False


class ReplyControls(discord.ui.View):
    """A finished reply's buttons — Regenerate, 👍, 👎 — answered, like the Stop button, from
    the custom_id alone on whichever replica gets the press (never kept in the view store)."""

    def __init__(self, token: str) -> None:
        super().__init__(timeout=None)
        for kind, label in CONTROL_LABELS.items():
            self.add_item(
                discord.ui.Button[discord.ui.View](
                    label=label,
                    style=discord.ButtonStyle.secondary,
                    custom_id=control_custom_id(kind, token),
                )
            )

    def is_dispatchable(self) -> bool:
        return False


async def _send(
    channel: Channel,
    text: str,
    *,
    reply_to: discord.Message | None,
    view: discord.ui.View | None = None,
) -> discord.Message:
    """One message that pings nobody, as a reply when there is something to reply to."""
    options: dict[str, Any] = {"allowed_mentions": NO_PINGS}
    if reply_to is not None:
        options["reference"] = reply_to.to_reference(fail_if_not_exists=False)
        options["mention_author"] = False
    if view is not None:
        options["view"] = view
    return await channel.send(text, **options)


@dataclass
class DiscordSink:
    """Posts and edits one reply in one channel or thread (see bot.turn.ReplySink)."""

    channel: Channel
    min_edit_interval: float
    reply_to: discord.Message | None  # the question; the first page replies to it
    edit_budget: tuple[int, int] = EDIT_BUDGET
    max_chars: int = MAX_CHARS
    stop_token: str | None = None  # set once the turn is known: its pages carry a Stop button
    _last: discord.Message | None = None
    _typing: bool = True

    async def post(self, frame: Frame) -> MessageRef:
        """Post a page; while it is being written (a frame not final) it carries the Stop
        button, which its final edit takes off."""
        view = self._buttons(frame)
        # later pages reply to the page before, so the reply reads as one chain
        try:
            sent = await _send(
                self.channel, frame.text, reply_to=self._last or self.reply_to, view=view
            )
        except discord.RateLimited as e:
            raise PlatformRateLimited(e.retry_after) from e
        self._last = sent
        count, seconds = self.edit_budget
        budget = EditBudget(f"discord:edits:{self.channel.id}", count, seconds)
        return MessageRef(str(sent.id), str(self.channel.id), budget)

    async def edit(self, ref: MessageRef, frame: Frame) -> None:
        message = self.channel.get_partial_message(int(ref.id))
        try:
            if (
                frame.final
            ):  # the page is done: Stop goes (`components: []`), the reply's buttons come
                await message.edit(
                    content=frame.text, allowed_mentions=NO_PINGS, view=self._buttons(frame)
                )
            else:  # leaves the components as they are
                await message.edit(content=frame.text, allowed_mentions=NO_PINGS)
        except discord.RateLimited as e:
            raise PlatformRateLimited(e.retry_after) from e

    def _buttons(self, frame: Frame) -> discord.ui.View | None:
        """Stop while a page is written; a finished reply's buttons on its last page."""
        if not self.stop_token:
            return None
        if not frame.final:
            return StopButton(self.stop_token)
        return ReplyControls(self.stop_token) if frame.controls else None

    async def notify(self, text: str) -> None:
        # Discord has no ephemeral reply to a message: answer the asker, pinging nobody
        try:
            await _send(self.channel, text, reply_to=self.reply_to)
        except discord.HTTPException as e:
            log.warning("could not send a notice in channel %s: %s", self.channel.id, e)

    async def show_waiting(self, state: WaitingState) -> None:
        if not self._typing:
            return
        try:
            await self.channel.typing()  # one indicator, ~10 s; the core repeats it
        except discord.Forbidden:
            self._typing = False  # never repeat a request Discord refuses


@dataclass
class _Connection:
    client: discord.Client
    task: asyncio.Task[None]  # client.connect(): runs until closed


class DiscordAdapter:
    """Runs one discord.py client (sharded when configured) on top of the core."""

    name = "discord"

    def __init__(
        self,
        parley: Parley,
        *,
        guild_ready_timeout: float = 2.0,
        edit_budget: tuple[int, int] = EDIT_BUDGET,
    ) -> None:
        settings = parley.settings
        if settings.discord_token is None:
            raise ValueError("PARLEY_DISCORD_TOKEN is not set")
        self.parley = parley
        self.settings = settings
        self.access = Access.for_platform(settings, PLATFORM)
        self.guild_ready_timeout = guild_ready_timeout
        self.edit_budget = edit_budget
        self.message_content = True  # False once Discord refused the intent
        self._connection: _Connection | None = None
        self._turns: set[asyncio.Task[Any]] = set()
        self._withheld_told: dict[int, float] = {}

    @property
    def ready(self) -> bool:
        """Connected to the gateway and reading it (for /readyz)."""
        connection = self._connection
        return (
            connection is not None
            and not connection.task.done()  # it may end while the client is neither closed…
            and connection.client.is_ready()  # …nor any less ready
            and not connection.client.is_closed()
        )

    @property
    def client(self) -> discord.Client:
        if self._connection is None:
            raise RuntimeError("the Discord adapter is not started")
        return self._connection.client

    # --- lifecycle ---

    async def start(self) -> None:
        """Log in, sync slash commands, connect; return once the gateway is ready."""
        if self.settings.discord_api_url:
            discord.http.Route.BASE = self.settings.discord_api_url.rstrip("/")
        if self.settings.discord_gateway_url:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(
                self.settings.discord_gateway_url
            )
        try:
            await self._connect(sync_commands=True)
        except discord.PrivilegedIntentsRequired:
            log.error(
                "Discord refused the Message Content intent: it is not enabled for this bot in "
                "the developer portal (Bot → Privileged Gateway Intents → Message Content "
                "Intent). Connecting without it: Parley reads DMs and messages that mention it, "
                "but replies and thread follow-ups without a mention arrive empty."
            )
            self.message_content = False
            await self._connect(sync_commands=False)
        client = self.client
        log.info(
            "Discord: connected as %s (%s) to %d guild(s)",
            client.user,
            client.user.id if client.user else "?",
            len(client.guilds),
        )
        flags = client.application_flags
        if self.message_content and not (
            flags.gateway_message_content or flags.gateway_message_content_limited
        ):
            log.warning(
                "Discord does not list the Message Content intent as enabled for this "
                "application: messages may arrive without their text. Enable it in the developer "
                "portal (Bot → Privileged Gateway Intents)."
            )

    async def quiesce(self) -> None:
        """Nothing to hand over: a shard's events reach only the process that runs it, so the
        gateway stays open while replies finish (and their Stop buttons still arrive)."""

    async def stop(self) -> None:
        """Finish in-flight replies as stopped, then disconnect."""
        turns = [t for t in self._turns if not t.done()]
        for task in turns:
            task.cancel()
        if turns:
            await asyncio.wait(turns, timeout=STOP_GRACE)
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.client.close()
            await asyncio.gather(connection.task, return_exceptions=True)

    async def _connect(self, *, sync_commands: bool) -> None:
        client, tree = self._build_client()
        ready = self._watch_ready(client)
        assert self.settings.discord_token is not None
        try:
            await client.login(self.settings.discord_token.get_secret_value())
            if sync_commands:
                await self._sync_commands(tree)
            connection = _Connection(client, asyncio.create_task(client.connect()))
            self._connection = connection
            waiting = asyncio.create_task(ready.wait())
            await asyncio.wait({connection.task, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.is_set():
                waiting.cancel()
                connection.task.result()  # raises what ended the connection
                raise ConnectionError("the Discord gateway closed before it was ready")
        except BaseException:
            self._connection = None
            await client.close()
            raise
        connection.task.add_done_callback(_connection_ended)

    def _watch_ready(self, client: discord.Client) -> asyncio.Event:
        """Set once every shard this process runs is connected and every guild has arrived.

        discord.py's own `on_ready` comes `guild_ready_timeout` (2 s) after the *last* guild,
        whose count it never checks: a fixed delay on every start. READY lists the guilds to
        expect, so this is set as soon as all of them are in; `on_ready` still sets it when a
        guild stays unavailable (a Discord outage).
        """
        ready = asyncio.Event()
        settings = self.settings
        sharded = settings.discord_shard_count is not None
        expected = (
            set(settings.discord_shard_ids or range(settings.discord_shard_count or 1))
            if sharded
            else {0}
        )
        connected: set[int] = set()

        def check() -> None:
            if connected >= expected and not any(g.unavailable for g in client.guilds):
                ready.set()

        @client.event
        async def on_ready() -> None:
            ready.set()

        @client.event
        async def on_connect() -> None:  # READY parsed: the guilds to expect are listed
            if not sharded:
                connected.add(0)
                check()

        @client.event
        async def on_shard_connect(shard_id: int) -> None:
            connected.add(shard_id)
            check()

        @client.event
        async def on_guild_available(guild: discord.Guild) -> None:
            check()

        @client.event
        async def on_guild_join(guild: discord.Guild) -> None:
            check()

        return ready

    def _build_client(self) -> tuple[discord.Client, app_commands.CommandTree[discord.Client]]:
        # Parley never joins voice: spare operators discord.py's warnings about voice libraries
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        intents = discord.Intents.none()
        intents.guilds = True  # channels, threads and roles, for permissions and names
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = self.message_content
        options: dict[str, Any] = {
            "intents": intents,
            "allowed_mentions": NO_PINGS,
            "max_ratelimit_timeout": MAX_RATELIMIT_WAIT,
            "guild_ready_timeout": self.guild_ready_timeout,
            "chunk_guilds_at_startup": False,
        }
        client: discord.Client
        if self.settings.discord_shard_count is None:
            client = discord.Client(**options)
        else:  # several shards in this process, or this process's share of them
            if self.settings.discord_shard_ids:
                options["shard_ids"] = self.settings.discord_shard_ids
            client = discord.AutoShardedClient(
                shard_count=self.settings.discord_shard_count, **options
            )
        _check_events_at_the_edge(client)

        @client.event
        async def on_message(message: discord.Message) -> None:
            await self._tracked(self._on_message(message))

        @client.event
        async def on_interaction(interaction: discord.Interaction[discord.Client]) -> None:
            # slash commands and autocomplete go to the command tree; components come here
            if interaction.type is not discord.InteractionType.component:
                return
            data: Mapping[str, object] = interaction.data or {}
            custom_id = data.get("custom_id")
            if not isinstance(custom_id, str):
                return
            if (token := stop_token_of(custom_id)) is not None:
                await self._stop_pressed(interaction, token)
            elif (control := control_of(custom_id)) is not None:
                await self._tracked(self._control_pressed(interaction, *control))

        return client, self._command_tree(client)

    async def _tracked(self, work: Awaitable[None]) -> None:
        """Run a turn so that stop() can finish it as stopped."""
        task = asyncio.current_task()
        assert task is not None
        self._turns.add(task)
        try:
            await work
        finally:
            self._turns.discard(task)

    # --- messages ---

    async def _on_message(self, message: discord.Message) -> None:
        me = self.client.user
        author, channel = message.author, message.channel
        if me is None or author.id == me.id:  # ourselves (other bots: the core decides)
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return  # joins, pins, thread-created notices…
        if isinstance(channel, discord.GroupChannel):
            return  # bots are never in group DMs
        if isinstance(channel, discord.PartialMessageable):  # nor its guild, roles, permissions
            log.warning(
                "dropped Discord message %s: its channel %s is unknown to discord.py here",
                message.id,
                channel.id,
            )
            return
        place = _place(channel, message.guild.id if message.guild else None)
        if not self.access.may_use(_asker(place, author)):  # before a thread is opened for it
            return
        addressed = self._addressed(message, place, me.id)
        if addressed is None:
            return
        key, chain, only_if_active = addressed
        if not _may_reply(channel):
            log.warning("mentioned in channel %s, where Parley may not reply", channel.id)
            return  # a refused request counts towards Discord's invalid-request ban
        if content_withheld(
            message.content,
            attachments=len(message.attachments),
            embeds=len(message.embeds),
            stickers=len(message.stickers),
            has_poll=message.poll is not None,
        ):
            await self._tell_content_withheld(channel, message)
            return
        text = to_model_text(
            message.content,
            bot_id=me.id,
            bot_name=me.display_name,
            users={user.id: user.display_name for user in message.mentions},
            roles={role.id: role.name for role in message.role_mentions},
            channels={c.id: c.name for c in message.channel_mentions},
        )
        sink = DiscordSink(
            channel,
            self.settings.edit_interval,
            reply_to=message,
            edit_budget=self.edit_budget,
        )
        if (
            chain is not None
            and not chain.replies_to
            and self.settings.discord_use_threads
            and isinstance(channel, discord.TextChannel)
            and parse_text_command(text) is None
        ):  # a new conversation: in a thread of its own
            thread = await self._open_thread(message, text)
            if thread is not None:
                key, chain = conversation_key(_place(thread, place.guild_id)), None
                sink.channel, sink.reply_to = thread, None
        turn = Turn(
            key=key,
            user_id=str(author.id),
            user_name=author.display_name,
            text=text,
            event_id=str(message.id),
            is_admin=_is_admin(author),
            roles=_roles(author),
            in_dm=place.is_dm,
            from_bot=author.bot,
            only_if_active=only_if_active,
            chain=chain,
            attachments=tuple(_attachment(a) for a in message.attachments),
        )
        sink.stop_token = stop_token(turn)
        await self.parley.conversation.handle(turn, sink)

    def _addressed(
        self, message: discord.Message, place: Place, me: int
    ) -> tuple[ConversationKey, ReplyChain | None, bool] | None:
        """The conversation this message continues or starts, if it may be meant for the bot:
        its key, its reply chain (in a channel), and whether to answer only if the bot is
        already part of it.

        A mention (of the bot itself: not @everyone, not a role), a reply to one of the bot's
        messages, any DM, and any message in a thread the bot started; other thread messages
        only where the bot has answered.
        """
        mentioned = any(user.id == me for user in message.mentions)
        resolved = message.reference.resolved if message.reference else None
        replied_to = (
            resolved if isinstance(resolved, discord.Message) and resolved.author.id == me else None
        )
        if place.is_dm:
            return conversation_key(place), None, False
        if place.is_thread:
            thread = message.channel
            owned = isinstance(thread, discord.Thread) and thread.owner_id == me
            return conversation_key(place), None, not (mentioned or replied_to or owned)
        if not (mentioned or replied_to):
            return None
        reference = message.reference
        replies_to = reference.message_id if reference and reference.message_id else None
        root = message.id  # a new conversation, unless the core knows the one replied to
        if replied_to is not None:  # older than the core's record: start at what it answered
            above = replied_to.reference
            root = above.message_id if above and above.message_id else replied_to.id
        chain = ReplyChain(str(message.id), str(replies_to) if replies_to else "")
        return conversation_key(place, root_id=root), chain, False

    async def _open_thread(self, message: discord.Message, text: str) -> discord.Thread | None:
        try:
            return await message.create_thread(name=thread_name(text))
        except discord.HTTPException as e:  # no permission, a forum, a thread already there…
            if e.code == THREAD_ALREADY_CREATED:  # the same event reached another replica too
                return await self._existing_thread(message)
            log.warning(
                "could not open a thread in channel %s (%s); replying instead",
                message.channel.id,
                e,
            )
            return None

    async def _existing_thread(self, message: discord.Message) -> discord.Thread | None:
        """The thread started from `message` (it has the message's id), to answer there too:
        which replica answers is the core's de-duplication to decide, not this race's."""
        if message.guild is not None and (known := message.guild.get_thread(message.id)):
            return known
        try:
            found = await self.client.fetch_channel(message.id)
        except discord.HTTPException as e:
            log.warning("could not find the thread of message %s: %s", message.id, e)
            return None
        return found if isinstance(found, discord.Thread) else None

    async def _tell_content_withheld(self, channel: Channel, message: discord.Message) -> None:
        """Say why there is no answer, once in a while per channel (in the log and the chat)."""
        now = time.monotonic()
        told = self._withheld_told.get(channel.id)
        if told is not None and now - told < WITHHELD_NOTICE_EVERY:
            return
        self._withheld_told[channel.id] = now
        log.warning(
            "a message to Parley in channel %s arrived without its text: the Message Content "
            "intent is not enabled for this bot in the Discord developer portal",
            channel.id,
        )
        try:
            await _send(channel, CONTENT_WITHHELD, reply_to=message)
        except discord.HTTPException as e:
            log.warning("could not say so in channel %s: %s", channel.id, e)

    # --- the Stop button ---

    async def _stop_pressed(
        self, interaction: discord.Interaction[discord.Client], token: str
    ) -> None:
        """Stop a reply, wherever it is being generated (the core forwards through Redis)."""
        try:  # ack at once, changing nothing: the reply's own edits show the outcome
            await interaction.response.defer()
        except discord.HTTPException as e:  # answered elsewhere (a duplicate delivery), expired
            log.warning("could not acknowledge a Stop press (%s); ignoring it", e)
            return
        user = interaction.user
        refusal = await self.parley.conversation.stop(
            token, user_id=str(user.id), is_admin=interaction.permissions.administrator
        )
        if refusal is None:
            log.info("reply %s stopped by %s", token, user.id)
            return
        try:
            await interaction.followup.send(refusal, ephemeral=True, allowed_mentions=NO_PINGS)
        except discord.HTTPException as e:
            log.warning("could not answer a Stop press: %s", e)

    # --- a finished reply's buttons ---

    async def _control_pressed(
        self, interaction: discord.Interaction[discord.Client], kind: str, token: str
    ) -> None:
        """Regenerate (the core answers the thread's last question again, here) or a vote."""
        try:  # ack at once, changing nothing
            await interaction.response.defer()
        except discord.HTTPException as e:
            log.warning("could not acknowledge a button press (%s); ignoring it", e)
            return
        user = interaction.user
        if kind != "regenerate":
            refusal = await self.parley.conversation.feedback(
                token, user_id=str(user.id), vote=kind
            )
            if refusal is not None:
                with contextlib.suppress(discord.HTTPException):
                    await interaction.followup.send(
                        refusal, ephemeral=True, allowed_mentions=NO_PINGS
                    )
            return
        channel = interaction.channel
        if channel is None or isinstance(channel, discord.ForumChannel | discord.CategoryChannel):
            return
        place = self._interaction_place(interaction)
        pressed = interaction.message
        asker = Turn(
            key=conversation_key(place),
            user_id=str(user.id),
            user_name=user.display_name,
            text="",
            event_id=str(interaction.id),  # one press, one answer (a snowflake: its buttons work)
            is_admin=interaction.permissions.administrator,
            roles=_roles(user),
            in_dm=place.is_dm,
        )
        sink = DiscordSink(
            channel,  # type: ignore[arg-type]
            self.settings.edit_interval,
            reply_to=pressed,
            edit_budget=self.edit_budget,
            stop_token=stop_token(asker),
        )
        chain = None
        if pressed is not None and not place.is_dm and not place.is_thread:
            chain = ReplyChain(str(pressed.id))  # the new answer joins the pressed one's chain
        await self.parley.conversation.regenerate(token, asker, sink, chain=chain)

    # --- slash commands ---

    def _command_tree(self, client: discord.Client) -> app_commands.CommandTree[discord.Client]:
        tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(client)

        @tree.command(name="model", description="Show this channel's model, or switch it")
        @app_commands.describe(name="The model to switch to (`default` goes back)")
        async def model(
            interaction: discord.Interaction[discord.Client],
            name: app_commands.Range[str, 1, OPTION_CHARS] | None = None,
        ) -> None:
            await self._tracked(self._slash(interaction, "model", name or ""))

        @model.autocomplete("name")
        async def model_choices(
            interaction: discord.Interaction[discord.Client], current: str
        ) -> list[app_commands.Choice[str]]:
            return await self._model_choices(interaction, current)

        @tree.command(name="prompt", description="Show this channel's system prompt, or set it")
        @app_commands.describe(text="The new prompt (`default` goes back to the default one)")
        async def prompt(
            interaction: discord.Interaction[discord.Client],
            text: app_commands.Range[str, 1, PROMPT_OPTION_CHARS] | None = None,
        ) -> None:
            await self._tracked(self._slash(interaction, "prompt", text or ""))

        @tree.command(name="usage", description="How many tokens you have used, and your limit")
        async def usage(interaction: discord.Interaction[discord.Client]) -> None:
            await self._tracked(self._slash(interaction, "usage", ""))

        @tree.command(name="reset", description="Forget this thread's conversation")
        async def reset(interaction: discord.Interaction[discord.Client]) -> None:
            await self._tracked(self._slash(interaction, "reset", ""))

        @tree.command(name="help", description="What Parley does and how to use it")
        async def help_(interaction: discord.Interaction[discord.Client]) -> None:
            await self._tracked(self._slash(interaction, "help", ""))

        @tree.error
        async def on_command_error(
            interaction: discord.Interaction[discord.Client], error: app_commands.AppCommandError
        ) -> None:
            # a command Parley does not have (synced by an older version), an option that does
            # not convert, an interaction Discord no longer takes answers to: one line. A fault
            # in Parley's own code keeps its traceback.
            if isinstance(error, app_commands.CommandInvokeError) and not isinstance(
                error.original, discord.HTTPException
            ):
                log.error("Discord command interaction %s failed", interaction.id, exc_info=error)
                return
            log.warning("Discord command interaction %s not answered: %s", interaction.id, error)

        return tree

    async def _sync_commands(self, tree: app_commands.CommandTree[discord.Client]) -> None:
        """Per guild when guild ids are configured (instant), else globally (propagates).

        Only the process that runs shard 0 syncs, so several shard processes don't race.
        """
        settings = self.settings
        if settings.discord_shard_ids and 0 not in settings.discord_shard_ids:
            return
        try:
            if settings.discord_guild_ids:
                for guild_id in settings.discord_guild_ids:
                    guild = discord.Object(id=guild_id)
                    tree.copy_global_to(guild=guild)
                    await tree.sync(guild=guild)
            else:
                await tree.sync()
        except discord.HTTPException as e:
            log.error("could not sync Discord slash commands: %s", e)

    def _interaction_place(self, interaction: discord.Interaction[discord.Client]) -> Place:
        channel = interaction.channel
        if channel is not None:
            return _place(channel, interaction.guild_id)
        return Place(interaction.guild_id, interaction.channel_id or 0)

    async def _slash(
        self, interaction: discord.Interaction[discord.Client], name: str, args: str
    ) -> None:
        """A slash command: the core decides who may run it, and answers."""
        user = interaction.user
        place = self._interaction_place(interaction)
        turn = Turn(
            key=conversation_key(place),
            user_id=str(user.id),
            user_name=user.display_name,
            text="",
            event_id="",
            is_admin=interaction.permissions.administrator,
            roles=_roles(user),
            in_dm=place.is_dm,
        )
        await self._answer(interaction, self.parley.conversation.command(turn, name, args))

    async def _answer(
        self,
        interaction: discord.Interaction[discord.Client],
        reply: str | Awaitable[CommandReply],
    ) -> None:
        """Answer ephemerally; defer first if the core takes longer than DEFER_AFTER."""
        if isinstance(reply, str):
            text = reply
        else:
            work = asyncio.ensure_future(reply)
            done, _ = await asyncio.wait({work}, timeout=DEFER_AFTER)
            if not done:
                await interaction.response.defer(ephemeral=True, thinking=True)
            text = (await work).text  # the core words its own failures
        first, *rest = split_message(text, MAX_CHARS)
        if interaction.response.is_done():
            await interaction.followup.send(first, ephemeral=True, allowed_mentions=NO_PINGS)
        else:
            await interaction.response.send_message(
                first, ephemeral=True, allowed_mentions=NO_PINGS
            )
        for page in rest:
            await interaction.followup.send(page, ephemeral=True, allowed_mentions=NO_PINGS)

    async def _model_choices(
        self, interaction: discord.Interaction[discord.Client], current: str
    ) -> list[app_commands.Choice[str]]:
        place = self._interaction_place(interaction)
        user = interaction.user
        if not self.access.may_use(_asker(place, user)):
            return []
        try:
            names = await asyncio.wait_for(
                self.parley.conversation.model_names(), AUTOCOMPLETE_TIMEOUT
            )
        except Exception as e:  # an empty list beats no answer: Discord shows "loading failed"
            log.warning("model autocomplete without a catalog: %r", e)
            return []
        return [
            app_commands.Choice(name=n[:CHOICE_CHARS], value=n[:CHOICE_CHARS])
            for n in rank_models(current, names)
        ]


def _connection_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the Discord connection ended: %r", task.exception())
