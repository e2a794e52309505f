"""Slack adapter: slack-bolt's AsyncApp turns events into Turns, and SlackSink posts the replies.

Socket Mode when an app-level token is set, else HTTP mode on the process's HTTP server
(`/slack/events`). Everything about what to answer and how lives in the core; this module only
translates: events → `Turn`, a frame → one Slack call (neutralised; its message declares the
workspace's `chat.update` budget, which the core keeps), slash commands and the model menu →
`Conversation.command`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.async_context import AsyncBoltContext
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.error import BoltUnhandledRequestError
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_edge import (
    AgentSessionStopped,
    BlockActions,
    Challenge,
    Forward,
    Ignore,
    Reject,
    SlackFile,
    SlackMessage,
    SlashCommand,
    Verdict,
    read_http,
    read_payload,
    verify,
)
from adapters.slack_text import (
    classify,
    from_bot,
    mentioned_user_ids,
    neutralise,
    settled,
    to_model_text,
)
from bot.app import Parley
from bot.commands import NAMES as COMMAND_NAMES
from bot.conversation import CommandReply, stop_token
from bot.errors import AttachmentUnavailable
from bot.markdown import split_message
from bot.turn import (
    Attachment,
    ConversationKey,
    EditBudget,
    Frame,
    MessageRef,
    Phase,
    PlatformRateLimited,
    Turn,
    WaitingState,
    message,
)

log = logging.getLogger(__name__)

PLATFORM = "slack"
EVENTS_PATH = "/slack/events"
# Slack asks for messages under 4,000 characters; leave room for neutralised mentions.
MAX_CHARS = 3800
SLASH_COMMANDS = ("/model", "/reset", "/parley")
MODEL_SELECT = "parley_model_select"
STOP_ACTION = "parley_stop"
REGENERATE_ACTION = "parley_regenerate"
VOTE_ACTIONS = {"parley_up": "up", "parley_down": "down"}
MARKDOWN_BLOCK_CHARS = 12000  # the cumulative limit of a payload's markdown blocks
MAX_MENU_OPTIONS = 100  # static_select's limit
SECTION_CHARS = 3000  # a section block's text limit
COMMAND_ACK_SECONDS = 2.0  # answer in the ack if the core is this quick, else via response_url
NAME_TTL = 3600.0
NAME_RETRY = 60.0  # an unknown or failed user id is tried again after this long
LOOKUPS_PER_TEXT = 5  # users.info calls one text may cause
SLACK_FILE_HOSTS = (".slack.com", ".slack-edge.com", ".slack-gov.com")  # where files live
STATUS_REPEAT = 90.0  # assistant status clears itself after two minutes
STATUS_TEXT = {"loading": "is loading the model…", "thinking": "is thinking…"}
UPDATE_WINDOW = 60.0  # chat.update is Tier 3: a budget per minute, per workspace
APPEND_STREAM_BUDGET = 100  # chat.appendStream is Tier 4: 100+ a minute, per workspace
# errors after which the status indicator is not worth trying again in this process
_STATUS_FATAL = {"missing_scope", "not_allowed_token_type", "method_deprecated", "unknown_method"}


def _retry_after(error: SlackApiError) -> float | None:
    """Seconds Slack asked us to wait, if the error is a 429."""
    if error.response.status_code != 429:
        return None
    try:
        return max(0.0, float(error.response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _button(action_id: str, label: str, token: str) -> dict[str, Any]:
    text = {"type": "plain_text", "text": label, "emoji": True}
    return {"type": "button", "action_id": action_id, "text": text, "value": token}


def _controls(token: str) -> dict[str, Any]:
    """A finished reply's buttons: Regenerate, 👍, 👎 (each carries the reply's token)."""
    return {
        "type": "actions",
        "block_id": "parley_controls",
        "elements": [
            _button(REGENERATE_ACTION, "🔄 Regenerate", token),
            *(
                _button(action, "👍" if vote == "up" else "👎", token)
                for action, vote in VOTE_ACTIONS.items()
            ),
        ],
    }


def _with_blocks(safe: str, stop: str | None, controls: str | None = None) -> dict[str, Any]:
    """A message as a markdown block (`markdown_text` cannot go with blocks), plus a Stop
    button when `stop` is the reply's stop token, or a finished reply's buttons (`controls`);
    `text` is the notification fallback."""
    if len(safe) > MARKDOWN_BLOCK_CHARS:  # only if neutralising grew the text a lot
        safe = safe[: MARKDOWN_BLOCK_CHARS - 1] + "…"
    blocks: list[dict[str, Any]] = [{"type": "markdown", "text": safe}]
    if stop:
        stopping = _button(STOP_ACTION, "⏹ Stop", stop)
        blocks.append({"type": "actions", "elements": [stopping]})
    elif controls:
        blocks.append(_controls(controls))
    return {"blocks": blocks, "text": safe}


@dataclass
class _Stream:
    """A reply message being written with Slack's native streaming."""

    streamed: str = ""  # the text appended so far
    open: bool = True


