"""A fake Slack on loopback: the Web API, Socket Mode, and signed HTTP-mode deliveries.

Written from Slack's documented wire shapes (docs.slack.dev: Web API methods, Events API,
Socket Mode, request signing), not from what Parley sends. Every Web API call is recorded with
its method, merged parameters, Authorization header and arrival time; tests wait on the record
through an asyncio.Condition, never on sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

BOT_TOKEN = "xoxb-fake-bot-token"
CHANNEL_GENERAL = "C0GENERAL"
APP_TOKEN = "xapp-1-fake-app-token"
SIGNING_SECRET = "fake-signing-secret"
TEAM_ID = "T0PARLEY"
BOT_USER_ID = "U0PARLEY"
BOT_ID = "B0PARLEY"
APP_ID = "A0PARLEY"

# methods that take the bot token (anything else answers `not_allowed_token_type` to it)
_APP_LEVEL = {"apps.connections.open"}


@dataclass(frozen=True)
class ApiCall:
    """One Web API request as Slack would have received it."""

    method: str
    params: dict[str, Any]
    authorization: str
    at: float  # loop time of arrival
    status: int  # what the fake answered


@dataclass
class PostedMessage:
    """A message as the channel shows it now (after any edits)."""

    channel: str
    ts: str
    thread_ts: str | None
    text: str  # markdown_text when given, else its markdown blocks' text, else text
    edits: int = 0
    streaming: bool = False
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def buttons(self) -> list[tuple[str, dict[str, Any]]]:
        """The buttons the message shows now, as (block_id, button)."""
        return [
            (str(block.get("block_id") or ""), element)
            for block in self.blocks
            if block.get("type") == "actions"
            for element in block.get("elements") or []
            if element.get("type") == "button"
        ]


@dataclass
class FakeSlack:
    """Start with `async with FakeSlack() as slack:`; point the bot at `slack.api_url`."""

    users: dict[str, str] = field(
        default_factory=lambda: {"U0ALICE": "Alice", "U0BOB": "Bob Builder", BOT_USER_ID: "parley"}
    )
    echo: bool = False  # deliver our own posts/edits back as events, as Slack does
    agent: bool = False  # the app is declared an agent (agents.sessions.* allowed)
    agent_stop_subscribed: bool = True  # subscribed to agent_session_stopped
    # method → (calls, seconds) allowed to the workspace (Slack's tiers: chat.update is Tier 3,
    # "50+ per minute"); past it, 429 with Retry-After in whole seconds, as Slack answers
    tiers: dict[str, tuple[int, float]] = field(default_factory=dict)
    http_event_url: str | None = None  # where HTTP-mode deliveries (and echoes) go

    calls: list[ApiCall] = field(default_factory=list)
    messages: dict[tuple[str, str], PostedMessage] = field(default_factory=dict)
    responses: list[dict[str, Any]] = field(default_factory=list)  # response_url posts
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)  # envelope id → ack body

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self._refusals: dict[str, tuple[int, float]] = {}  # method → (429s left, Retry-After)
        self._tier_calls: dict[str, list[float]] = {}  # method → times of calls it allowed
        self.files: dict[str, tuple[bytes, str]] = {}  # file id → (bytes, mimetype)
        self.file_downloads: list[str] = []  # the Authorization header of each download
        self._ts = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._runner: web.AppRunner | None = None
        self._echoes: set[asyncio.Task[None]] = set()
        self._echoed: list[str] = []  # envelope ids ("http" for HTTP-mode deliveries)
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/files-pri/{team_file}/{name}", self._file)
        app.router.add_get("/link", self._socket)
        app.router.add_post("/response/{id}", self._response_url)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    # --- scripting -----------------------------------------------------------------------

    def rate_limit(self, method: str, *, times: int = 1, retry_after: float = 1.0) -> None:
        """The next `times` calls to `method` get HTTP 429 with `Retry-After`.

        Slack sends whole seconds; fractions are allowed here to keep tests fast.
        """
        self._refusals[method] = (times, retry_after)

    # --- what happened -------------------------------------------------------------------

    def calls_to(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method]

    def ok_calls_to(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls_to(method) if c.status == 200]

    def expire_stream(self, channel: str, ts: str) -> None:
        """The stream behind a message times out (Slack ends streams after a few minutes)."""
        self.messages[(channel, ts)].streaming = False

    def thread(self, channel: str, thread_ts: str) -> list[PostedMessage]:
        """The bot's messages in a thread, oldest first."""
        found = [
            m for m in self.messages.values() if m.channel == channel and m.thread_ts == thread_ts
        ]
        return sorted(found, key=lambda m: float(m.ts))

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Wait until `predicate()` holds over the record (checked at every change)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), within)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- Web API -------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                params.update(await request.json())
            else:
                params.update(await request.post())
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth else str(params.pop("token", ""))
        loop_time = asyncio.get_running_loop().time()

        status, headers = 200, {}
        left, retry_after = self._refusals.get(method, (0, 0.0))
        if not left and (wait := self._over_tier(method, loop_time)):
            left, retry_after = 1, float(math.ceil(wait))
        if left:
            self._refusals[method] = (left - 1, retry_after)
            status, headers = 429, {"Retry-After": f"{retry_after:g}"}
            body: dict[str, Any] = {"ok": False, "error": "ratelimited"}
        else:
            body = self._answer(method, params, token)
        self.calls.append(ApiCall(method, params, auth, loop_time, status))
        await self._notify()
        if self.echo and status == 200 and body.get("ok"):
            task = asyncio.get_running_loop().create_task(self._echo(method, params, body))
            self._echoes.add(task)
            task.add_done_callback(self._echoes.discard)
        return web.json_response(body, status=status, headers=headers)

    def _over_tier(self, method: str, now: float) -> float:
        """Seconds until `method` is allowed again under its tier (0: allowed, and counted)."""
        if method not in self.tiers:
            return 0.0
        count, seconds = self.tiers[method]
        allowed = [t for t in self._tier_calls.get(method, []) if now - t < seconds]
        self._tier_calls[method] = allowed
        if len(allowed) >= count:
            return allowed[-count] + seconds - now
        allowed.append(now)
        return 0.0

    def _next_ts(self) -> str:
        n = next(self._ts)
        return f"{1700000000 + n}.{n:06d}"

    def _answer(self, method: str, params: dict[str, Any], token: str) -> dict[str, Any]:
        if method in _APP_LEVEL:
            if not token.startswith("xapp-"):
                return {"ok": False, "error": "not_allowed_token_type"}
            if token != APP_TOKEN:
                return {"ok": False, "error": "invalid_auth"}
        elif token != BOT_TOKEN:
            return {"ok": False, "error": "not_authed" if not token else "invalid_auth"}

        match method:
            case "auth.test":
                return {
                    "ok": True,
                    "url": "https://parley-test.slack.com/",
                    "team": "Parley Test",
                    "user": "parley",
                    "team_id": TEAM_ID,
                    "user_id": BOT_USER_ID,
                    "bot_id": BOT_ID,
                    "is_enterprise_install": False,
                }
            case "apps.connections.open":
                return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/link?ticket={uuid.uuid4()}"}
            case "chat.postMessage":
                return self._post(params)
            case "chat.update":
                return self._update(params)
            case "chat.postEphemeral":
                return {"ok": True, "message_ts": self._next_ts()}
            case "chat.startStream":
                if not params.get("thread_ts"):
                    return {"ok": False, "error": "invalid_arguments"}
                in_channel = not str(params.get("channel", "")).startswith("D")
                if in_channel and not (
                    params.get("recipient_team_id") and params.get("recipient_user_id")
                ):
                    return {"ok": False, "error": "missing_recipient_team_id"}
                ts = self._next_ts()
                channel = str(params["channel"])
                self.messages[(channel, ts)] = PostedMessage(
                    channel, ts, str(params["thread_ts"]), _chunk_text(params), streaming=True
                )
                return {"ok": True, "channel": channel, "ts": ts}
            case "chat.appendStream" | "chat.stopStream":
                found = self.messages.get((str(params.get("channel")), str(params.get("ts"))))
                if found is None:
                    return {"ok": False, "error": "message_not_found"}
                if not found.streaming:
                    return {"ok": False, "error": "message_not_in_streaming_state"}
                found.text += _chunk_text(params)
                found.streaming = method == "chat.appendStream"
                return {"ok": True, "channel": found.channel, "ts": found.ts}
            case "assistant.threads.setStatus":
                return {"ok": True}
            case "agents.sessions.setStatus":
                # only apps declared as agents; a thread session needs its thread_ts
                if not self.agent:
                    return {"ok": False, "error": "not_allowed_token_type"}
                status = str(params.get("status", ""))
                if status not in ("processing", "active", "suspended", "closed"):
                    return {"ok": False, "error": "invalid_arguments"}
                if not params.get("channel_id") or not params.get("thread_ts"):
                    return {"ok": False, "error": "invalid_arguments"}
                answer: dict[str, Any] = {"ok": True, "status": status}
                if not self.agent_stop_subscribed:
                    answer["warning"] = "missing_agent_session_stopped_event_subscription"
                return answer
            case "users.info":
                user = str(params.get("user", ""))
                if user not in self.users:
                    return {"ok": False, "error": "user_not_found"}
                return {"ok": True, "user": _user_object(user, self.users[user])}
            case "conversations.replies":
                channel, ts = str(params.get("channel")), str(params.get("ts"))
                replies = [
                    {"type": "message", "user": BOT_USER_ID, "text": m.text, "ts": m.ts}
                    for m in self.thread(channel, ts)
                ]
                return {"ok": True, "messages": replies, "has_more": False}
            case _:
                return {"ok": False, "error": "unknown_method"}

    def _post(self, params: Mapping[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        text, error = _message_text(params)
        if error:
            return {"ok": False, "error": error}
        ts = self._next_ts()
        thread_ts = str(params["thread_ts"]) if params.get("thread_ts") else None
        self.messages[(channel, ts)] = PostedMessage(
            channel, ts, thread_ts, text, blocks=_blocks(params)
        )
        message = {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID, "app_id": APP_ID}
        message |= {"text": text, "ts": ts} | ({"thread_ts": thread_ts} if thread_ts else {})
        return {"ok": True, "channel": channel, "ts": ts, "message": message}

    def _update(self, params: Mapping[str, Any]) -> dict[str, Any]:
        channel, ts = str(params.get("channel")), str(params.get("ts"))
        found = self.messages.get((channel, ts))
        if found is None:
            return {"ok": False, "error": "message_not_found"}
        text, error = _message_text(params)
        if error:
            return {"ok": False, "error": error}
        found.text = text
        found.edits += 1
        found.streaming = False
        if "blocks" in params:  # without `blocks`, chat.update keeps the message's blocks
            found.blocks = _blocks(params)
        return {"ok": True, "channel": channel, "ts": ts, "text": found.text}

    async def _echo(self, method: str, params: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        """What Slack sends an app subscribed to message events after our own post or edit."""
        channel, ts = str(body.get("channel")), str(body.get("ts"))
        mine = {"user": BOT_USER_ID, "bot_id": BOT_ID, "app_id": APP_ID, "team": TEAM_ID}
        if method == "chat.postMessage":
            event: dict[str, Any] = {"type": "message", "channel": channel, "ts": ts, **mine}
            event["text"] = str(params.get("markdown_text") or params.get("text") or "")
            if params.get("thread_ts"):
                event["thread_ts"] = params["thread_ts"]
        elif method == "chat.update":
            message = {"type": "message", "ts": ts, "text": str(body.get("text")), **mine}
            event = {
                "type": "message",
                "subtype": "message_changed",
                "hidden": True,
                "channel": channel,
                "ts": self._next_ts(),
                "message": message,
                "previous_message": {**message, "text": ""},
            }
        else:
            return
        event["channel_type"] = "im" if channel.startswith("D") else "channel"
        event["event_ts"] = event["ts"]
        envelope = await self.deliver(self.event_body(event))
        self._echoed.append(envelope or "http")

    async def echoes_delivered(self, within: float = 5.0) -> int:
        """Wait until every echo so far was delivered and acknowledged; returns how many."""
        async with asyncio.timeout(within):
            while self._echoes:
                await asyncio.gather(*list(self._echoes))
        sent = [e for e in self._echoed if e != "http"]
        await self.wait_for(lambda: all(e in self.acks for e in sent), within)
        return len(self._echoed)

    async def _response_url(self, request: web.Request) -> web.Response:
        self.responses.append(await request.json())
        await self._notify()
        return web.Response(text="ok")  # response_url answers plain text, as Slack does

    def response_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/response/{uuid.uuid4().hex}"

    # --- payloads as Slack sends them ----------------------------------------------------

    def event_body(self, event: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
        """The Events API `event_callback` envelope around one event."""
        return {
            "token": "legacy-verification-token",
            "team_id": TEAM_ID,
            "context_team_id": TEAM_ID,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "enterprise_id": None,
                    "team_id": TEAM_ID,
                    "user_id": BOT_USER_ID,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
            "is_ext_shared_channel": False,
        }

    def add_file(self, name: str, data: bytes, mimetype: str) -> dict[str, Any]:
        """A file someone uploaded: the object a message event's `files` carries."""
        file_id = f"F{len(self.files) + 1:08d}"
        self.files[file_id] = (data, mimetype)
        base = f"http://127.0.0.1:{self.port}/files-pri/{TEAM_ID}-{file_id}/{name}"
        return {
            "id": file_id,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": name.rpartition(".")[2],
            "size": len(data),
            "mode": "hosted",
            "url_private": base,
            "url_private_download": f"{base}?download",  # aiohttp keeps the query as is
        }

    async def _file(self, request: web.Request) -> web.StreamResponse:
        """`url_private_download`: the bytes with the bot token; without it, Slack's sign-in
        page (HTML, status 200), not an error status."""
        auth = request.headers.get("Authorization", "")
        self.file_downloads.append(auth)
        file_id = request.match_info["team_file"].rpartition("-")[2]
        if auth != f"Bearer {BOT_TOKEN}" or file_id not in self.files:
            page = b"<!DOCTYPE html><html><head><title>Slack</title></head><body>Sign in</body>"
            return web.Response(body=page, content_type="text/html")
        data, mimetype = self.files[file_id]
        return web.Response(body=data, headers={"Content-Type": mimetype})

    def session_stopped(self, thread_ts: str, *, user: str = "U0ALICE") -> dict[str, Any]:
        """The `agent_session_stopped` event: someone pressed Slack's own Stop in a thread."""
        streaming = [m.ts for m in self.thread(CHANNEL_GENERAL, thread_ts) if m.streaming]
        return {
            "type": "agent_session_stopped",
            "channel": CHANNEL_GENERAL,
            "thread_ts": thread_ts,
            "user": user,
            "streaming_message_ts": streaming,
            "event_ts": self._next_ts(),
        }

    def user_message(
        self,
        text: str,
        *,
        user: str = "U0ALICE",
        channel: str = "C0GENERAL",
        thread_ts: str | None = None,
        event_type: str = "message",
        ts: str | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A person's message event (`message` or `app_mention`) with a fresh ts; with `files`
        (see `add_file`), a file share."""
        ts = ts or self._next_ts()
        event: dict[str, Any] = {
            "type": event_type,
            "user": user,
            "text": text,
            "ts": ts,
            "channel": channel,
            "event_ts": ts,
            "team": TEAM_ID,
            "client_msg_id": str(uuid.uuid4()),
            "blocks": [],
        }
        if event_type == "message":
            event["channel_type"] = "im" if channel.startswith("D") else "channel"
        if thread_ts:
            event["thread_ts"] = thread_ts
            event["parent_user_id"] = BOT_USER_ID
        if files:
            event["files"] = files
            event["upload"] = False
            if event_type == "message":
                event["subtype"] = "file_share"
        return event

    def command_payload(
        self, command: str, text: str = "", *, user: str = "U0ALICE", channel: str = "C0GENERAL"
    ) -> dict[str, str]:
        return {
            "token": "legacy-verification-token",
            "team_id": TEAM_ID,
            "team_domain": "parley-test",
            "channel_id": channel,
            "channel_name": "directmessage" if channel.startswith("D") else "general",
            "user_id": user,
            "user_name": self.users.get(user, user).lower(),
            "command": command,
            "text": text,
            "api_app_id": APP_ID,
            "is_enterprise_install": "false",
            "response_url": self.response_url(),
            "trigger_id": f"{uuid.uuid4().int % 10**10}.{uuid.uuid4().hex[:8]}",
        }

    def select_payload(
        self,
        action_id: str,
        value: str,
        *,
        block_id: str = "model",
        user: str = "U0ALICE",
        channel: str = "C0GENERAL",
    ) -> dict[str, Any]:
        """A `block_actions` payload: someone picked `value` in an ephemeral static_select."""
        container = {
            "type": "message",
            "message_ts": self._next_ts(),
            "channel_id": channel,
            "is_ephemeral": True,
        }
        action = {
            "type": "static_select",
            "action_id": action_id,
            "block_id": block_id,
            "selected_option": {
                "text": {"type": "plain_text", "text": value, "emoji": True},
                "value": value,
            },
        }
        return self._block_actions(user, channel, container, action)

    def button_payload(
        self, channel: str, ts: str, action_id: str, *, user: str = "U0ALICE"
    ) -> dict[str, Any]:
        """A `block_actions` payload: someone pressed a button the message shows now."""
        message = self.messages[(channel, ts)]
        pressed = [(b, e) for b, e in message.buttons() if e.get("action_id") == action_id]
        assert pressed, f"message {ts} shows no {action_id} button"
        block_id, button = pressed[0]
        shown: dict[str, Any] = {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID}
        shown |= {"text": message.text, "ts": ts, "blocks": message.blocks}
        container: dict[str, Any] = {
            "type": "message",
            "message_ts": ts,
            "channel_id": channel,
            "is_ephemeral": False,
        }
        if message.thread_ts:
            shown["thread_ts"] = container["thread_ts"] = message.thread_ts
        action = {
            "type": "button",
            "action_id": action_id,
            "block_id": block_id or uuid.uuid4().hex[:5],
            "text": button.get("text"),
            "value": button.get("value", ""),
        }
        return self._block_actions(user, channel, container, action, message=shown)

    def _block_actions(
        self,
        user: str,
        channel: str,
        container: dict[str, Any],
        action: dict[str, Any],
        **extra: Any,
    ) -> dict[str, Any]:
        """The `block_actions` envelope Slack wraps around one action (`extra`: `message`)."""
        return {
            "type": "block_actions",
            "user": {
                "id": user,
                "username": user.lower(),
                "name": user.lower(),
                "team_id": TEAM_ID,
            },
            "api_app_id": APP_ID,
            "token": "legacy-verification-token",
            "container": container,
            "trigger_id": f"{uuid.uuid4().int % 10**10}.{uuid.uuid4().hex[:8]}",
            "team": {"id": TEAM_ID, "domain": "parley-test"},
            "enterprise": None,
            "is_enterprise_install": False,
            "channel": {"id": channel, "name": "general"},
            **extra,
            "state": {"values": {}},
            "response_url": self.response_url(),
            "actions": [action | {"action_ts": f"{time.time():.6f}"}],
        }

    # --- delivery: Socket Mode -----------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_json(
            {
                "type": "hello",
                "num_connections": len(self._sockets),
                "debug_info": {"host": "applink-fake", "approximate_connection_time": 18060},
                "connection_info": {"app_id": APP_ID},
            }
        )
        await self._notify()
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if "envelope_id" in data:
                        self.acks[data["envelope_id"]] = data.get("payload") or {}
                        await self._notify()
        finally:
            self._sockets.remove(ws)
            await self._notify()
        return ws

    @property
    def connections(self) -> int:
        return len(self._sockets)

    async def send_envelope(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        connection: int = 0,
        retry_attempt: int | None = None,
        retry_reason: str | None = None,
        envelope_id: str | None = None,
    ) -> str:
        """Send one envelope (`events_api`, `slash_commands`, `interactive`) over a socket."""
        envelope: dict[str, Any] = {
            "envelope_id": envelope_id or str(uuid.uuid4()),
            "type": kind,
            "accepts_response_payload": kind != "events_api",
            "payload": payload,
        }
        if kind == "events_api":
            envelope["retry_attempt"] = retry_attempt or 0
            envelope["retry_reason"] = retry_reason or ""
        await self._sockets[connection].send_json(envelope)
        return str(envelope["envelope_id"])

    async def acked(self, envelope_id: str, within: float = 5.0) -> dict[str, Any]:
        """The payload the app acknowledged an envelope with (waits for the ack)."""
        await self.wait_for(lambda: envelope_id in self.acks, within)
        return self.acks[envelope_id]

    # --- delivery: HTTP mode -------------------------------------------------------------

    def signed_headers(
        self, body: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None
    ) -> dict[str, str]:
        ts = str(timestamp if timestamp is not None else int(time.time()))
        digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256)
        return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": "v0=" + digest.hexdigest()}

    async def post_http(
        self,
        url: str,
        body: str,
        content_type: str,
        *,
        retry_num: int | None = None,
        secret: str = SIGNING_SECRET,
        timestamp: int | None = None,
        signed: bool = True,
    ) -> tuple[int, str]:
        """Deliver a signed request as Slack does in HTTP mode; returns (status, body)."""
        headers = {"Content-Type": content_type}
        if signed:
            headers |= self.signed_headers(body, secret=secret, timestamp=timestamp)
        if retry_num is not None:
            headers["X-Slack-Retry-Num"] = str(retry_num)
            headers["X-Slack-Retry-Reason"] = "http_timeout"
        assert self._session is not None
        async with self._session.post(url, data=body.encode(), headers=headers) as resp:
            return resp.status, await resp.text()

    async def post_raw(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, str]:
        """Send any bytes with any headers (what an attacker or a broken client would)."""
        assert self._session is not None
        async with self._session.post(url, data=body, headers=dict(headers)) as resp:
            return resp.status, await resp.text()

    @staticmethod
    def signature(body: bytes, *, secret: str = SIGNING_SECRET, timestamp: str) -> str:
        """Slack's `X-Slack-Signature` of `body` (raw bytes) sent at `timestamp`."""
        base = b"v0:" + timestamp.encode() + b":" + body
        return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()

    async def post_event(
        self, url: str, body: dict[str, Any], *, retry_num: int | None = None, secret: str = ""
    ) -> tuple[int, str]:
        return await self.post_http(
            url,
            json.dumps(body),
            "application/json",
            retry_num=retry_num,
            secret=secret or SIGNING_SECRET,
        )

    async def post_form(self, url: str, form: Mapping[str, str]) -> tuple[int, str]:
        return await self.post_http(url, urlencode(form), "application/x-www-form-urlencoded")

    async def deliver(self, body: dict[str, Any]) -> str | None:
        """Deliver an Events API body the way the app is connected (socket, else HTTP).

        Returns the envelope id in Socket Mode; over HTTP the delivery is done on return.
        """
        if self._sockets:
            return await self.send_envelope("events_api", body)
        if self.http_event_url:
            await self.post_event(self.http_event_url, body)
        return None


def _blocks(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    blocks = params.get("blocks") or []
    return list(json.loads(blocks) if isinstance(blocks, str) else blocks)


def _blocks_error(blocks: list[dict[str, Any]]) -> str:
    """The error Slack answers for blocks it refuses (the limits Parley's blocks could meet)."""
    markdown = [b for b in blocks if b.get("type") == "markdown"]
    if any(not isinstance(b.get("text"), str) or not b["text"] for b in markdown):
        return "invalid_blocks"
    if sum(len(b["text"]) for b in markdown) > 12000:  # cumulative, over the whole payload
        return "invalid_blocks"
    for block in blocks:
        if block.get("type") == "actions":
            elements = block.get("elements") or []
            if not 1 <= len(elements) <= 25:
                return "invalid_blocks"
            for e in elements:
                if e.get("type") != "button":
                    continue
                label = e.get("text") or {}
                if label.get("type") != "plain_text" or not 1 <= len(label.get("text", "")) <= 75:
                    return "invalid_blocks"
                if len(str(e.get("value", ""))) > 2000 or len(str(e.get("action_id"))) > 255:
                    return "invalid_blocks"
    return ""


def _message_text(params: Mapping[str, Any]) -> tuple[str, str]:
    """(what the message shows, the error Slack answers instead, if any)."""
    markdown = str(params.get("markdown_text") or "")
    if markdown and (params.get("text") or params.get("blocks")):
        return "", "markdown_text_conflict"  # markdown_text goes alone
    if len(markdown) > 12000:
        return "", "markdown_text_too_long"
    blocks = _blocks(params)
    if error := _blocks_error(blocks):
        return "", error
    shown = "\n".join(b["text"] for b in blocks if b.get("type") == "markdown")
    text = markdown or shown or str(params.get("text") or "")
    if not text and not blocks:
        return "", "no_text"
    return text, ""


def _chunk_text(params: Mapping[str, Any]) -> str:
    """Text of a streaming call: `markdown_text`, or its `markdown_text` chunks."""
    text = str(params.get("markdown_text") or "")
    chunks = params.get("chunks") or []
    if isinstance(chunks, str):
        chunks = json.loads(chunks)
    for chunk in chunks:
        if isinstance(chunk, dict) and chunk.get("type") == "markdown_text":
            text += str(chunk.get("text", ""))
    return text


def _user_object(user_id: str, display_name: str) -> dict[str, Any]:
    return {
        "id": user_id,
        "team_id": TEAM_ID,
        "name": display_name.split()[0].lower(),
        "deleted": False,
        "real_name": display_name,
        "tz": "Europe/Amsterdam",
        "profile": {
            "real_name": display_name,
            "display_name": display_name,
            "real_name_normalized": display_name,
            "display_name_normalized": display_name,
        },
        "is_admin": False,
        "is_owner": False,
        "is_bot": user_id == BOT_USER_ID,
        "updated": 1700000000,
    }
