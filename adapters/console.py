"""The console chat: the same pipeline as Slack and Discord, in a terminal or a pipe.

In a terminal the reply streams live (rich); when stdin is not a terminal, each input line is
one message and each final reply is printed whole, for scripting.
"""

from __future__ import annotations

import asyncio
import getpass
import mimetypes
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from bot.app import Parley
from bot.turn import Attachment, ConversationKey, Frame, MessageRef, Turn, WaitingState

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


def local_file(path: Path) -> Attachment:
    """A file on this machine as an attachment: its name, its type by extension, its size."""

    async def read(limit: int) -> bytes:
        def head() -> bytes:
            with path.open("rb") as f:
                return f.read(limit + 1)

        return await asyncio.to_thread(head)

    media_type = mimetypes.guess_type(path.name)[0] or ""
    return Attachment(path.name, media_type, path.stat().st_size, read)


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
        self.pending: list[Attachment] = []  # files for the next message

    async def run(self) -> int:
        if self.interactive:
            self.console.print(
                "[bold]Parley[/bold] console chat — type a message, `/model`, `/reset`, `/help`,"
                " `/attach PATH` (then your question); Ctrl-D to quit."
            )
        while True:
            line = await asyncio.to_thread(self._read_line)
            if line is None:
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/attach"):
                self.attach(text.removeprefix("/attach").strip())
                continue
            await self.say(text)

    def attach(self, path: str) -> None:
        """`/attach PATH`: the file goes with the next message (repeat for more)."""
        file = Path(path).expanduser()
        if not path or not file.is_file():
            print(f"parley: no file at {path!r}", file=self.stdout, flush=True)
            return
        self.pending.append(local_file(file))
        print(f"attached {file.name}; it goes with your next message", file=self.stdout, flush=True)

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
        attachments, self.pending = tuple(self.pending), []
        turn = Turn(
            self.key,
            self.user,
            self.user,
            text,
            uuid.uuid4().hex,
            is_admin=True,
            attachments=attachments,
        )
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