class _Names:
    """Display names by user id (`users.info`, cached; the id itself when Slack has none)."""

    def __init__(self, client: AsyncWebClient) -> None:
        self._client = client
        self._cache: dict[str, tuple[str, bool, float]] = {}

    async def lookup(self, user_id: str) -> tuple[str, bool]:
        """(display name, is a workspace admin or owner)."""
        cached = self._cache.get(user_id)
        if cached is not None and cached[2] > time.monotonic():
            return cached[0], cached[1]
        try:
            response = await self._client.users_info(user=user_id)
        except SlackApiError as e:
            log.info("users.info %s failed: %s", user_id, e.response.get("error"))
            self._cache[user_id] = (user_id, False, time.monotonic() + NAME_RETRY)
            return user_id, False
        user: dict[str, Any] = response.get("user") or {}
        profile: dict[str, Any] = user.get("profile") or {}
        name = str(
            profile.get("display_name")
            or profile.get("real_name")
            or user.get("real_name")
            or user.get("name")
            or user_id
        )
        admin = bool(user.get("is_admin") or user.get("is_owner"))
        self._cache[user_id] = (name, admin, time.monotonic() + NAME_TTL)
        return name, admin

    def remember(self, user_id: str, name: str) -> None:
        self._cache[user_id] = (name, False, float("inf"))

    async def resolve(self, text: str) -> dict[str, str]:
        """The names of the people `text` mentions (each looked up once, and at most
        LOOKUPS_PER_TEXT new ones per text: a model writing many ids must not spend the
        workspace's users.info budget; the others show as their ids)."""
        users = mentioned_user_ids(text)
        if missing := users - self._cache.keys():
            await asyncio.gather(*(self.lookup(u) for u in sorted(missing)[:LOOKUPS_PER_TEXT]))
        return {u: self._cache[u][0] for u in users if u in self._cache}


