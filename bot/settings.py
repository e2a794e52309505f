"""Parley's settings: the only module that reads the environment (and `.env`)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import limits
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CLOUD_URL = "https://ollama.com"
DEFAULT_OLLAMA_PORT = 11434


def parse_ollama_host(value: str | None) -> str:
    """Turn OLLAMA_HOST into a base URL the way the Ollama CLI does.

    Bare host → http://, default port 11434, 0.0.0.0 / :: → loopback, a path is kept.
    """
    raw = (value or "").strip()
    if not raw:
        return f"http://127.0.0.1:{DEFAULT_OLLAMA_PORT}"
    scheme = "http"
    default_port = DEFAULT_OLLAMA_PORT
    if "://" in raw:
        scheme, raw = raw.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r} (use http or https)")
        default_port = 80 if scheme == "http" else 443
    host_port, _, path = raw.partition("/")
    if host_port.startswith("["):  # IPv6 literal
        end = host_port.find("]")
        host, rest = host_port[1:end], host_port[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    elif host_port.count(":") == 1:
        host, port = host_port.split(":")
    else:
        host, port = host_port, ""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    port_number = int(port) if port else default_port
    shown = f"[{host}]" if ":" in host else host
    path = path.rstrip("/")
    return f"{scheme}://{shown}:{port_number}" + (f"/{path}" if path else "")


LOCAL_OLLAMA_CAP = 4  # what Ollama runs in parallel on a machine with the memory for it


class BackendConfig(BaseModel):
    """One model server."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["ollama", "openai"]
    url: str
    api_key: SecretStr | None = None
    cloud: bool = False  # serves `X-cloud` / `X:cloud` models without the suffix
    concurrency: int | None = Field(default=None, ge=0)  # generations at once; 0: no cap

    def cap(self, default: int | None) -> int:
        """Generations this backend runs at once, for all replicas (0: no cap): its own
        `concurrency`, else PARLEY_BACKEND_CONCURRENCY, else by kind — a local Ollama runs a few
        at once (OLLAMA_NUM_PARALLEL) and queues the rest where no one sees their place; Ollama
        Cloud and OpenAI-compatible servers take many."""
        if self.concurrency is not None:
            return self.concurrency
        if default is not None:
            return default
        return LOCAL_OLLAMA_CAP if self.kind == "ollama" and not self.cloud else 0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)


def http_url(value: str) -> str:
    """`value` without its trailing slash, if it is an http(s) URL with a host."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value.rstrip("/")


def json_setting(value: Any, empty: Any) -> Any:
    """A setting given as JSON text, parsed (`empty` for blank text); other values as given."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return empty
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at position {e.pos})") from None


ThinkLevel = Literal["low", "medium", "high", "max"]
_DURATION = re.compile(r"0|[-+]?(\d+(\.\d*)?(ns|us|µs|ms|s|m|h))+")  # Go's time.ParseDuration


class ModelOptions(BaseModel):
    """How one model (or a glob of them) answers: PARLEY_MODEL_OPTIONS' values. Ollama takes
    them as `options`, `keep_alive` and `think`; the OpenAI kind as its own fields."""

    model_config = {"extra": "forbid"}

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    num_ctx: int | None = Field(default=None, ge=256)
    num_predict: int | None = Field(default=None, ge=1)
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=4)
    seed: int | None = None
    think: bool | ThinkLevel | None = None
    keep_alive: int | str | None = None

    @field_validator("think", mode="before")
    @classmethod
    def _think(cls, value: Any) -> Any:
        if value is None or isinstance(value, bool) or value in get_args(ThinkLevel):
            return value
        raise ValueError(f"must be true, false, or a level: {', '.join(get_args(ThinkLevel))}")

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, str) and not _DURATION.fullmatch(value):
            raise ValueError(f"{value[:20]!r} is not seconds or a duration like '10m' or '-1s'")
        return value


class RateLimit(BaseModel):
    """A request rate such as 10/minute (the `limits` library's notation)."""

    count: int
    seconds: int
    text: str


