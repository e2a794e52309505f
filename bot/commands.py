"""model / reset / help, the same on every platform."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bot.errors import ThreadBusy, close_matches
from bot.router import Router
from bot.state import State
from bot.turn import ConversationKey

NAMES = ("model", "reset", "help")
RESET_WAIT = 2.0  # seconds `reset` waits for a reply in progress (slash commands answer in 3)
_TEXT_COMMAND = re.compile(r"^\s*/?(?:parley\s+)?(model|reset|help)(?:\s+(\S+))?\s*$", re.I)

HELP = """\
**Parley** answers with a language model. Mention me in a channel, message me directly, or keep \
talking in a thread I've answered in — I remember the thread.

- `model` — show this channel's model and the ones available
- `model <name>` — switch this channel to another model (`model default` goes back)
- `reset` — forget this thread's history
- `help` — this message"""


@dataclass(frozen=True)
class CommandReply:
    text: str  # Markdown, ready to show
    models: list[str] = field(default_factory=list)  # the catalog, when models are concerned
    current: str | None = None  # the channel's model, for `model`


def parse_text_command(text: str) -> tuple[str, str] | None:
    """`model`, `model llama3.2`, `/reset`, `help` typed as a message → (name, args).

    Only a bare command word with at most one argument counts: "help me write a poem" is a
    question, not a command.
    """
    match = _TEXT_COMMAND.match(text)
    if not match:
        return None
    return match[1].lower(), match[2] or ""


class Commands:
    def __init__(self, *, router: Router, state: State, default_model: str | None) -> None:
        self.router = router
        self.state = state
        self.default_model = default_model

    async def current_model(self, key: ConversationKey) -> str | None:
        """The channel's model, else the configured default, else the first one served."""
        prefs = await self.state.preferences(key)
        if prefs.model:
            return prefs.model
        if self.default_model:
            return self.default_model
        names = await self.router.model_names()
        return names[0] if names else None

    async def run(
        self, name: str, args: str, key: ConversationKey, *, may_switch: bool = True
    ) -> CommandReply:
        match name:
            case "model":
                if args.strip() and not may_switch:
                    return CommandReply(
                        "Only the people allowed to choose models here can switch them. "
                        "`model` shows the current one.",
                        current=await self.current_model(key),
                    )
                return await self._model(args.strip(), key)
            case "reset":
                return await self._reset(key)
            case _:
                return CommandReply(HELP)

    async def _reset(self, key: ConversationKey) -> CommandReply:
        """Forget the thread — not under a reply being written, which would save it again."""
        try:
            async with self.state.thread_lock(key, expire=30.0, wait=RESET_WAIT):
                forgot = await self.state.forget(key)
        except ThreadBusy:
            return CommandReply(
                "I'm still answering here — try `reset` again once that reply has finished."
            )
        if forgot:
            return CommandReply("Done — I've forgotten this thread.")
        return CommandReply("There was nothing to forget in this thread.")

    async def _model(self, wanted: str, key: ConversationKey) -> CommandReply:
        names = await self.router.model_names()
        if not wanted:
            current = await self.current_model(key)
            if not names:
                unreachable = ", ".join(f"`{n}`" for n in self.router.errors) or "every backend"
                return CommandReply(
                    f"Current model: `{current or 'none'}`. I can't list models right now "
                    f"({unreachable} unreachable).",
                    current=current,
                )
            seeing = set(await self.router.vision_models())
            listing = "\n".join(
                f"- `{n}`"
                + (" 👁 sees images" if n in seeing else "")
                + (" ← current" if n == current else "")
                for n in names
            )
            return CommandReply(
                f"Current model here: `{current}`\n\nAvailable:\n\n{listing}\n\n"
                "Switch with `model <name>`.",
                models=names,
                current=current,
            )
        if wanted.lower() == "default":
            await self.state.set_preference(key, "model", None)
            current = await self.current_model(key)
            return CommandReply(f"Back to the default model, `{current}`.", names, current)
        found = await self.router.find(wanted)
        if found is None:
            hints = close_matches(wanted, names)
            hint = (" Did you mean " + ", ".join(f"`{h}`" for h in hints) + "?") if hints else ""
            return CommandReply(
                f"I don't know the model `{wanted}`.{hint} `model` lists the available ones.",
                models=names,
                current=await self.current_model(key),
            )
        await self.state.set_preference(key, "model", found)
        return CommandReply(f"This channel now uses `{found}`.", models=names, current=found)