@dataclass
class SlackSink:
    """Posts and edits one reply in one Slack thread (or a DM's main conversation)."""

    adapter: SlackAdapter
    team_id: str
    channel: str
    thread_ts: str | None  # None: top level (a DM's main conversation)
    user_id: str  # who asked: ephemeral notices, stream recipient
    stop_token: str = ""  # the value of the Stop button on the message being written
    agent: bool = False  # an agent session shows the reply's state, and Slack's own Stop
    title: str = ""  # the agent session's title (the question), when it is created
    native: bool = False  # try chat.startStream for the first message
    max_chars: int = MAX_CHARS
    min_edit_interval: float = 1.0
    _streams: dict[str, _Stream] = field(default_factory=dict)
    _status_shown: str = ""
    _status_at: float = 0.0
    _session: str = ""  # the agent session's status as last set

    @property
    def _client(self) -> AsyncWebClient:
        return self.adapter.client

    async def _safe(self, text: str) -> str:
        return neutralise(text, names=await self.adapter.names.resolve(text))

    def _budget(self, method: str, count: int) -> EditBudget:
        return EditBudget(f"slack:{method}:{self.team_id}", count, UPDATE_WINDOW)

    async def _content(self, frame: Frame, *, editing: bool) -> dict[str, Any]:
        """The message's content arguments: blocks with a Stop button while it is written; on
        its last edit blocks without it (chat.update keeps earlier blocks unless `blocks` is
        given); else `markdown_text` alone. Mid-stream, an unfinished `<…` or `@word` at the
        end waits for the text that decides what it is."""
        if frame.phase is Phase.STREAMING:
            frame = replace(frame, body=settled(frame.body))
        safe = await self._safe(frame.text)
        if self.stop_token and not frame.final and not self.agent:  # an agent: Slack's Stop
            return _with_blocks(safe, self.stop_token)
        if self.stop_token and frame.controls:
            return _with_blocks(safe, None, self.stop_token)
        if self.stop_token and editing:
            return _with_blocks(safe, None)
        return {"markdown_text": safe}

    async def post(self, frame: Frame) -> MessageRef:
        if not frame.final:
            await self._set_session("processing")
        if self.native and self.thread_ts and not frame.final and not self._streams:
            ref = await self._start_stream(frame)
            if ref is not None:
                return ref
        try:
            response = await self._client.chat_postMessage(
                channel=self.channel,
                thread_ts=self.thread_ts,
                **await self._content(frame, editing=False),
                unfurl_links=False,
                unfurl_media=False,
            )
        except SlackApiError as e:
            if (wait := _retry_after(e)) is not None:
                raise PlatformRateLimited(wait) from e
            raise
        budget = self._budget("chat.update", self.adapter.settings.slack_update_budget)
        return MessageRef(id=str(response["ts"]), channel=self.channel, budget=budget)

    async def edit(self, ref: MessageRef, frame: Frame) -> None:
        if frame.phase is not Phase.THINKING:
            await self._clear_status()
        stream = self._streams.get(ref.id)
        if stream is not None and stream.open and await self._append(ref, stream, frame):
            return
        await self._update(ref, frame)
        if frame.controls:  # the reply's end: its session is no longer processing
            await self._set_session("active")

    async def _update(self, ref: MessageRef, frame: Frame) -> None:
        try:
            await self._client.chat_update(
                channel=ref.channel or self.channel,
                ts=ref.id,
                **await self._content(frame, editing=True),
            )
        except SlackApiError as e:
            if (retry := _retry_after(e)) is not None:
                raise PlatformRateLimited(retry) from e
            raise

    async def notify(self, text: str) -> None:
        try:
            await self._client.chat_postEphemeral(
                channel=self.channel,
                user=self.user_id,
                thread_ts=self.thread_ts,
                markdown_text=await self._safe(text),
            )
        except SlackApiError as e:
            # not in the channel, or Slack refused: the notice still must not vanish silently
            log.warning("ephemeral notice failed (%s); posting it", e.response.get("error"))
            await self.post(message(text))

    async def show_waiting(self, state: WaitingState) -> None:
        """`assistant.threads.setStatus` in threads (an agent's session shows it instead); the
        placeholder already shows elsewhere."""
        if not self.thread_ts or not self.adapter.status_allowed or self.agent:
            return
        status = STATUS_TEXT[state]
        now = time.monotonic()
        if status == self._status_shown and now - self._status_at < STATUS_REPEAT:
            return
        try:
            await self._client.assistant_threads_setStatus(
                channel_id=self.channel, thread_ts=self.thread_ts, status=status
            )
        except SlackApiError as e:
            error = str(e.response.get("error"))
            if error in _STATUS_FATAL:
                log.info("no assistant status in Slack (%s): the placeholder shows it", error)
                self.adapter.status_allowed = False
            return
        self._status_shown, self._status_at = status, now

    async def _set_session(self, status: str) -> None:
        """An agent's session in this thread: processing while a reply is written, then active
        (Slack shows its own Stop while processing). Only for apps declared as agents."""
        if not self.agent or not self.thread_ts or self._session == status:
            return
        self._session = status
        try:
            response = await self._client.agents_sessions_setStatus(
                channel_id=self.channel,
                thread_ts=self.thread_ts,
                status=status,
                title=self.title[:200] or None,
            )
        except SlackApiError as e:
            log.warning("agent session status refused: %s", e.response.get("error"))
            return
        if warning := response.get("warning"):
            log.warning("agent session status: Slack warns %s", warning)

    async def _clear_status(self) -> None:
        if not self._status_shown:
            return
        self._status_shown = ""
        with contextlib.suppress(SlackApiError):
            await self._client.assistant_threads_setStatus(
                channel_id=self.channel, thread_ts=self.thread_ts or "", status=""
            )

    # --- native streaming ---

    async def _start_stream(self, frame: Frame) -> MessageRef | None:
        """Open a native stream as the reply's first message; None to fall back to a post."""
        first = await self._safe(settled(frame.body)) if frame.phase is Phase.STREAMING else ""
        in_dm = self.channel.startswith("D")
        try:
            response = await self._client.chat_startStream(
                channel=self.channel,
                thread_ts=self.thread_ts or "",
                markdown_text=first or None,
                recipient_team_id=None if in_dm else self.team_id,
                recipient_user_id=None if in_dm else self.user_id,
            )
        except SlackApiError as e:
            log.info("native streaming unavailable (%s): editing instead", e.response.get("error"))
            return None
        ts = str(response["ts"])
        self._streams[ts] = _Stream(streamed=first)
        budget = self._budget("chat.appendStream", APPEND_STREAM_BUDGET)
        return MessageRef(id=ts, channel=self.channel, budget=budget)

    async def _append(self, ref: MessageRef, stream: _Stream, frame: Frame) -> bool:
        """Append what is new to the stream (and stop it when final); False to edit instead."""
        if not frame.final and frame.phase is not Phase.STREAMING:
            return True  # the status line says it; a stream cannot take text back
        wanted = await self._safe(frame.text if frame.final else settled(frame.body))
        if not wanted.startswith(stream.streamed):
            await self._stop_stream(ref, stream)
            return False  # not an append: the fallback edit rewrites the message
        delta = wanted[len(stream.streamed) :]
        try:
            if frame.final:
                buttons = (
                    [_controls(self.stop_token)] if frame.controls and self.stop_token else None
                )
                await self._client.chat_stopStream(
                    channel=self.channel, ts=ref.id, markdown_text=delta or None, blocks=buttons
                )
                stream.open = False
            elif delta:
                await self._client.chat_appendStream(
                    channel=self.channel, ts=ref.id, markdown_text=delta
                )
        except SlackApiError as e:
            if (wait := _retry_after(e)) is not None:
                raise PlatformRateLimited(wait) from e
            log.info("stream ended (%s): editing instead", e.response.get("error"))
            stream.open = False
            return False
        stream.streamed = wanted
        return True

    async def _stop_stream(self, ref: MessageRef, stream: _Stream) -> None:
        stream.open = False
        with contextlib.suppress(SlackApiError):
            await self._client.chat_stopStream(channel=self.channel, ts=ref.id)


