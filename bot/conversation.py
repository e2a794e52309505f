"""Runs one Turn end to end — the one path every message takes, on every platform."""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum

from redis.exceptions import RedisError

from bot.commands import CommandReply, Commands, parse_text_command
from bot.errors import (
    BackendError,
    InputTooLong,
    ModelNotFound,
    NoModelAvailable,
    ParleyError,
    StateUnavailable,
    UserRateLimited,
    close_matches,
    describe,
)
from bot.prompt import build_messages
from bot.ratelimit import Limiter
from bot.router import Router
from bot.settings import Settings
from bot.state import HistoryEntry, State
from bot.streaming import Renderer, RenderResult, Status
from bot.turn import ConversationKey, ReplySink, Turn

log = logging.getLogger(__name__)

__all__ = ["CommandReply", "Conversation", "Outcome"]


class Outcome(StrEnum):
    COMPLETE = "complete"
    ERROR = "error"
    STOPPED = "stopped"
    DUPLICATE = "duplicate"
    COMMAND = "command"
    REFUSED = "refused"


class Conversation:
    def __init__(
        self, *, settings: Settings, state: State, limiter: Limiter, router: Router
    ) -> None:
        self.settings = settings
        self.state = state
        self.limiter = limiter
        self.router = router
        self.commands = Commands(router=router, state=state, default_model=settings.default_model)

    # --- adapters' entry points ---

    async def handle(self, turn: Turn, sink: ReplySink) -> Outcome:
        """Answer one message: commands, limits, history, model, stream, save."""
        try:
            if not await self.state.first_sighting(turn.key.platform, turn.event_id):
                log.info("duplicate event %s ignored", turn.event_id)
                return Outcome.DUPLICATE
            if (command := parse_text_command(turn.text)) is not None:
                reply = await self.command(turn, *command)
                await sink.post(reply.text)
                return Outcome.COMMAND
            if len(turn.text) > self.settings.max_input_chars:
                raise InputTooLong(len(turn.text), self.settings.max_input_chars)
            if not turn.text.strip():
                await sink.notify("Ask me something after the mention — or try `help`.")
                return Outcome.REFUSED
            await self.limiter.check_rate(turn.key.platform, turn.user_id)
            async with (
                self.limiter.in_flight(turn.key.platform, turn.user_id),
                self.state.thread_lock(turn.key, expire=self.settings.turn_timeout),
            ):
                return await self._answer(turn, sink)
        except (UserRateLimited, InputTooLong) as e:
            await sink.notify(describe(e))
            return Outcome.REFUSED
        except (RedisError, OSError) as e:
            log.error("redis unavailable: %s", e)
            await _best_effort(sink.post(describe(StateUnavailable())))
            return Outcome.ERROR

    async def command(self, turn: Turn, name: str, args: str) -> CommandReply:
        return await self.commands.run(name, args, turn.key)

    async def model_names(self) -> list[str]:
        return await self.router.model_names()

    async def is_active(self, key: ConversationKey) -> bool:
        return await self.state.is_active(key)

    # --- the answer ---

    async def _answer(self, turn: Turn, sink: ReplySink) -> Outcome:
        renderer = Renderer(sink)
        await renderer.begin()  # the user sees we're on it within one round trip
        said = HistoryEntry("user", turn.text, turn.user_id, turn.user_name)
        model = ""
        result: RenderResult | None = None
        try:
            history = await self.state.history(turn.key)
            prefs = await self.state.preferences(turn.key)
            model = prefs.model or await self._default_model()
            messages = build_messages(
                system=prefs.system_prompt or self.settings.system_prompt,
                history=history,
                turn=said,
                budget_tokens=self.settings.context_tokens - self.settings.reply_reserve_tokens,
            )
            generation = await self.router.open(model, messages)
            async for chunk in generation:
                renderer.feed(chunk)
            footer = (
                f"_— {generation.model} via {generation.backend}_"
                if (self.settings.show_model_footer)
                else None
            )
            result = await renderer.finish(Status.COMPLETE, footer=footer)
        except ModelNotFound as e:
            e.suggestions = close_matches(e.model, await self._names_quietly())
            result = await renderer.finish(Status.ERROR, describe(e))
        except (BackendError, ParleyError) as e:
            log.warning("turn failed: %r", e)
            result = await renderer.finish(Status.ERROR, describe(e))
        except asyncio.CancelledError:
            await asyncio.shield(renderer.finish(Status.STOPPED))
            await self._save(turn, said, renderer.text, model)
            raise
        except (RedisError, OSError):
            raise
        except Exception as e:
            log.exception("turn failed unexpectedly")
            result = await renderer.finish(Status.ERROR, describe(e))
        await self._save(turn, said, result.text, model)
        return Outcome(result.status.value)

    async def _save(self, turn: Turn, said: HistoryEntry, answer: str, model: str) -> None:
        entries = [said]
        if answer.strip():
            entries.append(HistoryEntry("assistant", answer, model=model))
        try:
            await self.state.append(turn.key, *entries)
        except (RedisError, OSError) as e:
            log.error("could not save history: %s", e)

    async def _default_model(self) -> str:
        if self.settings.default_model:
            return self.settings.default_model
        names = await self.router.model_names()
        if not names:
            raise NoModelAvailable()
        return names[0]

    async def _names_quietly(self) -> list[str]:
        try:
            return await self.router.model_names()
        except Exception:
            return []


async def _best_effort(awaitable: object) -> None:
    try:
        await awaitable  # type: ignore[misc]
    except Exception as e:
        log.warning("could not tell the user: %s", e)
