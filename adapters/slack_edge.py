"""What arrives from Slack, checked before anything acts on it. Pure: tested directly.

In HTTP mode a request is verified on its raw bytes (signature and timestamp window) before
anything parses it. Then the body — an Events API callback, a slash command, an interaction —
is read into Parley's own types, in HTTP and Socket Mode alike. Only what Parley handles and what
validates goes on to bolt, rebuilt from those types, so nothing bolt's own parsing could trip
over reaches it; what Parley does not handle is acknowledged (Slack would retry anything else),
and what is malformed is refused or dropped with a reason for one log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlencode

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from bot.markdown import clean_text

MAX_TEXT = 40_000  # Slack cuts a message's text at 40,000 characters
STALE_AFTER = 300  # seconds: Slack's own advice for the signature's timestamp window

Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Ts = Annotated[str, StringConstraints(pattern=r"^\d{1,12}(\.\d{1,9})?$")]
Short = Annotated[str, StringConstraints(max_length=512)]
Url = Annotated[str, StringConstraints(pattern=r"^https?://\S{1,2000}$")]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]

Kind = Literal["events_api", "slash_commands", "interactive"]


class _Model(BaseModel):
    """Reads what Parley uses, ignores the rest; a missing or mistyped field fails."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class SlackFile(_Model):
    """A file on a message (`files[]`): what Parley needs to fetch it."""

    id: Id
    name: Annotated[str, StringConstraints(max_length=512)] = "file"
    mimetype: Short = ""
    size: int | None = Field(default=None, ge=0)
    url_private_download: Url | None = None
    mode: Short | None = None  # "tombstone": deleted; "external": only a link

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        return _readable(value)


class SlackMessage(_Model):
    """An `app_mention` or `message` event."""

    type: Literal["app_mention", "message"]
    channel: Id
    ts: Ts
    user: Id | None = None
    text: Text = ""
    thread_ts: Ts | None = None
    channel_type: Short | None = None
    subtype: Short | None = None
    bot_id: Short | None = None
    bot_profile: dict[str, Any] | None = None
    team: Id | None = None
    files: list[SlackFile] = Field(default_factory=list, max_length=50)

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _readable(value)


class AgentSessionStopped(_Model):
    """Someone pressed Slack's own Stop on an agent session (apps declared as agents)."""

    type: Literal["agent_session_stopped"]
    channel: Id
    thread_ts: Ts | None = None
    user: Id | None = None
    streaming_message_ts: list[Ts] = Field(default_factory=list, max_length=50)
    event_ts: Ts | None = None


class EventCallback(_Model):
    type: Literal["event_callback"]
    team_id: Id | None = None
    api_app_id: Id | None = None
    event_id: Short | None = None
    event_time: int | None = None
    event: SlackMessage | AgentSessionStopped = Field(discriminator="type")


class SlashCommand(_Model):
    command: Annotated[str, StringConstraints(pattern=r"^/[\w-]{1,32}$")]
    text: Text = ""
    channel_id: Id
    user_id: Id
    team_id: Id | None = None
    response_url: Url | None = None
    trigger_id: Short | None = None

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _readable(value)


class Option(_Model):
    value: Short


class Action(_Model):
    action_id: Short
    type: Short | None = None
    block_id: Short | None = None
    value: Short | None = None
    selected_option: Option | None = None
    action_ts: Ts | None = None


class Named(_Model):
    id: Id
    team_id: Id | None = None


class Container(_Model):
    type: Short | None = None
    channel_id: Id | None = None
    message_ts: Ts | None = None
    thread_ts: Ts | None = None


class Posted(_Model):
    ts: Ts | None = None
    thread_ts: Ts | None = None


class BlockActions(_Model):
    """A click on a block element (the model menu, the Stop button)."""

    type: Literal["block_actions"]
    user: Named
    team: Named | None = None
    channel: Named | None = None
    container: Container | None = None
    message: Posted | None = None
    actions: list[Action] = Field(min_length=1, max_length=25)
    response_url: Url | None = None
    trigger_id: Short | None = None
    api_app_id: Id | None = None

    @property
    def channel_id(self) -> str:
        if self.channel is not None:
            return self.channel.id
        if self.container is not None and self.container.channel_id:
            return self.container.channel_id
        return ""

    @property
    def thread_ts(self) -> str | None:
        if self.container is not None and self.container.thread_ts:
            return self.container.thread_ts
        return self.message.thread_ts if self.message is not None else None


def _readable(value: Any) -> Any:
    """What a person wrote, as Parley reads it: no text is "" (a file share may come without);
    lone surrogates and control characters are cleaned before the type is checked (pydantic
    refuses a string with a lone surrogate, and a question must not be lost for one)."""
    if value is None:
        return ""
    return clean_text(value) if isinstance(value, str) else value