def parse_rate(value: str) -> RateLimit:
    """A rate in the `limits` library's notation: `10/minute`, `100 per hour`, `5/2 minutes`."""
    try:
        item = limits.parse(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a rate like '10/minute' or '100 per hour'") from None
    if item.amount < 1:
        raise ValueError("the count must be at least 1")
    return RateLimit(count=item.amount, seconds=item.get_expiry(), text=str(item))


def redis_nodes(url: str, default_port: int) -> list[tuple[str, int]]:
    """The host:port list of a `scheme://[user:password@]host:port[,host:port…]/…` URL (Sentinel
    and Cluster URLs name several); ValueError, without the password, for a malformed one."""
    nodes = []
    for node in urlsplit(url).netloc.rpartition("@")[2].split(","):
        host, colon, port = node.rpartition(":")
        if not colon:
            host, port = node, ""
        if not host or (colon and not port.isdigit()):
            raise ValueError(f"needs host:port[,host:port…] (got {node!r})")
        nodes.append((host, int(port or default_port)))
    return nodes


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PARLEY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,  # `KEY=` (a copied .env.example) is unset, not an empty value
        populate_by_name=True,
    )

    # --- backends ---
    backends: Annotated[list[BackendConfig], NoDecode] = Field(default_factory=list)
    ollama_host: str | None = Field(default=None, validation_alias="OLLAMA_HOST")
    ollama_api_key: SecretStr | None = Field(default=None, validation_alias="OLLAMA_API_KEY")
    default_model: str | None = None
    # generations at once per backend, shared by all replicas (0: no cap); unset: by kind
    backend_concurrency: int | None = Field(default=None, ge=0)
    catalog_ttl: float = Field(default=30.0, ge=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    first_token_timeout: float = Field(default=300.0, gt=0)  # models load on first use
    idle_timeout: float = Field(default=60.0, gt=0)
    # model name or glob → options; every entry that matches applies, a later one over an earlier
    model_options: Annotated[dict[str, ModelOptions], NoDecode] = Field(default_factory=dict)
    think: Literal["off", "on", "low", "medium", "high", "max"] | None = None  # thinking models

    # --- state ---
    redis_url: SecretStr | None = None  # may carry a password
    redis_prefix: str = "parley:"
    redis_max_connections: int = Field(default=200, ge=4)
    data_dir: Path = Path("data")
    history_max_messages: int = Field(default=50, ge=2)
    history_ttl_days: float = Field(default=30.0, gt=0)
    context_tokens: int = Field(default=4096, ge=256)
    reply_reserve_tokens: int = Field(default=1024, ge=0)
    summaries: bool = True  # fold what no longer fits a thread's window into a summary
    summary_model: str | None = None  # writes those summaries (default: the thread's model)
    dedup_ttl: int = Field(default=600, ge=1)

    # --- users ---
    rate_limit: Annotated[RateLimit, NoDecode] = Field(
        default_factory=lambda: parse_rate("10/minute")
    )
    max_in_flight: int = Field(default=2, ge=1)
    token_budget: Annotated[RateLimit | None, NoDecode] = None  # tokens per person, e.g. 200000/day
    max_prompt_chars: int = Field(default=4000, ge=10)  # a channel's system prompt
    allow_bots: bool = False  # answer other bots' messages (never our own)
    bot_turns: int = Field(default=3, ge=1)  # then a thread stops answering bots
    max_input_chars: int = Field(default=8000, ge=1)
    turn_timeout: float = Field(default=600.0, gt=0)
    system_prompt: str = (
        "You are Parley, a helpful assistant in a team chat. Answer concisely in Markdown."
    )

    # --- rendering ---
    edit_interval: float = Field(default=1.0, ge=0.05)
    show_model_footer: bool = False

    # --- attachments ---
    max_attachments: int = Field(default=4, ge=0)  # files read per message; more are named
    max_attachment_bytes: int = Field(default=10_000_000, ge=1)
    max_file_chars: int = Field(default=20_000, ge=100)  # text of one file given to the model
    attachment_timeout: float = Field(default=30.0, gt=0)  # seconds to download one file
    image_max_side: int = Field(default=1568, ge=64)  # pixels: larger images are scaled down
    # images a thread keeps for follow-ups, and their bytes in Redis: about what the default
    # context can carry (3,072 tokens for history at ~800 an image; docs/benchmarks.md §5)
    thread_images: int = Field(default=4, ge=1)
    thread_image_bytes: int = Field(default=4_000_000, ge=100_000)
    vision_model: str | None = None  # answers turns with images when the channel's cannot see
    vision_models: Annotated[list[str], NoDecode] = Field(default_factory=list)  # globs, openai

    # --- tools ---
    web_search: bool = False  # offer web_search and web_fetch to models that call tools
    web_search_api_key: SecretStr | None = None  # else OLLAMA_API_KEY
    web_search_url: str = "https://ollama.com"  # /api/web_search and /api/web_fetch
    tool_steps: int = Field(default=4, ge=1, le=20)  # rounds of tool calls in one reply
    tool_timeout: float = Field(default=20.0, gt=0)  # seconds for one tool call
    tool_models: Annotated[list[str], NoDecode] = Field(default_factory=list)  # globs, openai

    # --- logging / http ---
    log_level: str = "INFO"
    http_port: int = Field(default=3000, ge=0, le=65535)
    http_host: str = "0.0.0.0"
    shutdown_grace: float = Field(default=20.0, ge=0)  # seconds replies get to finish on SIGTERM
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"  # auto: uvloop where installed

    # --- Slack ---
    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None  # xapp-…: Socket Mode
    slack_signing_secret: SecretStr | None = None  # HTTP mode
    slack_api_url: str = "https://slack.com/api/"
    slack_thread_followups: bool = True
    slack_native_streaming: bool = False
    slack_update_budget: int = Field(default=50, ge=1)  # chat.update calls/min per workspace
    slack_agent: bool = False  # the app is declared an agent: agent sessions, Slack's own Stop
    slack_allowed_channels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    slack_allowed_users: Annotated[list[str], NoDecode] = Field(default_factory=list)
    slack_model_admins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- Discord ---
    discord_token: SecretStr | None = None
    discord_api_url: str | None = None  # e.g. http://proxy:8080/api/v10
    discord_gateway_url: str | None = None
    discord_shard_count: int | None = Field(default=None, ge=1)
    discord_shard_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    discord_guild_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    discord_use_threads: bool = False
    discord_allowed_guilds: Annotated[list[int], NoDecode] = Field(default_factory=list)
    discord_allowed_channels: Annotated[list[int], NoDecode] = Field(default_factory=list)
    discord_allowed_roles: Annotated[list[int], NoDecode] = Field(default_factory=list)
    discord_allowed_users: Annotated[list[int], NoDecode] = Field(default_factory=list)
    discord_model_role: int | None = None  # only this role (or admins) may switch models
    discord_model_admin_only: bool = False

    @field_validator("backends", mode="before")
    @classmethod
    def _backends(cls, value: Any) -> Any:
        return json_setting(value, [])

    @field_validator("model_options", mode="before")
    @classmethod
    def _model_options(cls, value: Any) -> Any:
        if isinstance(value, str) and not isinstance(value := json_setting(value, {}), dict):
            raise ValueError('must be a JSON object, like {"qwen3*": {"temperature": 0.6}}')
        return value

    @field_validator("rate_limit", "token_budget", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_rate(value) if value.strip() else None
        return value

    @field_validator(
        "slack_allowed_channels", "slack_allowed_users", "slack_model_admins", mode="before"
    )
    @classmethod
    def _slack_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            ids = [v for v in re.split(r"[,\s]+", value.strip()) if v]
            if bad := next((v for v in ids if not re.fullmatch(r"[A-Z0-9]{2,30}", v)), None):
                raise ValueError(f"{bad[:40]!r} is not a Slack id (like C0123ABCD or U0123ABCD)")
            return ids
        return value

    @field_validator("vision_models", "tool_models", mode="before")
    @classmethod
    def _globs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v for v in re.split(r"[,\s]+", value.strip()) if v]
        return value

    @field_validator(
        "discord_shard_ids",
        "discord_guild_ids",
        "discord_allowed_guilds",
        "discord_allowed_channels",
        "discord_allowed_roles",
        "discord_allowed_users",
        mode="before",
    )
    @classmethod
    def _id_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(v) for v in re.split(r"[,\s]+", value.strip()) if v]
        return value

    @field_validator("slack_api_url")
    @classmethod
    def _slack_url(cls, value: str) -> str:
        return value if value.endswith("/") else value + "/"  # slack_sdk joins with urljoin

    @field_validator("ollama_host")
    @classmethod
    def _ollama_host(cls, value: str | None) -> str | None:
        return None if value is None else parse_ollama_host(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value())
        scheme = parts.scheme
        schemes = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
        if scheme not in (*schemes, "redis+cluster", "rediss+cluster"):
            raise ValueError(  # the URL itself may carry a password: name only its scheme
                f"scheme {scheme!r} is not redis://, rediss://, unix://, redis+sentinel:// "
                "or redis+cluster://"
            )
        if scheme.endswith(("+cluster", "+sentinel")):
            try:
                redis_nodes(value.get_secret_value(), 0)
            except ValueError as e:
                raise ValueError(f"{scheme}:// {e}") from None
            if scheme.endswith("+cluster") and parts.path.strip("/") not in ("", "0"):
                raise ValueError("Redis Cluster has only database 0")
        return value

    @field_validator("redis_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("must not contain { or } (they are Redis Cluster hash tags)")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        names = [b.name for b in self.backends]
        if len(names) != len(set(names)):
            raise ValueError("PARLEY_BACKENDS: backend names must be unique")
        if self.discord_shard_ids:
            if self.discord_shard_count is None:
                raise ValueError("PARLEY_DISCORD_SHARD_IDS: needs PARLEY_DISCORD_SHARD_COUNT")
            if not all(0 <= i < self.discord_shard_count for i in self.discord_shard_ids):
                raise ValueError(
                    "PARLEY_DISCORD_SHARD_IDS: every id must be from 0 to below "
                    "PARLEY_DISCORD_SHARD_COUNT"
                )
        if self.web_search and self.search_key() is None:
            raise ValueError(
                "PARLEY_WEB_SEARCH: needs an Ollama API key "
                "(PARLEY_WEB_SEARCH_API_KEY or OLLAMA_API_KEY)"
            )
        try:
            http_url(self.web_search_url)
        except ValueError as e:
            raise ValueError(f"PARLEY_WEB_SEARCH_URL: {e}") from None
        if self.slack_app_token and not self.slack_app_token.get_secret_value().startswith("xapp-"):
            raise ValueError("PARLEY_SLACK_APP_TOKEN: must be an app-level token (xapp-…)")
        return self

    def backend_caps(self) -> dict[str, int]:
        return {c.name: c.cap(self.backend_concurrency) for c in self.backend_configs()}

    def search_key(self) -> SecretStr | None:
        """The web search service's key: its own, else the Ollama Cloud key."""
        return self.web_search_api_key or self.ollama_api_key

    def backend_configs(self) -> list[BackendConfig]:
        """PARLEY_BACKENDS if given, else local Ollama (OLLAMA_HOST) + Ollama Cloud with a key."""
        if self.backends:
            configs = list(self.backends)
            if self.ollama_api_key and not any(b.cloud for b in configs):
                configs.append(self._cloud())
            return configs
        local = BackendConfig(
            name="local", kind="ollama", url=self.ollama_host or parse_ollama_host(None)
        )
        return [local, self._cloud()] if self.ollama_api_key else [local]

    def _cloud(self) -> BackendConfig:
        return BackendConfig(
            name="cloud", kind="ollama", url=CLOUD_URL, api_key=self.ollama_api_key, cloud=True
        )


_FIELD_ENV = {"ollama_host": "OLLAMA_HOST", "ollama_api_key": "OLLAMA_API_KEY"}


def describe_validation_error(error: ValidationError) -> str:
    """One line naming the first bad setting and what is wrong with it."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    field = loc[0] if loc else ""
    env = _FIELD_ENV.get(field, f"PARLEY_{field.upper()}") if field else "settings"
    where = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden" and field == "model_options":
        message = f"not an option (options are {', '.join(ModelOptions.model_fields)})"
    if message.startswith("PARLEY_"):
        return f"invalid setting {message}"
    return f"invalid setting {env}{where}: {message}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings, or print one line naming the bad setting and exit with status 2."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        print(f"parley: {describe_validation_error(e)}", file=sys.stderr)
        raise SystemExit(2) from None
