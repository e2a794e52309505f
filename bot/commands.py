"""model / prompt / reset / usage / help, the same on every platform."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bot.access import Access
from bot.errors import ThreadBusy, close_matches, seconds_in_words
from bot.ratelimit import TokenBudget
from bot.router import Router
from bot.settings import Settings
from bot.state import State
from bot.turn import ConversationKey, Turn

NAMES = ("model", "prompt", "reset", "usage", "help")
RESET_WAIT = 2.0  # seconds `reset` waits for a reply in progress (slash commands answer in 3)
_TEXT_COMMAND = re.compile(r"^\s*/?(?:parley\s+)?(model|reset|usage|help)(?:\s+(\S+))?\s*$", re.I)
# `prompt` takes the rest of the message as the channel's new system prompt
_PROMPT_COMMAND = re.compile(r"^\s*/?(?:parley\s+)?prompt\b(?:\s+(.*))?$", re.I | re.S)

HELP = """\
**Parley** answers with a language model. Mention me in a channel, message me directly, or keep \
talking in a thread I've answered in — I remember the thread.

- `model` — show this channel's model and the ones available
- `model <name>` — switch this channel to another model (`model default` goes back)
- `prompt` — show this channel's system prompt; `prompt <text>` sets it, `prompt default` resets it
- `reset` — forget this thread's history
- `usage` — how many tokens you have used, and your limit
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
    if prompt := _PROMPT_COMMAND.match(text):
        return "prompt", (prompt[1] or "").strip()
    match = _TEXT_COMMAND.match(text)
    if not match:
        return None
    return match[1].lower(), match[2] or ""


class Commands:
    def __init__(
        self,
        *,
        router: Router,
        state: State,
        settings: Settings,
        tokens: TokenBudget | None = None,
    ) -> None:
        self.router = router
        self.state = state
        self.default_model = settings.default_model
        self.default_prompt = settings.system_prompt
        self.max_prompt_chars = settings.max_prompt_chars
        self.tokens = tokens
        self.rules = {p: Access.for_platform(settings, p) for p in ("slack", "discord")}

    def access(self, platform: str) -> Access:
        """The access rules of a platform (none on the console)."""
        return self.rules.get(platform, Access())

    async def current_model(self, key: ConversationKey) -> str | None:
        """The channel's model, else the configured default, else the first one served."""
        prefs = await self.state.preferences(key)
        if prefs.model:
            return prefs.model
        if self.default_model:
            return self.default_model
        names = await self.router.model_names()
        return names[0] if names else None

    async def run(self, name: str, args: str, turn: Turn) -> CommandReply:
        key = turn.key
        access = self.access(key.platform)
        changes = name in ("model", "prompt") and bool(args.strip())
        if changes and not access.may_configure(turn.asker):
            return CommandReply(
                access.configure_refusal() + " `model` and `prompt` show the current ones.",
                current=await self.current_model(key),
            )
        match name:
            case "model":
                return await self._model(args.strip(), key)
            case "prompt":
                return await self._prompt(args.strip(), key)
            case "reset":
                return await self._reset(key)
            case "usage":
                return await self._usage(turn)
            case _:
                return CommandReply(HELP)

    async def _prompt(self, wanted: str, key: ConversationKey) -> CommandReply:
        """Show, set or reset the channel's system prompt."""
        if not wanted:
            prefs = await self.state.preferences(key)
            if prefs.system_prompt:
                return CommandReply(f"This channel's prompt:\n\n{_quoted(prefs.system_prompt)}")
            return CommandReply(
                f"This channel uses the default prompt:\n\n{_quoted(self.default_prompt)}\n\n"
                "Set its own with `prompt <text>`."
            )
        if wanted.lower() == "default":
            await self.state.set_preference(key, "system_prompt", None)
            return CommandReply("Back to the default prompt.")
        if len(wanted) > self.max_prompt_chars:
            return CommandReply(
                f"That prompt is {len(wanted):,} characters; the limit is "
                f"{self.max_prompt_chars:,}. Please shorten it."
            )
        await self.state.set_preference(key, "system_prompt", wanted)
        return CommandReply(f"This channel's prompt is now:\n\n{_quoted(wanted)}")

    async def _usage(self, turn: Turn) -> CommandReply:
        if self.tokens is None:
            return CommandReply("There is no token limit here.")
        usage = await self.tokens.usage(turn.key.platform, turn.user_id)
        text = f"You've used {usage.used:,} of your {usage.limit:,} tokens for this {usage.period}."
        if usage.used:
            text += f" It resets in {seconds_in_words(usage.resets_in)}."
        return CommandReply(text)

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


def _quoted(text: str) -> str:
    """A prompt shown back as a Markdown quote."""
    return "\n".join(f"> {line}" for line in text.splitlines() or [""])