# --- verdicts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """Parley handles this: hand bolt `payload`, rebuilt from the validated types."""

    kind: Kind
    payload: dict[str, Any]

    def http_body(self) -> tuple[str, str]:
        """The body and content type bolt reads in HTTP mode."""
        if self.kind == "events_api":
            return json.dumps(self.payload), "application/json"
        if self.kind == "interactive":
            form = {"payload": json.dumps(self.payload)}
        else:
            form = {k: str(v) for k, v in self.payload.items()}
        return urlencode(form), "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Challenge:
    """Slack checks a new Request URL: answer with the challenge."""

    challenge: str


@dataclass(frozen=True)
class Ignore:
    """Nothing for Parley (acknowledged, so Slack does not retry): `reason` for a debug line,
    or, with `dropped`, for a warning (something of Parley's own arrived malformed)."""

    reason: str
    dropped: bool = False


@dataclass(frozen=True)
class Reject:
    """Not a request Slack sent: refused with `status` and one log line (never the body)."""

    status: int
    reason: str


Verdict = Forward | Challenge | Ignore | Reject


# --- HTTP mode: the raw request -------------------------------------------------------------


def verify(body: bytes, headers: dict[str, str], secret: str, now: float) -> str | None:
    """Why this request was not signed by Slack with `secret` just now, or None if it was."""
    timestamp = headers.get("x-slack-request-timestamp")
    signature = headers.get("x-slack-signature")
    if not timestamp or not signature:
        return "unsigned"
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return "malformed timestamp"
    if abs(now - int(timestamp)) > STALE_AFTER:
        return "stale timestamp"
    # Slack's v0 scheme on the bytes as sent (slack_sdk's verifier would decode them as UTF-8
    # first, and fail on a body that is not)
    base = b"v0:" + timestamp.encode() + b":" + body
    expected = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        return "bad signature"
    return None


def read_http(body: bytes, content_type: str) -> tuple[Kind, dict[str, Any]] | Challenge | Reject:
    """A verified HTTP request's body, as Socket Mode would deliver it: its kind and payload."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return Reject(400, "body is not UTF-8")
    if content_type == "application/json":
        try:
            data = json.loads(text)
        except ValueError:
            return Reject(400, "body is not JSON")
        if not isinstance(data, dict):
            return Reject(400, "body is not a JSON object")
        if data.get("type") == "url_verification":
            challenge = data.get("challenge")
            if isinstance(challenge, str) and 0 < len(challenge) <= 512:
                return Challenge(challenge)
            return Reject(400, "url_verification without a challenge")
        return "events_api", data
    if content_type == "application/x-www-form-urlencoded":
        try:
            fields = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
        except ValueError:
            return Reject(400, "body is not a form")
        form = {name: values[-1] for name, values in fields.items()}
        if "payload" in form:
            try:
                payload = json.loads(form["payload"])
            except ValueError:
                return Reject(400, "payload is not JSON")
            if not isinstance(payload, dict):
                return Reject(400, "payload is not a JSON object")
            return "interactive", payload
        if "command" in form:
            return "slash_commands", form
        return Reject(400, "a form with neither a command nor a payload")
    return Reject(415, f"content type {content_type[:40]!r}")


# --- both modes: the payload ----------------------------------------------------------------


def read_payload(
    kind: str,
    payload: Any,
    *,
    commands: tuple[str, ...] = (),
    actions: tuple[str, ...] = (),
) -> Verdict:
    """An Events API, slash-command or interaction payload: Forward what Parley handles
    (`commands`, `actions`: the ones its listeners take), rebuilt from what validated."""
    if not isinstance(payload, dict):
        return Ignore(f"{kind} payload is not an object", dropped=True)
    try:
        match kind:
            case "events_api":
                return _event(payload)
            case "slash_commands":
                command = SlashCommand.model_validate(payload)
                if commands and command.command not in commands:
                    return Ignore(f"command {command.command} is not Parley's")
                return Forward("slash_commands", command.model_dump(exclude_none=True))
            case "interactive":
                if payload.get("type") != "block_actions":
                    return Ignore(f"interaction of type {str(payload.get('type'))[:40]!r}")
                click = BlockActions.model_validate(payload)
                if actions and click.actions[0].action_id not in actions:
                    return Ignore(f"action {click.actions[0].action_id[:40]!r} is not Parley's")
                return Forward("interactive", click.model_dump(exclude_none=True))
    except ValidationError as e:
        return Ignore(f"{kind}: {_first_problem(e)}", dropped=True)
    return Ignore(f"envelope of type {kind[:40]!r}")


def _event(payload: dict[str, Any]) -> Verdict:
    if payload.get("type") != "event_callback":
        return Ignore(f"events_api payload of type {str(payload.get('type'))[:40]!r}")
    event = payload.get("event")
    if not isinstance(event, dict):
        return Ignore("event_callback without an event object", dropped=True)
    if event.get("type") not in ("app_mention", "message", "agent_session_stopped"):
        return Ignore(f"event of type {str(event.get('type'))[:40]!r}")
    callback = EventCallback.model_validate(payload)
    return Forward("events_api", callback.model_dump(exclude_none=True))


def _first_problem(error: ValidationError) -> str:
    """`field.path: what is wrong` for a log line (never the value itself)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"[:200]
