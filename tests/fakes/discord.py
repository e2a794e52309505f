"""A fake Discord for tests: the gateway (websocket) and the REST API on one loopback port.

It speaks the wire protocol discord.py 2.7 speaks (API v10), from Discord's API reference and
/work/shared/TESTING.md, so the real discord.py client runs against it unchanged once
`Route.BASE` and `DiscordWebSocket.DEFAULT_GATEWAY` point here. It keeps a small world — one
guild with a text channel, roles and members, DMs, threads the bot starts, every message — and
records every REST request so tests assert on what Discord would have received.

Deliberate wire details (what Discord does and discord.py relies on):

* JSON responses carry `Content-Type: application/json` exactly: discord.py parses nothing else.
* Success responses carry `X-RateLimit-*` headers; a scripted rate limit answers 429 with
  `Retry-After`, `X-RateLimit-*`, `Via: 1.1 google` and `{"message", "retry_after", "global"}`
  (without `Via` discord.py takes a 429 for a Cloudflare ban and raises instead of waiting).
* A message's pings are worked out as Discord does: from its content, filtered by the request's
  `allowed_mentions` (absent → the defaults, which ping everything written) — on edits too.
* The bot's own messages come back through the gateway (MESSAGE_CREATE / MESSAGE_UPDATE), as
  they do on Discord.
* IDENTIFY with the Message Content intent when the fake does not grant it → close code 4014.
* Messages keep their `components` (action rows of buttons, validated as Discord does); an edit
  without `components` leaves them, `components: []` removes them. A button press is an
  INTERACTION_CREATE of type 3 carrying the message as it is now, and only a button the message
  really carries can be pressed; it is acked with a callback of type 6 (deferred update) or 7.
* Every identified gateway connection gets every dispatch of the guilds its shard owns: two
  plain (unsharded) clients on one token both get everything, as a duplicated delivery would.
* `message_event` and `interaction_event` build a dispatch's payload without sending it, so a
  test can break it first; `dispatch` sends any JSON, however malformed, as the gateway would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

__all__ = ["FakeDiscord", "Recorded"]

T = TypeVar("T")
Json = dict[str, Any]

API = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
MESSAGE_CONTENT_INTENT = 1 << 15
APP_FLAG_MESSAGE_CONTENT_LIMITED = 1 << 19
EPHEMERAL = 1 << 6

# Interaction types, and the callback types each may answer with
APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT = 2, 3, 4, 5
CALLBACKS_ALLOWED = {
    APPLICATION_COMMAND: {4, 5, 9},
    MESSAGE_COMPONENT: {4, 5, 6, 7, 9},
    AUTOCOMPLETE: {8},
    MODAL_SUBMIT: {4, 5, 6, 7},
}
ACTION_ROW, BUTTON = 1, 2
LINK_STYLE = 5

# Permission bits (Discord's permission flags)
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
USE_APPLICATION_COMMANDS = 1 << 31
CREATE_PUBLIC_THREADS = 1 << 35
SEND_MESSAGES_IN_THREADS = 1 << 38
ADMINISTRATOR = 1 << 3
MEMBER_PERMISSIONS = (
    VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | USE_APPLICATION_COMMANDS
    | CREATE_PUBLIC_THREADS
    | SEND_MESSAGES_IN_THREADS
)

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_EVERYONE = re.compile(r"@(everyone|here)\b")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    # exactly application/json: discord.py does not parse "application/json; charset=utf-8"
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        headers={**(headers or {}), "Content-Type": "application/json"},
    )


def _error(status: int, message: str, code: int = 0) -> web.Response:
    return _json_response({"message": message, "code": code}, status=status)


def _components_problem(components: Any) -> str | None:
    """What Discord would refuse in a message's `components` (None: fine, or absent)."""
    if components is None:
        return None
    if not isinstance(components, list) or len(components) > 5:
        return "a message has at most 5 action rows"
    seen: set[str] = set()
    for row in components:
        if not isinstance(row, dict) or row.get("type") != ACTION_ROW:
            return "top-level components must be action rows"
        children = row.get("components")
        if not isinstance(children, list) or not 1 <= len(children) <= 5:
            return "an action row holds 1 to 5 components"
        for item in children:
            if item.get("type") != BUTTON:
                continue  # selects and the rest: not checked here
            style, custom_id = item.get("style"), item.get("custom_id")
            if style not in (1, 2, 3, 4, 5, 6):
                return f"unknown button style {style!r}"
            if style == LINK_STYLE:
                if not item.get("url") or custom_id is not None:
                    return "a link button has a url and no custom_id"
            elif style != 6:  # premium buttons carry a sku_id instead
                if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 100:
                    return "a button's custom_id is 1 to 100 characters"
                if custom_id in seen:
                    return "custom_ids must be unique within a message"
                seen.add(custom_id)
            if len(item.get("label") or "") > 80:
                return "a button's label is at most 80 characters"
            if not item.get("label") and not item.get("emoji"):
                return "a button needs a label or an emoji"
    return None


@dataclass(frozen=True)
class Recorded:
    """One REST request as Discord would have received it."""

    method: str
    path: str  # after /api/v10, e.g. /channels/1/messages
    query: dict[str, str]
    json: Any  # the parsed body, or None
    time: float  # the event loop's clock when it arrived
    status: int = 0  # what the fake answered


@dataclass
class _RateLimitRule:
    method: str
    path: re.Pattern[str]
    times: int
    retry_after: float
    exhaust: bool  # True: 200 with Remaining 0; False: 429


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    shard: tuple[int, int] = (0, 1)
    identified: asyncio.Event = field(default_factory=asyncio.Event)
    seq: int = 0
    session_id: str = ""


