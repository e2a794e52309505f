"""A real model behind an OpenAI-compatible server: does it stop at the cap Parley sends?

    python -m bench.real_model --url http://127.0.0.1:8088 [--reserve 32] [--model ID]

It needs the server running (no network here: docs/benchmarks.md §6 has the commands that
build llama.cpp's server and a 270M-parameter Gemma from PyPI packages alone). It streams one
request straight to the server with `max_tokens`, then answers one question through Parley
(one OpenAI-kind backend, PARLEY_REPLY_RESERVE_TOKENS = --reserve, a Redis of its own), and
prints what each saw: the finish reason, the tokens streamed, the reply's last line, the time.
Exit status 0 when both stopped at their cap and Parley's reply ends with the cut-short note.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import parley, print_table, redis_server
from bot.markdown import cut_short
from bot.settings import Settings
from bot.turn import ConversationKey, Frame, MessageRef, Turn, WaitingState

QUESTION = (
    "Write a long, detailed essay about the history of the bicycle, from the first designs to "
    "today, with many examples."
)


@dataclass
class Shown:
    """A platform that only remembers what its one reply shows (no limits but a cadence)."""

    max_chars: int = 4000
    min_edit_interval: float = 0.2
    calls: int = 0
    text: list[str] = field(default_factory=list)

    async def post(self, frame: Frame) -> MessageRef:
        self.calls += 1
        self.text.append(frame.text)
        return MessageRef(str(len(self.text) - 1))

    async def edit(self, ref: MessageRef, frame: Frame) -> None:
        self.calls += 1
        self.text[int(ref.id)] = frame.text

    async def notify(self, text: str) -> None:
        self.text.append(text)

    async def show_waiting(self, state: WaitingState) -> None:
        return None


async def direct(url: str, model: str, cap: int) -> dict[str, object]:
    """One streamed request straight to the server with max_tokens = cap."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": cap,
        "stream": True,
    }
    reason, chunks, text = None, 0, ""
    started = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices") or []:
                if piece := (choice.get("delta") or {}).get("content"):
                    chunks, text = chunks + 1, text + piece
                reason = choice.get("finish_reason") or reason
    return {
        "finish": reason,
        "chunks": chunks,
        "chars": len(text),
        "seconds": round(time.monotonic() - started, 2),
    }


async def through_parley(url: str, model: str, reserve: int) -> dict[str, object]:
    async with redis_server() as redis_url:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "backends": [{"name": "real", "kind": "openai", "url": url}],
            "default_model": model,
            "reply_reserve_tokens": reserve,
            "edit_interval": 0.2,
        }
        config = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        async with parley(config) as app:
            key = ConversationKey("bench", "S", "C", "1.0")
            sink = Shown()
            started = time.monotonic()
            outcome = await app.conversation.handle(
                Turn(key, "U", "bench", QUESTION, uuid.uuid4().hex), sink
            )
            seconds = time.monotonic() - started
    reply = "\n".join(sink.text)
    return {
        "outcome": str(outcome),
        "last line": reply.splitlines()[-1] if reply else "",
        "cut note": cut_short(reserve) in reply,
        "platform calls": sink.calls,
        "seconds": round(seconds, 2),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8088")
    parser.add_argument("--model", help="default: the first model the server lists")
    parser.add_argument("--reserve", type=int, default=32, help="Parley's reply cap (tokens)")
    parser.add_argument("--direct-cap", type=int, default=16)
    args = parser.parse_args()
    async with httpx.AsyncClient(base_url=args.url, timeout=10) as client:
        listed = (await client.get("/v1/models")).json()["data"]
    model = args.model or listed[0]["id"]
    straight = await direct(args.url, model, args.direct_cap)
    parleys = await through_parley(args.url, model, args.reserve)
    print_table(
        f"{model} at {args.url}",
        ["asked", "cap", "result"],
        [
            ["directly", args.direct_cap, json.dumps(straight)],
            ["through Parley", args.reserve, json.dumps(parleys, ensure_ascii=False)],
        ],
    )
    stopped = straight["finish"] == "length" and straight["chunks"] == args.direct_cap
    return 0 if stopped and parleys["cut note"] and parleys["outcome"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
