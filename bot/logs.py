"""Logging: JSON lines when not on a terminal, a turn id on every line of a turn, no secrets."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

turn_id: contextvars.ContextVar[str] = contextvars.ContextVar("turn_id", default="")


class TurnIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.turn_id = turn_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "turn_id", ""):
            data["turn"] = record.turn_id  # type: ignore[attr-defined]
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str, *, quiet: bool = False, json_lines: bool | None = None) -> None:
    """Configure the root logger once; `quiet` keeps chat/CLI output clean (warnings only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TurnIdFilter())
    if json_lines if json_lines is not None else not sys.stderr.isatty():
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(turn_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else getattr(logging, level.upper(), logging.INFO))
    for noisy in ("httpx", "httpcore", "discord.gateway", "discord.client", "slack_bolt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