@dataclass(frozen=True)
class Dispatched:
    """One gateway dispatch as one connection received it."""

    session_id: str
    event: str
    data_id: str | None  # the dispatched object's `id`, when it has one


class FakeDiscord:
    """`async with FakeDiscord() as fake:`, then point discord.py at `.api_url`, `.gateway_url`."""

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        grant_message_content: bool = True,
        bucket_size: int = 5,
    ) -> None:
        """`bucket_size`: the requests each rate-limit bucket (a route in a channel) takes per
        5 s, as success responses report it; Discord's is 5 (edits: one a second)."""
        self.token = token
        self.grant_message_content = grant_message_content
        self.bucket_size = bucket_size
        self._ids = itertools.count(1)
        self.requests: list[Recorded] = []
        self.identifies: list[Json] = []
        self.commands: dict[str, list[Json]] = {}  # "global" or guild id → synced commands
        self.callbacks: dict[str, list[Json]] = {}  # interaction id → callback bodies
        self.dispatched: list[Dispatched] = []  # every dispatch, per connection
        self._interaction_channels: dict[str, str] = {}
        self._interaction_kinds: dict[str, int] = {}
        self._interaction_messages: dict[str, str] = {}  # component interaction → message id
        self.messages: dict[str, Json] = {}  # every message, by id
        self.channels: dict[str, Json] = {}
        self.members: dict[str, Json] = {}  # user id → guild member (without user)
        self.users: dict[str, Json] = {}
        self._rules: list[_RateLimitRule] = []
        self._sockets: list[_Socket] = []
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

        self.bot = self._user("Parley", bot=True)
        self.application_id = self.bot["id"]
        self.owner = self.add_user("owner")
        self.guild_id = self._snowflake()
        self.roles: dict[str, Json] = {}
        self.everyone_role = self.add_role(
            "@everyone", permissions=MEMBER_PERMISSIONS, role_id=self.guild_id
        )
        self.admin_role = self.add_role("Admins", permissions=ADMINISTRATOR | MEMBER_PERMISSIONS)
        self.bot_role = self.add_role("Parley", permissions=MEMBER_PERMISSIONS, managed=True)
        self.members[self.bot["id"]] = self._member_data(self.bot["id"], [self.bot_role])
        self.members[self.owner["id"]] = self._member_data(self.owner["id"], [])
        self.channel_id = self.add_channel("general")
        self.thread_ids: list[str] = []
        self.files: dict[str, bytes] = {}  # attachment id → bytes, on the CDN
        self.file_downloads: list[str] = []

    # --- lifecycle ---

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", API + "/{tail:.*}", self._rest)
        app.router.add_get("/attachments/{channel}/{id}/{filename}", self._attachment_file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        for sock in list(self._sockets):
            await sock.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return self.url + API

    # --- attachments (Discord's CDN) ---

    def attachment(self, filename: str, data: bytes, content_type: str | None) -> Json:
        """A file on a message: the object `attachments[]` carries, its URL signed as Discord's
        CDN signs them (`ex`, `is`, `hm`); `forget_attachment` makes it answer 404."""
        attachment_id = self._snowflake()
        self.files[attachment_id] = data
        url = (
            f"{self.url}/attachments/{self.channel_id}/{attachment_id}/{filename}"
            f"?ex={int(time.time()) + 86400:x}&is={int(time.time()):x}&hm={attachment_id[-8:]}&"
        )
        found: Json = {
            "id": attachment_id,
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url.replace("/attachments/", "/proxy/attachments/"),
        }
        if content_type is not None:
            found["content_type"] = content_type
        return found

    def forget_attachment(self, attachment: Json) -> None:
        self.files.pop(attachment["id"], None)

    async def _attachment_file(self, request: web.Request) -> web.StreamResponse:
        self.file_downloads.append(request.path)
        data = self.files.get(request.match_info["id"])
        if data is None or "hm" not in request.query:
            return web.Response(status=404, text="This content is no longer available.")
        return web.Response(body=data, content_type="application/octet-stream")

    @property
    def gateway_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/gateway"

    # --- the world ---

    def _snowflake(self) -> str:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) | (next(self._ids) & 0x3FFFFF))

    def _user(self, username: str, *, bot: bool = False) -> Json:
        user: Json = {
            "id": self._snowflake(),
            "username": username.lower(),
            "discriminator": "0",
            "global_name": None if bot else username.capitalize(),
            "avatar": None,
            "bot": bot,
            "system": False,
            "public_flags": 0,
            "flags": 0,
            "banner": None,
            "accent_color": None,
            "avatar_decoration_data": None,
            "collectibles": None,
            "primary_guild": None,
        }
        self.users[user["id"]] = user
        return user

    def add_user(
        self,
        username: str,
        *,
        bot: bool = False,
        roles: list[str] | None = None,
        nick: str | None = None,
        member: bool = True,
    ) -> Json:
        """A person (or another bot) who can talk; a guild member unless member=False."""
        user = self._user(username, bot=bot)
        if member:
            self.members[user["id"]] = self._member_data(user["id"], roles or [], nick=nick)
        return user

    def add_role(
        self, name: str, *, permissions: int = 0, managed: bool = False, role_id: str | None = None
    ) -> str:
        rid = role_id or self._snowflake()
        self.roles[rid] = {
            "id": rid,
            "name": name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": len(self.roles),
            "permissions": str(permissions),
            "managed": managed,
            "mentionable": False,
            "flags": 0,
            **({"tags": {"bot_id": self.bot["id"]}} if managed else {}),
        }
        return rid

    def add_channel(self, name: str, *, deny_bot: int = 0) -> str:
        """A text channel; `deny_bot` permission bits are denied to the bot's role there."""
        cid = self._snowflake()
        overwrites = (
            [{"id": self.bot_role, "type": 0, "allow": "0", "deny": str(deny_bot)}]
            if deny_bot
            else []
        )
        self.channels[cid] = {
            "id": cid,
            "type": 0,
            "guild_id": self.guild_id,
            "name": name,
            "position": len(self.channels),
            "permission_overwrites": overwrites,
            "topic": None,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "default_auto_archive_duration": 1440,
            "flags": 0,
        }
        return cid

    def _member_data(self, user_id: str, roles: list[str], *, nick: str | None = None) -> Json:
        return {
            "nick": nick,
            "avatar": None,
            "banner": None,
            "roles": roles,
            "joined_at": "2025-01-01T00:00:00.000000+00:00",
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
            "avatar_decoration_data": None,
        }

    def _member_payload(self, user_id: str) -> Json:
        """A member as it appears inside a message (no `user` key) or an interaction."""
        return dict(self.members[user_id])

    def _permissions_of(self, user_id: str) -> int:
        member = self.members.get(user_id)
        if member is None:
            return 0
        if user_id == self.owner["id"]:
            return (1 << 41) - 1
        value = int(self.roles[self.guild_id]["permissions"])
        for rid in member["roles"]:
            value |= int(self.roles[rid]["permissions"])
        if value & ADMINISTRATOR:
            return (1 << 41) - 1
        return value

    def _guild_payload(self) -> Json:
        members = [{**self.members[uid], "user": self.users[uid]} for uid in self.members]
        guild_channels = [c for c in self.channels.values() if c["type"] in (0, 2, 4, 5, 15)]
        threads = [c for c in self.channels.values() if c["type"] in (10, 11, 12)]
        return {
            "id": self.guild_id,
            "name": "Parley Test Guild",
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": self.owner["id"],
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 1,
            "explicit_content_filter": 0,
            "roles": list(self.roles.values()),
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": self.channel_id,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "max_members": 500000,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "joined_at": "2025-01-01T00:00:00.000000+00:00",
            "large": False,
            "unavailable": False,
            "member_count": len(members),
            "voice_states": [],
            "members": members,
            "channels": guild_channels,
            "threads": threads,
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def dm_channel_id(self, user: Json) -> str:
        """The DM channel between the bot and `user` (created on first use)."""
        for cid, channel in self.channels.items():
            if channel["type"] == 1 and channel["recipients"][0]["id"] == user["id"]:
                return cid
        cid = self._snowflake()
        self.channels[cid] = {
            "id": cid,
            "type": 1,
            "last_message_id": None,
            "flags": 0,
            "recipients": [user],
        }
        return cid

    def _channel_guild(self, channel_id: str) -> str | None:
        channel = self.channels.get(channel_id)
        return None if channel is None else channel.get("guild_id")

    # --- waiting ---

    async def _record(self, entry: Recorded) -> None:
        async with self._changed:
            self.requests.append(entry)
            self._changed.notify_all()

    async def _touch(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[FakeDiscord], T], within: float = 5.0) -> T:
        """Wait until `predicate(self)` is truthy (re-checked on every request); return it."""
        async with asyncio.timeout(within), self._changed:
            return await self._changed.wait_for(lambda: predicate(self))

    def calls(self, method: str, pattern: str = "") -> list[Recorded]:
        """Recorded requests with this method whose path matches `pattern` (a regex)."""
        return [
            r for r in self.requests if r.method == method and re.fullmatch(pattern or ".*", r.path)
        ]

    def bot_messages(self, channel_id: str | None = None) -> list[Json]:
        """The bot's channel messages as Discord holds them now (after edits), oldest first.

        Ephemeral interaction answers are not in a channel: see `interaction_replies`.
        """
        found = [
            m
            for m in self.messages.values()
            if m["author"]["id"] == self.bot["id"]
            and not m["flags"] & EPHEMERAL
            and (channel_id is None or m["channel_id"] == channel_id)
        ]
        return sorted(found, key=lambda m: int(m["id"]))

    def replies_to(self, message_id: str) -> list[Json]:
        """The bot's messages that reply to `message_id`, as Discord holds them now."""
        return [
            m
            for m in self.bot_messages()
            if (m.get("message_reference") or {}).get("message_id") == message_id
        ]

    def reply_posts(self, message_id: str) -> list[Recorded]:
        """The requests that posted a reply to `message_id` (refused ones included)."""
        return [
            r
            for r in self.calls("POST", r"/channels/\d+/messages")
            if isinstance(r.json, dict)
            and str((r.json.get("message_reference") or {}).get("message_id")) == message_id
        ]

    # --- rate limits ---

    def rate_limit(
        self, method: str, path: str, *, retry_after: float = 0.3, times: int = 1
    ) -> None:
        """Answer the next `times` matching requests with a 429 (not applied)."""
        self._rules.append(_RateLimitRule(method, re.compile(path), times, retry_after, False))

    def exhaust(self, method: str, path: str, *, reset_after: float = 0.3, times: int = 1) -> None:
        """Apply the next `times` matching requests but report the bucket empty for reset_after."""
        self._rules.append(_RateLimitRule(method, re.compile(path), times, reset_after, True))

    def _rule_for(self, method: str, path: str) -> _RateLimitRule | None:
        for rule in self._rules:
            if rule.times > 0 and rule.method == method and rule.path.fullmatch(path):
                rule.times -= 1
                return rule
        return None

    @staticmethod
    def _bucket(method: str, path: str) -> str:
        template = re.sub(r"/\d+", "/:id", path)
        return f"{abs(hash((method, template))):x}"[:16]

    def _ratelimit_headers(
        self, method: str, path: str, *, remaining: int, reset_after: float
    ) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.bucket_size),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": self._bucket(method, path),
        }

    # --- gateway ---

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        sock = _Socket(ws)
        self._sockets.append(sock)
        try:
            await self._send(
                sock, {"op": 10, "d": {"heartbeat_interval": 45000}, "s": None, "t": None}
            )
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                op = payload.get("op")
                if op == 1:
                    await self._send(sock, {"op": 11, "d": None, "s": None, "t": None})
                elif op == 2:
                    await self._identify(sock, payload["d"])
                elif op == 6:
                    await self._dispatch_to(sock, "RESUMED", {})
        finally:
            self._sockets.remove(sock)
        return ws

    async def _send(self, sock: _Socket, payload: Json) -> None:
        if not sock.ws.closed:
            await sock.ws.send_str(json.dumps(payload))

    async def _dispatch_to(self, sock: _Socket, event: str, data: Any) -> None:
        sock.seq += 1
        data_id = data.get("id") if isinstance(data, dict) else None
        self.dispatched.append(Dispatched(sock.session_id, event, data_id))
        await self._send(sock, {"op": 0, "t": event, "s": sock.seq, "d": data})

    @property
    def sessions(self) -> list[str]:
        """The session ids of the gateway connections that are ready for dispatches (identified
        and sent their guilds), oldest first."""
        return [sock.session_id for sock in self._sockets if sock.identified.is_set()]

    def deliveries(self, event: str, data_id: str) -> list[str]:
        """The sessions (connections) that received dispatch `event` of object `data_id`."""
        return [d.session_id for d in self.dispatched if d.event == event and d.data_id == data_id]

    async def _identify(self, sock: _Socket, data: Json) -> None:
        self.identifies.append(data)
        await self._touch()
        if data["intents"] & MESSAGE_CONTENT_INTENT and not self.grant_message_content:
            await sock.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        shard = data.get("shard") or [0, 1]
        sock.shard = (int(shard[0]), int(shard[1]))
        sock.session_id = f"session-{next(self._ids)}"
        ready: Json = {
            "v": 10,
            "user": self.bot,
            "guilds": [{"id": self.guild_id, "unavailable": True}]
            if self._owns_guild(sock)
            else [],
            "session_id": sock.session_id,
            "resume_gateway_url": self.gateway_url,
            "application": {
                "id": self.application_id,
                "flags": APP_FLAG_MESSAGE_CONTENT_LIMITED if self.grant_message_content else 0,
            },
            "private_channels": [],
            "relationships": [],
            "user_settings": {},
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "auth": {},
            "_trace": ["fake-discord"],
        }
        if data.get("shard"):
            ready["shard"] = list(sock.shard)
        await self._dispatch_to(sock, "READY", ready)
        if self._owns_guild(sock):
            await self._dispatch_to(sock, "GUILD_CREATE", self._guild_payload())
        sock.identified.set()
        await self._touch()

    def _owns_guild(self, sock: _Socket, guild_id: str | None = None) -> bool:
        """Discord routes a guild's events to shard (guild_id >> 22) % shard_count."""
        shard_id, count = sock.shard
        return (int(guild_id or self.guild_id) >> 22) % count == shard_id

    async def dispatch(
        self, event: str, data: Any, *, guild_id: str | None = None, session: str | None = None
    ) -> None:
        """Send a dispatch to the shard that owns `guild_id` (shard 0 for DMs): to every such
        connection, or only to `session`'s (as Discord delivers an interaction to one). `data`
        is sent as it is, whatever its shape."""
        for sock in list(self._sockets):
            if not sock.identified.is_set() or session not in (None, sock.session_id):
                continue
            if guild_id is None:
                if sock.shard[0] != 0:
                    continue
            elif not self._owns_guild(sock, guild_id):
                continue
            await self._dispatch_to(sock, event, data)

    def _later(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- messages ---

    def _pings(
        self, content: str, allowed: Json | None, replied_user: str | None
    ) -> tuple[list[str], list[str], bool]:
        """(user ids, role ids, everyone) that this content pings under `allowed_mentions`."""
        users = list(dict.fromkeys(_USER_MENTION.findall(content)))
        roles = list(dict.fromkeys(_ROLE_MENTION.findall(content)))
        everyone = bool(_EVERYONE.search(content))
        if allowed is None:  # Discord's defaults: everything written pings, replies ping
            return users + ([replied_user] if replied_user else []), roles, everyone
        parse = allowed.get("parse", [])
        listed_users, listed_roles = allowed.get("users", []), allowed.get("roles", [])
        pinged_users = users if "users" in parse else [u for u in users if u in listed_users]
        pinged_roles = roles if "roles" in parse else [r for r in roles if r in listed_roles]
        if replied_user and allowed.get("replied_user"):
            pinged_users.append(replied_user)
        return pinged_users, pinged_roles, everyone and "everyone" in parse

    def _message(
        self,
        *,
        channel_id: str,
        author: Json,
        content: str,
        reference: Json | None = None,
        allowed_mentions: Json | None = None,
        flags: int = 0,
        webhook_id: str | None = None,
        application_id: str | None = None,
        interaction_metadata: Json | None = None,
        components: list[Json] | None = None,
    ) -> Json:
        guild_id = self._channel_guild(channel_id)
        referenced = self.messages.get(reference["message_id"]) if reference else None
        replied_user = referenced["author"]["id"] if referenced else None
        user_ids, role_ids, everyone = self._pings(content, allowed_mentions, replied_user)
        mentions = []
        for uid in dict.fromkeys(user_ids):
            user = self.users.get(uid)
            if user is None:
                continue
            mention = dict(user)
            if guild_id and uid in self.members:
                mention["member"] = self._member_payload(uid)
            mentions.append(mention)
        message: Json = {
            "id": self._snowflake(),
            "type": 19 if reference else 0,
            "channel_id": channel_id,
            "author": author,
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": everyone,
            "mentions": mentions,
            "mention_roles": role_ids,
            "mention_channels": [],
            "attachments": [],
            "embeds": [],
            "reactions": [],
            "pinned": False,
            "flags": flags,
            "components": components or [],
            "sticker_items": [],
            "nonce": None,
        }
        if guild_id:
            message["guild_id"] = guild_id
            if author["id"] in self.members and not webhook_id:
                message["member"] = self._member_payload(author["id"])
        if webhook_id:
            message["webhook_id"] = webhook_id
        if application_id:
            message["application_id"] = application_id
        if interaction_metadata:
            message["interaction_metadata"] = interaction_metadata
        if reference:
            message["message_reference"] = {
                "type": 0,
                "message_id": reference["message_id"],
                "channel_id": reference.get("channel_id", channel_id),
                **({"guild_id": guild_id} if guild_id else {}),
            }
            message["referenced_message"] = (
                {k: v for k, v in referenced.items() if k != "referenced_message"}
                if referenced
                else None
            )
        channel = self.channels.get(channel_id)
        if channel is not None:
            channel["last_message_id"] = message["id"]
            if channel["type"] in (10, 11, 12):
                channel["message_count"] += 1
                channel["total_message_sent"] += 1
        self.messages[message["id"]] = message
        return message

    def message_event(
        self,
        author: Json,
        content: str,
        *,
        channel_id: str | None = None,
        reply_to: str | None = None,
    ) -> Json:
        """`author` writes `content` in a channel, thread or DM (`dm_channel_id`): the message is
        kept, and its MESSAGE_CREATE payload returned undispatched (a deep copy, to break as a
        test likes).

        `reply_to` makes it a reply (which pings the replied-to author, Discord's default)."""
        channel_id = channel_id or self.channel_id
        reference = {"message_id": reply_to, "channel_id": channel_id} if reply_to else None
        message = self._message(
            channel_id=channel_id, author=author, content=content, reference=reference
        )
        payload: Json = json.loads(json.dumps(message))
        return payload

    async def say(
        self,
        author: Json,
        content: str,
        *,
        channel_id: str | None = None,
        reply_to: str | None = None,
        withheld: bool = False,
        attachments: list[Json] | None = None,
    ) -> Json:
        """`author` writes `content` in a guild channel or thread; the bot gets MESSAGE_CREATE.

        `reply_to` makes it a reply (which pings the replied-to author, Discord's default);
        `withheld` blanks the content as Discord does for a bot without the Message Content intent;
        `attachments` (see `attachment`) go with the message.
        """
        payload = self.message_event(author, content, channel_id=channel_id, reply_to=reply_to)
        if attachments:
            payload["attachments"] = attachments
            self.messages[payload["id"]]["attachments"] = attachments
        if withheld:
            payload.update(content="", embeds=[], attachments=[], components=[])
        guild_id = self._channel_guild(payload["channel_id"])
        await self.dispatch("MESSAGE_CREATE", payload, guild_id=guild_id)
        return self.messages[payload["id"]]

    async def dm(self, author: Json, content: str, *, reply_to: str | None = None) -> Json:
        """`author` writes to the bot in a DM."""
        channel_id = self.dm_channel_id(author)
        reference = {"message_id": reply_to, "channel_id": channel_id} if reply_to else None
        message = self._message(
            channel_id=channel_id, author=author, content=content, reference=reference
        )
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    # --- interactions ---

    def _interaction(
        self, user: Json, kind: int, data: Json, channel_id: str | None
    ) -> tuple[str, str, Json]:
        channel_id = channel_id or self.channel_id
        channel = self.channels[channel_id]
        guild_id = channel.get("guild_id")
        iid = self._snowflake()
        token = f"interaction-token-{iid}"
        payload: Json = {
            "id": iid,
            "application_id": self.application_id,
            "type": kind,
            "data": data,
            "channel_id": channel_id,
            "channel": channel,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": guild_id} if guild_id else {"1": user["id"]},
            "context": 0 if guild_id else 1,
            "attachment_size_limit": 10485760,
            "app_permissions": str(self._permissions_of(self.bot["id"])),
        }
        if guild_id:
            payload["guild_id"] = guild_id
            payload["guild"] = {"id": guild_id, "locale": "en-US", "features": []}
            payload["guild_locale"] = "en-US"
            payload["member"] = {
                **self._member_payload(user["id"]),
                "user": user,
                "permissions": str(self._permissions_of(user["id"])),
            }
        else:
            payload["user"] = user
        self.callbacks[iid] = []
        self._interaction_channels[iid] = channel_id
        self._interaction_kinds[iid] = kind
        return iid, token, payload

    def interaction_event(
        self,
        user: Json,
        kind: int,
        data: Any,
        *,
        channel_id: str | None = None,
        message_id: str | None = None,
    ) -> Json:
        """The INTERACTION_CREATE payload of `user`'s interaction of type `kind` carrying `data`
        (any JSON), on the message `message_id` if given: undispatched, answerable, and a deep
        copy to break as a test likes."""
        iid, _, payload = self._interaction(user, kind, data, channel_id)
        if message_id is not None:
            payload["message"] = self.messages[message_id]
            self._interaction_messages[iid] = message_id
        copied: Json = json.loads(json.dumps(payload))
        return copied

    def command_data(
        self, name: str, options: list[Json], *, channel_id: str | None = None
    ) -> Json:
        """The `data` of a slash command `name` (as synced) with these options."""
        return self._command_data(name, options, channel_id)

    def _command_data(self, name: str, options: list[Json], channel_id: str | None) -> Json:
        guild_id = self._channel_guild(channel_id or self.channel_id)
        synced = self.commands.get(guild_id or "", []) if guild_id else []
        scope = guild_id if any(c["name"] == name for c in synced) else None
        command = next(
            (c for c in self.commands.get(scope or "global", []) if c["name"] == name), None
        )
        data: Json = {
            "id": command["id"] if command else self._snowflake(),
            "name": name,
            "type": 1,
            "options": options,
        }
        if scope:
            data["guild_id"] = scope
        return data

    async def slash(
        self,
        user: Json,
        name: str,
        options: dict[str, str] | None = None,
        *,
        channel_id: str | None = None,
    ) -> str:
        """`user` runs `/name` with string options; returns the interaction id."""
        opts = [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()]
        data = self._command_data(name, opts, channel_id)
        iid, _, payload = self._interaction(user, 2, data, channel_id)
        await self.dispatch(
            "INTERACTION_CREATE",
            payload,
            guild_id=self._channel_guild(channel_id or self.channel_id),
        )
        return iid

    async def autocomplete(
        self, user: Json, name: str, option: str, value: str, *, channel_id: str | None = None
    ) -> str:
        """`user` types `value` into `/name`'s `option`; returns the interaction id."""
        opts = [{"name": option, "type": 3, "value": value, "focused": True}]
        data = self._command_data(name, opts, channel_id)
        iid, _, payload = self._interaction(user, 4, data, channel_id)
        await self.dispatch(
            "INTERACTION_CREATE",
            payload,
            guild_id=self._channel_guild(channel_id or self.channel_id),
        )
        return iid

    async def press(
        self, user: Json, message_id: str, custom_id: str, *, session: str | None = None
    ) -> str:
        """`user` presses the button `custom_id` on a message; returns the interaction id.

        Only a button the message carries now can be pressed (Discord sends no interaction for
        a component that is gone): anything else raises ValueError. `session`: deliver it to
        that gateway connection only (another replica than the one writing the reply).
        """
        message = self.messages[message_id]
        buttons = [
            c
            for row in message["components"]
            for c in row.get("components", [])
            if c.get("type") == BUTTON
        ]
        button = next((b for b in buttons if b.get("custom_id") == custom_id), None)
        if button is None or button.get("disabled"):
            raise ValueError(f"message {message_id} has no enabled button {custom_id!r}")
        data: Json = {"custom_id": custom_id, "component_type": BUTTON}
        payload = self.interaction_event(
            user, MESSAGE_COMPONENT, data, channel_id=message["channel_id"], message_id=message_id
        )
        await self.dispatch(
            "INTERACTION_CREATE",
            payload,
            guild_id=self._channel_guild(message["channel_id"]),
            session=session,
        )
        return str(payload["id"])

    def interaction_replies(self, iid: str) -> list[str]:
        """Everything the bot answered to an interaction: callback and follow-up contents."""
        texts = [
            body["data"]["content"]
            for body in self.callbacks.get(iid, [])
            if body.get("type") == 4 and body.get("data", {}).get("content") is not None
        ]
        token = f"interaction-token-{iid}"
        for r in self.requests:
            if (
                token in r.path
                and "/callback" not in r.path
                and r.method in ("POST", "PATCH")
                and isinstance(r.json, dict)
                and r.json.get("content") is not None
            ):
                texts.append(r.json["content"])
        return texts

    # --- REST ---

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body = await request.read()
        parsed: Any = None
        if body and request.content_type == "application/json":
            parsed = json.loads(body)
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        if request.headers.get("Authorization") != f"Bot {self.token}" and not path.startswith(
            ("/interactions/", "/webhooks/")
        ):
            response: web.StreamResponse = _error(401, "401: Unauthorized")
        else:
            response = await self._route(request.method, path, parsed, dict(request.query))
        await self._record(
            Recorded(request.method, path, dict(request.query), parsed, arrived, response.status)
        )
        return response

    async def _route(
        self, method: str, path: str, body: Any, query: dict[str, str]
    ) -> web.StreamResponse:
        rule = self._rule_for(method, path)
        if rule is not None and not rule.exhaust:
            headers = {
                **self._ratelimit_headers(method, path, remaining=0, reset_after=rule.retry_after),
                "Retry-After": str(math.ceil(rule.retry_after)),
                "X-RateLimit-Scope": "user",
                "Via": "1.1 google",
            }
            return _json_response(
                {
                    "message": "You are being rate limited.",
                    "retry_after": rule.retry_after,
                    "global": False,
                },
                status=429,
                headers=headers,
            )
        response = await self._handle(method, path, body, query)
        if 200 <= response.status < 300:
            if rule is not None:
                response.headers.update(
                    self._ratelimit_headers(method, path, remaining=0, reset_after=rule.retry_after)
                )
            else:
                response.headers.update(
                    self._ratelimit_headers(
                        method, path, remaining=self.bucket_size - 1, reset_after=5.0
                    )
                )
        return response

    async def _handle(
        self, method: str, path: str, body: Any, query: dict[str, str]
    ) -> web.Response:
        parts = path.strip("/").split("/")
        match method, parts:
            case "GET", ["users", "@me"]:
                return _json_response(self.bot)
            case "GET", ["oauth2", "applications", "@me"]:
                return _json_response(self._application())
            case "GET", ["gateway"]:
                return _json_response({"url": self.gateway_url})
            case "GET", ["gateway", "bot"]:
                return _json_response(
                    {
                        "url": self.gateway_url,
                        "shards": 1,
                        "session_start_limit": {
                            "total": 1000,
                            "remaining": 999,
                            "reset_after": 86400000,
                            "max_concurrency": 1,
                        },
                    }
                )
            case "GET", ["channels", cid]:
                channel = self.channels.get(cid)
                return _json_response(channel) if channel else _error(404, "Unknown Channel", 10003)
            case "POST", ["channels", cid, "typing"]:
                if cid not in self.channels:
                    return _error(404, "Unknown Channel", 10003)
                return web.Response(status=204)
            case "POST", ["channels", cid, "messages"]:
                return await self._create_message(cid, body)
            case "GET", ["channels", cid, "messages", mid]:
                found = self.messages.get(mid)
                if found is None or found["channel_id"] != cid:
                    return _error(404, "Unknown Message", 10008)
                return _json_response(found)
            case "PATCH", ["channels", cid, "messages", mid]:
                return await self._edit_message(cid, mid, body)
            case "POST", ["channels", cid, "messages", mid, "threads"]:
                return await self._start_thread(cid, mid, body)
            case "PUT", ["applications", _app, "commands"]:
                return self._sync("global", body)
            case "PUT", ["applications", _app, "guilds", gid, "commands"]:
                return self._sync(gid, body)
            case "POST", ["interactions", iid, _token, "callback"]:
                return self._callback(iid, body)
            case "POST", ["webhooks", _app, token]:
                return self._followup(token, body)
            case "PATCH", ["webhooks", _app, token, "messages", "@original"]:
                return self._followup(token, body)
        return _error(404, "404: Not Found")

    def _application(self) -> Json:
        return {
            "id": self.application_id,
            "name": "Parley",
            "icon": None,
            "description": "",
            "rpc_origins": [],
            "bot_public": True,
            "bot_require_code_grant": False,
            "bot": self.bot,
            "terms_of_service_url": None,
            "privacy_policy_url": None,
            "owner": self.owner,
            "verify_key": "0" * 64,
            "team": None,
            "guild_id": None,
            "flags": APP_FLAG_MESSAGE_CONTENT_LIMITED if self.grant_message_content else 0,
            "tags": [],
            "install_params": None,
            "custom_install_url": None,
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "approximate_guild_count": 1,
        }

    def _validate_content(self, body: Any) -> web.Response | None:
        if not isinstance(body, dict):
            return _error(400, "Cannot send an empty message", 50006)
        problem = _components_problem(body.get("components"))
        if problem is not None:
            return _json_response(
                {"message": "Invalid Form Body", "code": 50035, "errors": {"components": problem}},
                status=400,
            )
        content = body.get("content")
        if content is not None and len(content) > 2000:
            return _json_response(
                {
                    "message": "Invalid Form Body",
                    "code": 50035,
                    "errors": {
                        "content": {
                            "_errors": [
                                {
                                    "code": "BASE_TYPE_MAX_LENGTH",
                                    "message": "Must be 2000 or fewer in length.",
                                }
                            ]
                        }
                    },
                },
                status=400,
            )
        return None

    async def _create_message(self, cid: str, body: Any) -> web.Response:
        if cid not in self.channels:
            return _error(404, "Unknown Channel", 10003)
        invalid = self._validate_content(body)
        if invalid is not None:
            return invalid
        if not body.get("content") and not body.get("embeds"):
            return _error(400, "Cannot send an empty message", 50006)
        reference = body.get("message_reference")
        if reference is not None:  # ids may come as numbers or strings
            reference = {k: str(v) if k.endswith("_id") else v for k, v in reference.items()}
        if reference is not None and reference.get("message_id") not in self.messages:
            if reference.get("fail_if_not_exists", True):
                return _error(400, "Invalid Form Body", 50035)
            reference = None
        message = self._message(
            channel_id=cid,
            author=self.bot,
            content=body.get("content") or "",
            reference=reference,
            allowed_mentions=body.get("allowed_mentions"),
            components=body.get("components"),
        )
        self._later(self.dispatch("MESSAGE_CREATE", message, guild_id=self._channel_guild(cid)))
        return _json_response(message)

    async def _edit_message(self, cid: str, mid: str, body: Any) -> web.Response:
        message = self.messages.get(mid)
        if message is None or message["channel_id"] != cid:
            return _error(404, "Unknown Message", 10008)
        if message["author"]["id"] != self.bot["id"]:
            return _error(403, "Cannot edit a message authored by another user", 50005)
        invalid = self._validate_content(body)
        if invalid is not None:
            return invalid
        if "content" in body:
            message["content"] = body["content"] or ""
        if "components" in body:  # absent: unchanged; [] or null: removed
            message["components"] = body["components"] or []
        replied = message.get("referenced_message")
        users, roles, everyone = self._pings(
            message["content"],
            body.get("allowed_mentions"),
            replied["author"]["id"] if replied else None,
        )
        message["mentions"] = [self.users[u] for u in users if u in self.users]
        message["mention_roles"] = roles
        message["mention_everyone"] = everyone
        message["edited_timestamp"] = _now_iso()
        self._later(
            self.dispatch("MESSAGE_UPDATE", dict(message), guild_id=self._channel_guild(cid))
        )
        return _json_response(message)

    async def _start_thread(self, cid: str, mid: str, body: Any) -> web.Response:
        parent = self.channels.get(cid)
        if parent is None or parent["type"] != 0:
            return _error(400, "Cannot execute action on this channel type", 50024)
        if mid in self.channels:
            return _error(400, "A thread has already been created for this message", 160004)
        if mid not in self.messages:
            return _error(404, "Unknown Message", 10008)
        now = _now_iso()
        thread = {
            "id": mid,  # a thread started from a message has the message's id
            "type": 11,
            "guild_id": self.guild_id,
            "parent_id": cid,
            "owner_id": self.bot["id"],
            "name": body["name"],
            "last_message_id": None,
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": body.get("auto_archive_duration", 1440),
                "archive_timestamp": now,
                "locked": False,
                "create_timestamp": now,
            },
            "total_message_sent": 0,
            "flags": 0,
            "member": {"id": mid, "user_id": self.bot["id"], "join_timestamp": now, "flags": 1},
        }
        self.channels[mid] = thread
        self.thread_ids.append(mid)
        self.messages[mid]["thread"] = thread
        self._later(
            self.dispatch(
                "THREAD_CREATE", {**thread, "newly_created": True}, guild_id=self.guild_id
            )
        )
        return _json_response(thread, status=201)

    def _sync(self, scope: str, body: Any) -> web.Response:
        if not isinstance(body, list):
            return _error(400, "Invalid Form Body", 50035)
        previous = {c["name"]: c for c in self.commands.get(scope, [])}
        synced = []
        for command in body:
            old = previous.get(command["name"])
            synced.append(
                {
                    "id": old["id"] if old else self._snowflake(),
                    "application_id": self.application_id,
                    "version": self._snowflake(),
                    "type": command.get("type", 1),
                    "name": command["name"],
                    "description": command.get("description", ""),
                    "options": command.get("options", []),
                    "default_member_permissions": command.get("default_member_permissions"),
                    "dm_permission": command.get("dm_permission", True),
                    "contexts": command.get("contexts"),
                    "integration_types": command.get("integration_types", [0]),
                    "nsfw": command.get("nsfw", False),
                    **({"guild_id": scope} if scope != "global" else {}),
                }
            )
        self.commands[scope] = synced
        return _json_response(synced)

    def _callback(self, iid: str, body: Any) -> web.Response:
        if iid not in self.callbacks:
            return _error(404, "Unknown interaction", 10062)
        if self.callbacks[iid]:
            return _error(400, "Interaction has already been acknowledged.", 40060)
        kind = body.get("type")
        if kind not in CALLBACKS_ALLOWED[self._interaction_kinds[iid]]:
            return _error(400, "Interaction callback type not valid for this interaction", 50035)
        if kind in (4, 7):  # an UPDATE_MESSAGE may leave the content out
            invalid = self._validate_content(
                body.get("data") if kind == 4 else body.get("data") or {}
            )
            if invalid is not None:
                return invalid
        self.callbacks[iid].append(body)
        data = body.get("data") or {}
        flags = int(data.get("flags") or 0)
        interaction: Json = {
            "id": iid,
            "type": self._interaction_kinds[iid],
            "response_message_loading": kind == 5,
            "response_message_ephemeral": bool(flags & EPHEMERAL),
        }
        result: Json = {"interaction": interaction}
        if kind == 7:  # UPDATE_MESSAGE: edit the message the component is on
            pressed = self.messages[self._interaction_messages[iid]]
            if "content" in data:
                pressed["content"] = data["content"] or ""
            if "components" in data:
                pressed["components"] = data["components"] or []
            pressed["edited_timestamp"] = _now_iso()
            guild_id = self._channel_guild(pressed["channel_id"])
            self._later(self.dispatch("MESSAGE_UPDATE", dict(pressed), guild_id=guild_id))
        if kind in (4, 5):
            message = self._message(
                channel_id=self._interaction_channels[iid],
                author=self.bot,
                content=data.get("content") or "",
                allowed_mentions=data.get("allowed_mentions"),
                flags=flags | ((1 << 7) if kind == 5 else 0),
                application_id=self.application_id,
            )
            interaction["response_message_id"] = message["id"]
            result["resource"] = {"type": kind, "message": message}
        return _json_response(result)

    def _followup(self, token: str, body: Any) -> web.Response:
        if not token.startswith("interaction-token-"):
            return _error(401, "Invalid Webhook Token", 50027)
        invalid = self._validate_content(body)
        if invalid is not None:
            return invalid
        iid = token.removeprefix("interaction-token-")
        message = self._message(
            channel_id=self._interaction_channels.get(iid, self.channel_id),
            author=self.bot,
            content=body.get("content") or "",
            allowed_mentions=body.get("allowed_mentions"),
            flags=int(body.get("flags") or 0),
            webhook_id=self.application_id,
            application_id=self.application_id,
        )
        return _json_response(message)
