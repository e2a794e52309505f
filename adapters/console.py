"""The console chat: the same pipeline as Slack and Discord, in a terminal or a pipe.

In a terminal the reply streams live (rich); when stdin is not a terminal, each input line is
one message and each final reply is printed whole, for scripting.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import uuid
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from bot.app import Parley
from bot.turn import ConversationKey, Frame, MessageRef, Turn, WaitingState

PROMPT = "you> "


@dataclass
class ConsoleSink:
    """Keeps the reply's messages; shows them live when a Live display is attached."""

    live: Live | None = None
    max_chars: int = 1_000_000
    min_edit_interval: float = 0.05
    messages: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    async def post(self, frame: Frame) -> MessageRef:
        self.messages.append(frame.text)
        self._refresh()
        return MessageRef(str(len(self.messages) - 1))

    async def edit(self, ref: MessageRef, frame: Frame) -> None:
        self.messages[int(ref.id)] = frame.text
        self._refresh()

    async def notify(self, text: str) -> None:
        self.notices.append(text)

    async def show_waiting(self, state: WaitingState) -> None:
        return None  # the placeholder says it

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(Markdown("\n\n".join(self.messages)))


class ConsoleAdapter:
    def __init__(
        self,
        parley: Parley,
        *,
        thread: str = "main",
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        interactive: bool | None = None,
    ) -> None:
        self.parley = parley
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.key = ConversationKey("console", "local", "console", thread)
        self.user = getpass.getuser()
        self.console = Console(file=self.stdout, highlight=False)

    async def run(self) -> int:
        if self.interactive:
            self.console.print(
                "[bold]Parley[/bold] console chat — type a message, `/model`, `/reset`, `/help`;"
                " Ctrl-D to quit."
            )
        while True:
            line = await asyncio.to_thread(self._read_line)
            if line is None:
                return 0
            text = line.strip()
            if not text:
                continue
            await self.say(text)

    def _read_line(self) -> str | None:
        if self.interactive:
            try:
                return input(PROMPT)
            except EOFError:
                return None
        line = self.stdin.readline()
        return line if line else None

    async def say(self, text: str) -> ConsoleSink:
        """Run one message through the core and show the reply."""
        turn = Turn(self.key, self.user, self.user, text, uuid.uuid4().hex, is_admin=True)
        if self.interactive:
            with Live(console=self.console, refresh_per_second=12, transient=False) as live:
                sink = ConsoleSink(live=live)
                await self.parley.conversation.handle(turn, sink)
        else:
            sink = ConsoleSink()
            await self.parley.conversation.handle(turn, sink)
            for message in sink.messages:
                print(message, file=self.stdout, flush=True)
        for notice in sink.notices:
            print(notice, file=self.stdout, flush=True)
        return sink