class SlackAdapter:
    """Serves one Slack workspace through bolt's AsyncApp, in Socket Mode or HTTP mode."""

    name = "slack"

    def __init__(self, parley: Parley) -> None:
        settings = parley.settings
        if settings.slack_bot_token is None:
            raise ValueError("PARLEY_SLACK_BOT_TOKEN: required for the Slack adapter")
        self.parley = parley
        self.settings = settings
        self.conversation = parley.conversation
        self.socket_mode = settings.slack_app_token is not None
        if not self.socket_mode and settings.slack_signing_secret is None:
            raise ValueError(
                "PARLEY_SLACK_SIGNING_SECRET: required for Slack's HTTP mode "
                "(or set PARLEY_SLACK_APP_TOKEN for Socket Mode)"
            )
        # one connection pool for every Web API call of this process
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self.client = AsyncWebClient(
            token=settings.slack_bot_token.get_secret_value(),
            base_url=settings.slack_api_url,
            session=self._session,
        )
        secret = settings.slack_signing_secret
        self._secret = secret.get_secret_value() if secret else ""
        # requests are verified (HTTP mode) and validated (both modes) before bolt sees them
        self.app = AsyncApp(
            name="parley",
            client=self.client,
            signing_secret=self._secret,
            request_verification_enabled=False,
            raise_error_for_unhandled_request=True,
        )
        self.names = _Names(self.client)
        self._api_host = urlsplit(settings.slack_api_url).hostname or ""
        self.status_allowed = True
        self._socket: AsyncSocketModeHandler | None = None
        self._started = False
        self._turns: set[asyncio.Task[Any]] = set()

        self.app.event("app_mention")(self._on_message)
        self.app.event("message")(self._on_message)
        self.app.event("agent_session_stopped")(self._on_session_stopped)
        for command in SLASH_COMMANDS:
            self.app.command(command)(self._on_command)
        self.app.action(MODEL_SELECT)(self._on_model_selected)
        self.app.action(STOP_ACTION)(self._on_stop)
        self.app.action(REGENERATE_ACTION)(self._on_regenerate)
        for action in VOTE_ACTIONS:
            self.app.action(action)(self._on_vote)
        self.app.error(self._on_error)
        if not self.socket_mode:
            parley.http.router.add_post(EVENTS_PATH, self._on_http)

    # --- lifecycle ---

    async def start(self) -> None:
        """Check the token, then connect (Socket Mode) or rely on the HTTP route (HTTP mode)."""
        identity = await self.client.auth_test()
        self.names.remember(str(identity.get("user_id")), str(identity.get("user")))
        log.info(
            "Slack: signed in as %s in %s (%s mode)",
            identity.get("user"),
            identity.get("team"),
            "Socket" if self.socket_mode else f"HTTP, POST {EVENTS_PATH}",
        )
        if self.settings.slack_app_token is not None:
            self._socket = _CheckedSocketMode(
                self.app, self.settings.slack_app_token.get_secret_value()
            )
            await self._socket.connect_async()  # type: ignore[no-untyped-call]
        self._started = True

    @property
    def ready(self) -> bool:
        """Signed in; in Socket Mode, its WebSocket to Slack open (for /readyz)."""
        if not self._started:
            return False
        if not self.socket_mode:
            return True
        client = self._socket.client if self._socket is not None else None
        session = getattr(client, "current_session", None)
        return bool(client and not client.closed and session is not None and not session.closed)

    async def quiesce(self) -> None:
        """Shutting down, Socket Mode: close the WebSocket first, so that Slack hands new events
        to the app's other connections (another replica) while the replies in flight finish
        over the Web API; their Stop buttons still work from any replica (Redis pub/sub)."""
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
            self._socket = None

    async def stop(self) -> None:
        """Stop taking events, finish the replies in flight as stopped, close connections."""
        await self.quiesce()
        turns = list(self._turns)
        for task in turns:
            task.cancel()
        if turns:
            await asyncio.wait(turns, timeout=10)
        await self._session.close()

    async def _on_http(self, request: web.Request) -> web.Response:
        """Slack's HTTP mode: verify the raw bytes, read the body into Parley's types, and hand
        bolt only what Parley handles, rebuilt from them."""
        body = await request.read()  # past aiohttp's client_max_size (1 MiB): a 413
        headers = {name.lower(): value for name, value in request.headers.items()}
        refused = verify(body, headers, self._secret, time.time())
        if refused is not None:
            log.warning("Slack HTTP: refused a request: %s (%d bytes)", refused, len(body))
            return web.Response(status=401)
        read = read_http(body, request.content_type)
        if isinstance(read, Reject):
            log.warning("Slack HTTP: refused a request: %s (%d bytes)", read.reason, len(body))
            return web.Response(status=read.status)
        if isinstance(read, Challenge):
            return web.json_response({"challenge": read.challenge})
        verdict = _read(*read)
        if not isinstance(verdict, Forward):
            return web.Response(status=200)
        text, content_type = verdict.http_body()
        bolt = AsyncBoltRequest(
            body=text,
            query=request.query_string,
            headers={**headers, "content-type": content_type},  # bolt reads the retry headers
        )
        return await to_aiohttp_response(await self.app.async_dispatch(bolt))

    async def _on_error(self, error: Exception) -> BoltResponse | None:
        """bolt's errors: a request no listener took is acknowledged (Slack would retry it);
        anything else is a fault of Parley's own, logged whole."""
        if isinstance(error, BoltUnhandledRequestError):
            log.debug("Slack: nothing handles this request; acknowledged")
            return BoltResponse(status=200, body="")
        log.error("Slack: a listener failed", exc_info=error)
        return None

    # --- messages ---

    async def _on_message(self, event: dict[str, Any], context: AsyncBoltContext) -> None:
        """app_mention and every message event: decide, build the Turn, hand it to the core."""
        message = SlackMessage.model_validate(event)  # read into it at the edge already
        bot_user_id = context.bot_user_id or ""
        seen = message.model_dump(exclude_none=True)
        trigger = classify(seen, bot_user_id=bot_user_id, bot_id=context.bot_id or "")
        author = message.user or message.bot_id
        if trigger is None or author is None:
            return
        team_id = context.team_id or message.team or ""
        channel, ts, thread_ts = message.channel, message.ts, message.thread_ts or ""
        # a mention is answered in its thread; a DM in place ("" is the DM's main conversation)
        thread = thread_ts if trigger == "dm" else thread_ts or ts
        key = ConversationKey(PLATFORM, team_id, channel, thread)
        if trigger == "thread" and not self.settings.slack_thread_followups:
            return
        task = asyncio.current_task()
        if task is not None:
            self._turns.add(task)
        try:
            raw, user_id = message.text, author
            (user_name, is_admin), names = await asyncio.gather(
                self.names.lookup(user_id), self.names.resolve(raw)
            )
            turn = Turn(
                key=key,
                user_id=user_id,
                user_name=user_name,
                text=to_model_text(raw, bot_user_id=bot_user_id, names=names),
                event_id=f"{channel}:{ts}",  # one message = one answer, whichever event brings it
                is_admin=is_admin,
                in_dm=trigger == "dm",
                from_bot=from_bot(seen),
                only_if_active=trigger == "thread",  # a follow-up: only in Parley's threads
                attachments=tuple(
                    self._attachment(f) for f in message.files if f.mode != "tombstone"
                ),
            )
            sink = SlackSink(
                self,
                team_id=team_id,
                channel=channel,
                thread_ts=thread or None,
                user_id=user_id,
                stop_token=stop_token(turn),
                native=self.settings.slack_native_streaming,
                min_edit_interval=self.settings.edit_interval,
                agent=self.settings.slack_agent,
                title=turn.text.strip().split("\n", 1)[0],
            )
            await self.conversation.handle(turn, sink)
        finally:
            if task is not None:
                self._turns.discard(task)

    async def _on_session_stopped(self, event: dict[str, Any], context: AsyncBoltContext) -> None:
        """Slack's own Stop on an agent session: the core stops the reply written in that
        thread, on whichever replica writes it (the session then leaves processing as the
        stopped reply ends); a refusal goes only to the person."""
        stopped = AgentSessionStopped.model_validate(event)  # read into it at the edge already
        if stopped.user is None or stopped.thread_ts is None:
            return
        _, is_admin = await self.names.lookup(stopped.user)
        key = ConversationKey(PLATFORM, context.team_id or "", stopped.channel, stopped.thread_ts)
        refusal = await self.conversation.stop_in_thread(
            key, user_id=stopped.user, is_admin=is_admin
        )
        if refusal is None:
            return
        with contextlib.suppress(SlackApiError):  # nothing is being written: not processing
            await self.client.agents_sessions_setStatus(
                channel_id=stopped.channel, thread_ts=stopped.thread_ts, status="active"
            )
            await self.client.chat_postEphemeral(
                channel=stopped.channel,
                user=stopped.user,
                thread_ts=stopped.thread_ts,
                markdown_text=neutralise(refusal),
            )

    def _attachment(self, file: SlackFile) -> Attachment:
        """A file on a message, fetched (when the core asks) from `url_private_download` with
        the bot token — only from Slack's own hosts."""

        async def read(limit: int) -> bytes:
            url = file.url_private_download
            if url is None or file.mode == "external":
                raise AttachmentUnavailable("Slack shares only a link to this file, not the file.")
            host = urlsplit(url).hostname or ""
            if host != self._api_host and not host.endswith(SLACK_FILE_HOSTS):
                raise AttachmentUnavailable("it is not on Slack's file host, so I left it.")
            token = self.client.token or ""
            headers = {"Authorization": f"Bearer {token}"}
            async with self._session.get(url, headers=headers) as response:
                if response.status != 200:
                    raise AttachmentUnavailable(f"Slack answered {response.status} for it.")
                if response.content_type == "text/html" and file.mimetype != "text/html":
                    raise AttachmentUnavailable(
                        "Slack answered with its sign-in page: Parley needs the `files:read` "
                        "scope (add it and reinstall the app)."
                    )
                data = bytearray()
                async for piece in response.content.iter_chunked(64 * 1024):
                    data += piece
                    if len(data) > limit:
                        break
                return bytes(data[: limit + 1])

        return Attachment(file.name, file.mimetype, file.size, read)

    # --- slash commands and the model menu ---

    async def _on_command(
        self,
        ack: AsyncAck,
        command: dict[str, Any],
        respond: AsyncRespond,
        context: AsyncBoltContext,
    ) -> None:
        asked = SlashCommand.model_validate(command)  # read into it at the edge already
        name, args = _command_words(asked.command, asked.text)
        key = ConversationKey(
            PLATFORM, context.team_id or asked.team_id or "", asked.channel_id, ""
        )
        turn = Turn(key=key, user_id=asked.user_id, user_name="", text="", event_id="")
        work = asyncio.ensure_future(self.conversation.command(turn, name, args))
        done, _ = await asyncio.wait({work}, timeout=COMMAND_ACK_SECONDS)
        if done:
            await ack(self._command_message(work.result(), name))
            return
        await ack(response_type="ephemeral", text="One moment…")
        await respond(self._command_message(await work, name) | {"replace_original": True})

    async def _on_model_selected(
        self,
        ack: AsyncAck,
        body: dict[str, Any],
        action: dict[str, Any],
        respond: AsyncRespond,
        context: AsyncBoltContext,
    ) -> None:
        await ack()
        click = BlockActions.model_validate(body)  # read into it at the edge already
        choice = click.actions[0].selected_option
        if choice is None or not click.channel_id:
            log.warning("Slack: a model menu choice without a model or a channel; ignored")
            return
        team_id = context.team_id or (click.team.id if click.team else "")
        key = ConversationKey(PLATFORM, team_id, click.channel_id, "")
        turn = await self._command_turn(key, click.user.id)
        reply = await self.conversation.command(turn, "model", choice.value)
        await respond(self._command_message(reply, "model") | {"replace_original": True})

    async def _on_stop(
        self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], respond: AsyncRespond
    ) -> None:
        """The Stop button: stop the reply (on whichever replica writes it), or tell the presser
        why not, only to them."""
        await ack()
        click = BlockActions.model_validate(body)  # read into it at the edge already
        user_id = click.user.id
        _, is_admin = await self.names.lookup(user_id)  # cached; admins may stop any reply
        refusal = await self.conversation.stop(
            click.actions[0].value or "", user_id=user_id, is_admin=is_admin
        )
        if refusal is None:
            return
        try:
            await self.client.chat_postEphemeral(
                channel=click.channel_id,
                user=user_id,
                thread_ts=click.thread_ts,
                markdown_text=neutralise(refusal),
            )
        except SlackApiError as e:
            log.info("ephemeral notice failed (%s): answering via response_url", e)
            await respond(
                text=neutralise(refusal), response_type="ephemeral", replace_original=False
            )

    async def _on_regenerate(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        """Regenerate on a finished reply: the core answers its thread's last question again,
        posted in the same thread (as the person who pressed it, every limit applying)."""
        await ack()
        click = BlockActions.model_validate(body)  # read into it at the edge already
        if not click.channel_id:
            return
        thread_ts = click.thread_ts or (click.message.ts if click.message else None)
        team_id = click.team.id if click.team else ""
        key = ConversationKey(PLATFORM, team_id, click.channel_id, thread_ts or "")
        action = click.actions[0]
        asker = replace(
            await self._command_turn(key, click.user.id),
            event_id=f"regen-{action.action_ts or click.trigger_id or time.time()}",  # one click
        )
        in_place = click.thread_ts if asker.in_dm else thread_ts  # a DM answers in place
        sink = SlackSink(
            self,
            team_id=team_id,
            channel=click.channel_id,
            thread_ts=in_place,
            user_id=click.user.id,
            stop_token=stop_token(asker),
            native=self.settings.slack_native_streaming,
            min_edit_interval=self.settings.edit_interval,
        )
        task = asyncio.current_task()
        if task is not None:
            self._turns.add(task)
        try:
            await self.conversation.regenerate(action.value or "", asker, sink)
        finally:
            if task is not None:
                self._turns.discard(task)

    async def _on_vote(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        """👍 / 👎 on a finished reply: the core counts it; a refusal only to the person."""
        await ack()
        click = BlockActions.model_validate(body)
        action = click.actions[0]
        refusal = await self.conversation.feedback(
            action.value or "", user_id=click.user.id, vote=VOTE_ACTIONS[action.action_id]
        )
        if refusal is not None and click.channel_id:
            with contextlib.suppress(SlackApiError):
                await self.client.chat_postEphemeral(
                    channel=click.channel_id,
                    user=click.user.id,
                    thread_ts=click.thread_ts,
                    markdown_text=neutralise(refusal),
                )

    async def _command_turn(self, key: ConversationKey, user_id: str) -> Turn:
        """Who runs a command where (workspace admins may always configure; users.info cached)."""
        _, is_admin = await self.names.lookup(user_id)
        in_dm = key.channel.startswith("D")
        return Turn(key, user_id, "", "", "", is_admin=is_admin, in_dm=in_dm)

    def _command_message(self, reply: CommandReply, name: str) -> dict[str, Any]:
        """An ephemeral answer: the text, plus the model menu when models were listed."""
        text = neutralise(reply.text)
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": part}}
            for part in split_message(text, SECTION_CHARS)
        ]
        if name == "model" and reply.models:
            blocks.append(_model_menu(reply.models, reply.current))
        return {"response_type": "ephemeral", "text": text, "blocks": blocks}


def _read(kind: str, payload: Any) -> Verdict:
    """An envelope's payload as Parley reads it; one log line for whatever it will not act on."""
    verdict = read_payload(
        kind,
        payload,
        commands=SLASH_COMMANDS,
        actions=(MODEL_SELECT, STOP_ACTION, REGENERATE_ACTION, *VOTE_ACTIONS),
    )
    if isinstance(verdict, Ignore):
        if verdict.dropped:
            log.warning("Slack: dropped a malformed %s request: %s", kind[:40], verdict.reason)
        else:
            log.debug("Slack: %s; acknowledged", verdict.reason)
    return verdict


class _CheckedSocketModeClient(SocketModeClient):
    """slack_sdk's Socket Mode client, which refuses, with one log line and an ack, an envelope
    whose payload it cannot even hold (not an object: it would log a traceback instead)."""

    async def run_message_listeners(self, message: dict[str, Any], raw_message: str) -> None:
        if "envelope_id" in message and not isinstance(message.get("payload"), dict | str):
            log.warning("Slack: dropped a malformed Socket Mode envelope (its payload)")
            if isinstance(envelope := message["envelope_id"], str):
                await self.send_socket_mode_response(SocketModeResponse(envelope_id=envelope))
            return
        await super().run_message_listeners(message, raw_message)


class _CheckedSocketMode(AsyncSocketModeHandler):
    """Socket Mode, with each envelope read into Parley's types before bolt sees it."""

    def __init__(self, app: AsyncApp, app_token: str) -> None:  # bolt's own, on our client
        self.app = app
        self.app_token = app_token
        self.client = _CheckedSocketModeClient(
            app_token=app_token, logger=app.logger, web_client=app.client
        )
        self.client.socket_mode_request_listeners.append(self.handle)  # type: ignore[arg-type]

    async def handle(self, client: SocketModeClient, req: SocketModeRequest) -> None:  # type: ignore[override]
        verdict = _read(req.type, req.payload)
        if isinstance(verdict, Forward):
            req.payload = verdict.payload
            await super().handle(client, req)
        else:  # acknowledged, so that Slack does not deliver it again
            await client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))


def _command_words(command: str, text: str) -> tuple[str, str]:
    """`/model x` → ("model", "x"); `/parley reset` → ("reset", ""); `/parley` → help."""
    if command != "/parley":
        return command.lstrip("/"), text.strip()
    word, _, rest = text.strip().partition(" ")
    if word.lower() in COMMAND_NAMES:
        return word.lower(), rest.strip()
    return "help", ""


def _model_menu(models: list[str], current: str | None) -> dict[str, Any]:
    def option(name: str) -> dict[str, Any]:
        return {"text": {"type": "plain_text", "text": name[:75]}, "value": name[:150]}

    shown = models[:MAX_MENU_OPTIONS]
    select: dict[str, Any] = {
        "type": "static_select",
        "action_id": MODEL_SELECT,
        "placeholder": {"type": "plain_text", "text": "Switch this channel's model"},
        "options": [option(m) for m in shown],
    }
    if current in shown:
        select["initial_option"] = option(current)
    return {"type": "actions", "block_id": "model", "elements": [select]}
