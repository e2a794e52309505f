"""Runs one Turn end to end — the one path every message takes, on every platform."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from bot.access import NOT_ALLOWED
from bot.attachments import Limits, prepare
from bot.backends.base import Done, Image, Message, Options, ToolCall
from bot.commands import CommandReply, Commands, parse_text_command
from bot.errors import (
    BackendError,
    InputTooLong,
    ModelNotFound,
    NoModelAvailable,
    NotRegenerable,
    ParleyError,
    StateUnavailable,
    ThreadBusy,
    TokensSpent,
    UserRateLimited,
    close_matches,
    describe,
)
from bot.logs import turn_id
from bot.markdown import clean_text, cut_short, queued
from bot.metrics import Metrics
from bot.options import plan
from bot.prompt import CHARS_PER_TOKEN, build_messages, measure
from bot.ratelimit import EditBudgets, Limiter, TokenBudget
from bot.router import Generation, Router
from bot.settings import Settings
from bot.state import (
    REDIS_DOWN,
    HistoryEntry,
    InFlightSlot,
    State,
    TurnStart,
    image_id,
    turn_token,
)
from bot.streaming import Renderer, RenderResult, Status, wait_first
from bot.summary import Fold, Summaries
from bot.tools import Source, WebTools, progress, sources_note
from bot.turn import ConversationKey, MessageRef, ReplyChain, ReplySink, Turn, message

log = logging.getLogger(__name__)

__all__ = ["CommandReply", "Conversation", "Outcome"]

SHUTTING_DOWN = "Parley is restarting — please ask again in a moment."


class Outcome(StrEnum):
    COMPLETE = "complete"
    ERROR = "error"
    STOPPED = "stopped"
    DUPLICATE = "duplicate"
    COMMAND = "command"
    REFUSED = "refused"
    IGNORED = "ignored"  # not for Parley (thread chatter in a conversation it is not part of)


def stop_token(turn: Turn) -> str:
    """What a Stop button carries to name the reply it stops."""
    return turn_token(turn.key.platform, turn.event_id)


class Conversation:
    def __init__(
        self,
        *,
        settings: Settings,
        state: State,
        limiter: Limiter,
        router: Router,
        budgets: EditBudgets,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.limiter = limiter
        self.budgets = budgets  # the platforms' shared edit budgets
        self.router = router
        self.metrics = metrics or Metrics()
        self.tokens = TokenBudget(limiter, settings.token_budget) if settings.token_budget else None
        self.commands = Commands(router=router, state=state, settings=settings, tokens=self.tokens)
        self.attachment_limits = Limits(
            count=settings.max_attachments,
            bytes=settings.max_attachment_bytes,
            file_chars=settings.max_file_chars,
            timeout=settings.attachment_timeout,
            image_side=settings.image_max_side,
        )
        self.summaries = Summaries(settings=settings, state=state, router=router)
        self.tools = WebTools(settings) if settings.web_search else None
        self.accepting = True
        self._active: dict[str, asyncio.Event] = {}  # stop token → its stop signal
        self._idle = asyncio.Event()
        self._idle.set()

    # --- adapters' entry points ---

    async def handle(self, turn: Turn, sink: ReplySink) -> Outcome:
        """Answer one message: commands, limits, history, model, stream, save.

        Never raises: whatever goes wrong, the person is told (or, for a message that may not
        be meant for Parley, nothing is said) and everything the turn held is let go.
        """
        turn_id.set(turn.event_id[-12:])
        if not self.accepting:
            await _best_effort(sink.notify(SHUTTING_DOWN))
            return Outcome.REFUSED
        try:
            if turn.from_bot and not self.settings.allow_bots:
                return Outcome.IGNORED  # two bots must never talk to each other by default
            if turn.only_if_active and not await self._is_active(turn):
                return Outcome.IGNORED
            if not self.commands.access(turn.key.platform).may_use(turn.asker):
                await _best_effort(sink.notify(NOT_ALLOWED))
                return Outcome.REFUSED
            turn = await self._in_its_conversation(turn)
            if turn.regenerates:
                return await self._turn(turn, sink)
            command = parse_text_command(turn.text)
            too_long = len(turn.text) > self.settings.max_input_chars
            if command is not None or too_long or not turn.text.strip():
                if not await self.state.first_sighting(turn.key.platform, turn.event_id):
                    return Outcome.DUPLICATE
                if command is not None:
                    await sink.post(message((await self.command(turn, *command)).text))
                    return Outcome.COMMAND
                if too_long:
                    raise InputTooLong(len(turn.text), self.settings.max_input_chars)
                await sink.notify("Ask me something after the mention — or try `help`.")
                return Outcome.REFUSED
            return await self._turn(turn, sink)
        except (UserRateLimited, TokensSpent, InputTooLong, ThreadBusy, NotRegenerable) as e:
            if isinstance(e, UserRateLimited):
                self.metrics.user_rate_limited.labels(turn.key.platform).inc()
            await _best_effort(sink.notify(describe(e)))
            return Outcome.REFUSED
        except REDIS_DOWN as e:
            # Without Redis there is no de-duplication, history or limit: answering anyway
            # could answer twice across replicas, so say so and keep nothing half-done.
            log.error("redis unavailable: %s", _reason(e))
            await _best_effort(sink.post(message(describe(StateUnavailable()))))
            self.metrics.replies.labels(turn.key.platform, "error").inc()
            return Outcome.ERROR
        except Exception as e:
            log.exception("turn failed unexpectedly")
            await _best_effort(sink.post(message(describe(e))))
            self.metrics.replies.labels(turn.key.platform, "error").inc()
            return Outcome.ERROR

    async def command(self, turn: Turn, name: str, args: str) -> CommandReply:
        """Run `model`, `reset` or `help`; never raises (a failure is the reply's words)."""
        args = clean_text(args)  # a slash command's option, as it came
        if not self.commands.access(turn.key.platform).may_use(turn.asker):
            return CommandReply(NOT_ALLOWED)
        try:
            return await self.commands.run(name, args, turn)
        except REDIS_DOWN as e:
            log.error("redis unavailable: %s", _reason(e))
            return CommandReply(describe(StateUnavailable()))
        except Exception as e:
            log.exception("the %s command failed", name)
            return CommandReply(describe(e))

    async def model_names(self) -> list[str]:
        return await self.router.model_names()

    async def stop(self, token: str, *, user_id: str, is_admin: bool = False) -> str | None:
        """A Stop button was pressed. None if stopping; else why not, in words for the presser.

        The reply may be generating on another replica: the request goes through Redis.
        """
        try:
            owner = await self.state.turn_owner(token)
            if owner is None:
                return "That reply has already finished."
            if owner != user_id and not is_admin:
                return "Only the person who asked (or an admin) can stop this reply."
            if (local := self._active.get(token)) is not None:
                local.set()
            else:
                await self.state.publish_stop(token)
        except REDIS_DOWN as e:
            log.error("could not stop a reply: redis unavailable: %s", _reason(e))
            return describe(StateUnavailable())
        return None

    async def stop_in_thread(
        self, key: ConversationKey, *, user_id: str, is_admin: bool = False
    ) -> str | None:
        """A platform's own stop control for a thread (Slack's agent session) was pressed: stop
        the reply being written there, as the Stop button would. None, or why not in words."""
        try:
            token = await self.state.reply_in_progress(key)
        except REDIS_DOWN as e:
            log.error("could not stop a reply: redis unavailable: %s", _reason(e))
            return describe(StateUnavailable())
        if token is None:
            return "There is no answer being written here."
        return await self.stop(token, user_id=user_id, is_admin=is_admin)

    async def regenerate(
        self,
        token: str,
        asker: Turn,
        sink: ReplySink,
        *,
        chain: ReplyChain | None = None,
    ) -> Outcome:
        """Regenerate was pressed on a finished reply (on any replica): answer its thread's last
        question again, in place of that reply, with every limit applying to `asker` (a Turn
        naming who pressed it, and the press as its event id — the reply's Stop button carries
        `stop_token(asker)`; its key and text are not used). `chain`: where conversations are
        reply chains, the pressed message's."""
        try:
            found = await self.state.reply(token)
        except REDIS_DOWN as e:
            log.error("redis unavailable: %s", _reason(e))
            await _best_effort(sink.notify(describe(StateUnavailable())))
            return Outcome.ERROR
        if found is None:
            await _best_effort(sink.notify("That answer is too old to regenerate."))
            return Outcome.REFUSED
        key, _ = found
        turn = replace(
            asker,
            key=key,
            text="",
            event_id=asker.event_id or f"regen-{uuid.uuid4().hex}",
            regenerates=token,
            chain=chain,
            attachments=(),
        )
        return await self.handle(turn, sink)

    async def feedback(self, token: str, *, user_id: str, vote: str) -> str | None:
        """👍 or 👎 on a finished reply: one vote per person (the last click counts), counted in
        the metrics by model and logged with the reply's turn id. None, or why not in words."""
        turn_id.set(token[-12:])
        try:
            found = await self.state.reply(token)
            if found is None:
                return "That answer is too old for feedback."
            before = await self.state.vote(token, user_id, vote)
        except REDIS_DOWN as e:
            log.error("redis unavailable: %s", _reason(e))
            return describe(StateUnavailable())
        model = found[1]
        if before != vote:
            self.metrics.feedback.labels(model, vote).inc()
            if before is not None:
                self.metrics.feedback_retracted.labels(model, before).inc()
        log.info("feedback: %s on a reply of %s (by %s)", vote, model, user_id)
        return None

    async def listen_for_stops(self) -> None:
        """Run forever: stop requests from other replicas reach our own replies."""
        async for token in self.state.stop_requests():
            if (event := self._active.get(token)) is not None:
                event.set()

    async def drain(self, grace: float) -> None:
        """Take no new turns; let replies finish for `grace` seconds, then stop the rest."""
        self.accepting = False
        margin = min(2.0, grace * 0.2)  # time left to finalise what is stopped
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, grace - margin))
        if self._active:
            log.info("grace period over: stopping %d replies", len(self._active))
            for event in self._active.values():
                event.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), margin + 5.0)
        await self.summaries.aclose()  # a fold cut short leaves its thread's history whole

    # --- which conversation ---

    async def _is_active(self, turn: Turn) -> bool:
        """Whether the bot is part of the conversation a maybe-unaddressed message is in.

        Without Redis there is no telling: such a message (thread chatter, perhaps not for
        Parley at all) gets no answer, rather than a storage notice in every thread.
        """
        try:
            return await self.state.is_active(turn.key)
        except REDIS_DOWN as e:
            log.error("redis unavailable; a thread message goes unanswered: %s", _reason(e))
            return False

    async def _in_its_conversation(self, turn: Turn) -> Turn:
        """A reply continues the conversation of the message it replies to, if that is known."""
        if turn.chain is None or not turn.chain.replies_to:
            return turn
        root = await self.state.chain_root(turn.key, turn.chain.replies_to)
        if root is None or root == turn.key.thread:
            return turn
        return replace(turn, key=replace(turn.key, thread=root))

    # --- the answer ---

    async def _turn(self, turn: Turn, sink: ReplySink) -> Outcome:
        """Three Redis round trips in the common case: one starts the turn (de-dup, thread
        lock, Stop-button owner, history, preferences); for a fresh event only (a duplicate
        delivery must cost the user nothing) the rate check and an in-flight slot, side by side;
        one finishes it. Whatever the first took is given back on every way out."""
        start = await self.state.begin_turn(
            turn.key,
            event_id=turn.event_id,
            owner=turn.user_id,
            expire=self.settings.turn_timeout,
        )
        slot: InFlightSlot | None = None
        asked = _Asked(HistoryEntry("user", turn.text, turn.user_id, turn.user_name))
        renderer = Renderer(sink, budgets=self.budgets, on_post=self._chain_recorder(turn))
        renderer.controls = True  # its last message carries Regenerate, 👍 and 👎
        entries: list[HistoryEntry] = []
        counted: bool | None = None  # a bot turn answered (True) or a person's (False)
        replacing = 0  # history entries the exchange replaces (a regenerated answer)
        try:
            if not start.fresh:
                log.info("duplicate event ignored")
                return Outcome.DUPLICATE
            if turn.from_bot and start.bot_streak >= self.settings.bot_turns:
                log.info("a bot's message ignored: %d bot turns in a row here", start.bot_streak)
                return Outcome.IGNORED
            slot = self.limiter.slot(turn.key.platform, turn.user_id)
            await asyncio.gather(
                self.limiter.admit(turn.key.platform, turn.user_id, slot),
                self._within_budget(turn),
            )
            if not start.locked:  # another message of this thread is being answered
                start = await self.state.wait_for_thread(start)
            if turn.regenerates:  # the same question again, in place of the answer it had
                asked.entry, replacing = _regenerable(start, turn.regenerates)
                start = replace(start, history=start.history[:-replacing])
            result, model = await self._answer(turn, renderer, start, asked)
            counted = turn.from_bot
            said = result.text[asked.rounds.answer_from :]
            answer = HistoryEntry("assistant", said, model=model, reply=start.token)
            entries = [asked.entry, *asked.rounds.entries] + ([answer] if said.strip() else [])
            return Outcome(result.status.value)
        except asyncio.CancelledError:
            if renderer.text.strip():  # stopped by shutdown: keep what was said
                entries = [asked.entry, HistoryEntry("assistant", renderer.text)]
            raise
        finally:
            saved = {i: asked.images[i] for e in entries for i in e.images if i in asked.images}
            done = _Done(entries, slot, saved, counted, replacing if entries else 0)
            await asyncio.shield(self._finish(start, done, sink))
            if entries and asked.fold is not None and self.accepting:
                self.summaries.start(asked.fold)  # after the reply: it never waits for this

    def _chain_recorder(self, turn: Turn) -> Callable[[MessageRef], Awaitable[None]] | None:
        """Where conversations are reply chains: record each message of the reply as it is
        posted (before anyone can reply to it), and the question with the first."""
        if turn.chain is None:
            return None
        pending = [turn.chain.message_id]

        async def record(ref: MessageRef) -> None:
            ids = [*pending, ref.id]
            try:
                await self.state.remember_chain(turn.key, ids)
            except REDIS_DOWN as e:  # a reply to it then starts a conversation of its own
                log.warning("could not record a reply chain: %s", _reason(e))
                return
            pending.clear()

        return record

    async def _finish(self, start: TurnStart, done: _Done, sink: ReplySink) -> None:
        """Save the exchange, free the thread, the slot and the Stop token: one round trip."""
        entries = done.entries
        try:
            await self.state.finish_turn(
                start,
                entries,
                slot=done.slot,
                images=done.images,
                from_bot=done.from_bot,
                replacing=done.replacing,
            )
        except REDIS_DOWN as e:
            log.error(
                "redis unavailable: the exchange is not saved (the rest lapses): %s", _reason(e)
            )
            if entries:
                await _best_effort(sink.notify(describe(StateUnavailable(after_reply=True))))
        except Exception:
            log.exception("finishing the turn failed (what it held lapses by itself)")

    async def _answer(
        self, turn: Turn, renderer: Renderer, start: TurnStart, asked: _Asked
    ) -> tuple[RenderResult, str]:
        """Read the attachments, choose the model, stream its reply; the reply always reaches a
        final state. `asked` gets the person's message as it is to be remembered."""
        started = time.monotonic()
        stop = asyncio.Event()
        self._active[start.token] = stop
        self._idle.clear()
        model = ""
        self.metrics.in_flight.inc()
        # the placeholder goes out while the model request starts: neither waits for the other
        posting = asyncio.create_task(renderer.begin())
        try:
            try:
                model = start.prefs.model or await self._default_model()
                model, images = await self._read_attachments(turn, model, start, asked, renderer)
                renderer.before_final = self._reply_recorder(start, model)
                profile, rate = await asyncio.gather(
                    self.router.profile(model), self._chars_per_token(model)
                )
                asking = plan(model, self.settings, profile)
                offered = self.tools.offered(profile) if self.tools else ()
                options = replace(asking.options, tools=offered)
                system = start.prefs.system_prompt or self.settings.system_prompt
                prompt = build_messages(
                    system=system,
                    history=list(start.history),
                    turn=asked.entry,
                    budget_tokens=asking.prompt_tokens,
                    images=images,
                    chars_per_token=rate,
                    summary=start.summary.text,
                    tools=bool(offered),
                )
                messages = prompt.messages
                if self.settings.summaries:  # what no longer fits is summarised after the reply
                    asked.fold = Fold.wanted(
                        start.key,
                        model,
                        asking,
                        system,
                        prompt,
                        len(start.history),
                        self.state.history_max,
                        rate,
                    )
            except ParleyError as e:
                await posting
                result = await self._failed(renderer, e)
            else:
                result = await self._generate(
                    turn, model, messages, options, asked, renderer, stop, started, posting
                )
        except asyncio.CancelledError:
            await asyncio.gather(asyncio.shield(posting), return_exceptions=True)
            await asyncio.shield(renderer.finish(Status.STOPPED))
            raise
        except Exception as e:  # nothing anticipated it: the reply still gets its final state
            log.exception("turn failed unexpectedly")
            await asyncio.gather(posting, return_exceptions=True)
            result = await renderer.finish(Status.ERROR, describe(e))
        finally:
            self.metrics.in_flight.dec()
            del self._active[start.token]
            if not self._active:
                self._idle.set()
        self._observe(turn, result, started)
        return result, model

    def _reply_recorder(self, start: TurnStart, model: str) -> Callable[[], Awaitable[None]]:
        """Before a reply shows its buttons: remember its thread and model for them."""

        async def record() -> None:
            try:
                await self.state.remember_reply(start.token, start.key, model)
            except REDIS_DOWN as e:  # its buttons will say the answer is too old
                log.warning("redis unavailable: the reply's buttons will not work: %s", e)

        return record

    async def _within_budget(self, turn: Turn) -> None:
        """Raise TokensSpent while the person's token budget is used up."""
        if self.tokens is not None:
            await self.tokens.check(turn.key.platform, turn.user_id)

    async def _spend(self, turn: Turn, result: RenderResult, model: str, backend: str) -> None:
        """Count the tokens the backend reported: the person's budget, and the metric."""
        done = result.done
        if done is None:
            return
        for kind, count in (("prompt", done.prompt_tokens), ("completion", done.completion_tokens)):
            self.metrics.tokens.labels(backend, model, kind).inc(count)
        if self.tokens is not None:
            try:
                await self.tokens.spend(
                    turn.key.platform, turn.user_id, done.prompt_tokens + done.completion_tokens
                )
            except REDIS_DOWN as e:
                log.error("redis unavailable: the reply's tokens are not counted: %s", _reason(e))

    async def _chars_per_token(self, model: str) -> float:
        """`model`'s measured characters per token, else the cautious guess."""
        try:
            return await self.state.chars_per_token(model) or CHARS_PER_TOKEN
        except REDIS_DOWN as e:
            log.warning("redis unavailable: history is packed by the rough count: %s", _reason(e))
            return CHARS_PER_TOKEN

    async def _calibrate(self, model: str, messages: list[Message], prompt_tokens: int) -> None:
        """Learn `model`'s characters per token from what its backend counted for a prompt."""
        measured = measure(messages, prompt_tokens)
        if measured is None:
            return
        try:
            await self.state.calibrate(model, measured)
        except REDIS_DOWN as e:
            log.warning("redis unavailable: a token count is not learnt from: %s", _reason(e))

    async def _read_attachments(
        self, turn: Turn, model: str, start: TurnStart, asked: _Asked, renderer: Renderer
    ) -> tuple[str, dict[str, Image] | None]:
        """The attachments made into text and images (and a line in the reply for each that
        could not be used); the model that answers (the vision model, where the channel's cannot
        see), and the thread's images it is sent (None: it cannot see them)."""
        prepared = await prepare(turn.attachments, self.attachment_limits)
        renderer.notes.extend(f"📎 {note}" for note in prepared.notes)
        new = {image_id(): image for image in prepared.images}
        if turn.attachments:  # (a regenerated question keeps what it was asked with)
            asked.images = new
            asked.entry = replace(asked.entry, content=prepared.text(turn.text), images=tuple(new))
        # the thread's newest images, as many as it keeps (ids sort by time)
        images = dict(sorted({**start.images, **new}.items())[-self.settings.thread_images :])
        shown = {i for e in [*start.history, asked.entry] for i in e.images if i in images}
        if not shown or await self.router.sees_images(model):
            return model, images
        vision = self.settings.vision_model
        if new and vision and vision != model:
            renderer.notes.append(f"📎 `{model}` can't see images, so `{vision}` answered this.")
            return vision, images
        if new:
            can = [f"`{m}`" for m in await self._vision_quietly()]
            which = f" Models that can: {', '.join(can)} (`model <name>`)." if can else ""
            renderer.notes.append(f"📎 `{model}` can't see images: I answered the text.{which}")
        return model, None

    async def _generate(
        self,
        turn: Turn,
        model: str,
        messages: list[Message],
        options: Options,
        asked: _Asked,
        renderer: Renderer,
        stop: asyncio.Event,
        started: float,
        posting: asyncio.Task[None],
    ) -> RenderResult:
        """Stream into the renderer until done, failed, or stopped; always finalise."""
        served: list[Generation] = []
        rounds = asked.rounds
        person = f"{turn.key.platform}:{turn.user_id}"

        def waiting(ahead: int) -> None:  # queued at a backend with a cap: where
            renderer.working(f"_{queued(ahead)}_")

        async def pump() -> None:
            asking = list(messages)
            offered = options
            while True:
                generation = await self.router.open(
                    model, asking, offered, person=person, place=waiting
                )
                renderer.working("")
                served.append(generation)
                if len(served) == 1:
                    self.metrics.first_token.observe(time.monotonic() - started)
                calls: list[ToolCall] = []
                before = len(renderer.text)
                async for chunk in generation:
                    if isinstance(chunk, ToolCall):
                        calls.append(chunk)
                    elif isinstance(chunk, Done):
                        rounds.count(chunk)
                    else:
                        renderer.feed(chunk)
                if not calls or not offered.tools or self.tools is None:
                    break  # (a model offered no tools that still calls one is not obeyed)
                said = renderer.text[before:]
                asking.append(Message("assistant", said, tool_calls=tuple(calls)))
                rounds.entries.append(
                    HistoryEntry("assistant", said, model=model, calls=tuple(calls))
                )
                for call in calls:
                    result = await self._run_tool(call, rounds, renderer)
                    asking.append(
                        Message("tool", result, tool_call_id=call.id, tool_name=call.name)
                    )
                    rounds.entries.append(
                        HistoryEntry("tool", result, tool_call_id=call.id, tool_name=call.name)
                    )
                renderer.working("")
                rounds.answer_from = len(renderer.text)
                if rounds.calls >= self.settings.tool_steps:
                    offered = replace(offered, tools=())  # now answer with what was found
            if rounds.done is not None:
                renderer.feed(rounds.done)

        work = asyncio.create_task(pump())
        try:
            await posting
            await wait_first(asyncio.shield(work), stop.wait())
        except asyncio.CancelledError:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work  # closing the stream stops generation upstream
            raise
        if not work.done():  # stopped: close the stream, which stops generation upstream
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            return await renderer.finish(Status.STOPPED)
        try:
            work.result()
        except ModelNotFound as e:
            e.suggestions = close_matches(e.model, await self._names_quietly())
            return await self._failed(renderer, e)
        except (BackendError, ParleyError) as e:
            return await self._failed(renderer, e)
        except Exception as e:
            log.exception("the model stream failed unexpectedly")
            return await self._failed(renderer, e)
        generation = served[-1]
        if renderer.done is not None and renderer.done.reason == "length":
            renderer.notes.append(cut_short(options.num_predict))
        footer = f"_— {generation.model} via {generation.backend}_"
        result = await renderer.finish(
            Status.COMPLETE, footer=footer if self.settings.show_model_footer else None
        )
        await self._spend(turn, result, generation.model, generation.backend)
        if result.done is not None and len(served) == 1:  # (counted for one prompt only)
            await self._calibrate(model, messages, result.done.prompt_tokens)
        return result

    async def _run_tool(self, call: ToolCall, rounds: _Rounds, renderer: Renderer) -> str:
        """Run one tool call the model made, showing what it does meanwhile; its result."""
        assert self.tools is not None
        if rounds.calls >= self.settings.tool_steps:
            limit = self.settings.tool_steps
            return f"error: the limit of {limit} tool calls for one answer was reached"
        rounds.calls += 1
        renderer.working(f"_{progress(call)}_")
        result = await self.tools.run(call)
        self.metrics.tool_calls.labels(call.name, "error" if result.failed else "ok").inc()
        if result.sources:
            rounds.sources.extend(result.sources)
            if rounds.sources_note in renderer.notes:
                renderer.notes.remove(rounds.sources_note)
            rounds.sources_note = sources_note(rounds.sources)
            renderer.notes.append(rounds.sources_note)
        return result.content

    async def _failed(self, renderer: Renderer, error: Exception) -> RenderResult:
        log.warning("turn failed: %s: %s", type(error).__name__, error)
        if isinstance(error, BackendError):
            self.metrics.backend_errors.labels(error.backend, type(error).__name__).inc()
        return await renderer.finish(Status.ERROR, describe(error))

    def _observe(self, turn: Turn, result: RenderResult, started: float) -> None:
        m = self.metrics
        m.replies.labels(turn.key.platform, result.status.value).inc()
        m.edits_per_reply.observe(result.edits)
        if result.rate_limited:
            m.platform_rate_limited.labels(turn.key.platform).inc(result.rate_limited)
        if result.first_visible_at is not None:
            m.first_visible.observe(result.first_visible_at - started)
        if result.done is not None and result.done.eval_seconds > 0:
            m.tokens_per_second.observe(result.done.completion_tokens / result.done.eval_seconds)

    async def _default_model(self) -> str:
        if self.settings.default_model:
            return self.settings.default_model
        names = await self.router.model_names()
        if not names:
            if self.router.errors:  # say why: an unreachable server reads better than "none"
                raise next(iter(self.router.errors.values()))
            raise NoModelAvailable()
        return names[0]

    async def _vision_quietly(self) -> list[str]:
        try:
            return (await self.router.vision_models())[:5]
        except Exception:
            return []

    async def _names_quietly(self) -> list[str]:
        try:
            return await self.router.model_names()
        except Exception:
            return []


@dataclass(frozen=True)
class _Done:
    """What finishing a turn saves and gives back."""

    entries: list[HistoryEntry]
    slot: InFlightSlot | None
    images: dict[str, Image]
    from_bot: bool | None
    replacing: int


def _regenerable(start: TurnStart, token: str) -> tuple[HistoryEntry, int]:
    """The question of the thread's newest answer, if `token` names that answer, and how many
    entries its exchange has (the question, the tools it called, the answer)."""
    history = start.history
    if history and history[-1].reply == token:
        asked = max((i for i, e in enumerate(history) if e.role == "user"), default=None)
        if asked is not None:
            return history[asked], len(history) - asked
    raise NotRegenerable()


@dataclass
class _Asked:
    """The person's message as it will be remembered (with its files' text and image ids)."""

    entry: HistoryEntry
    images: dict[str, Image] = field(default_factory=dict)
    fold: Fold | None = None  # the thread's oldest turns no longer fit: summarise them after
    rounds: _Rounds = field(default_factory=lambda: _Rounds())  # the tools the answer called


@dataclass
class _Rounds:
    """An answer's tool calls: what to remember of them, the sources they found, the tokens
    every request of the answer counted."""

    entries: list[HistoryEntry] = field(default_factory=list)  # calls and results, in order
    answer_from: int = 0  # where the answer's text after the last call starts
    calls: int = 0  # calls run
    sources: list[Source] = field(default_factory=list)
    sources_note: str = ""
    done: Done | None = None  # the last request's end, with every request's counts

    def count(self, done: Done) -> None:
        if self.done is None:
            self.done = done
            return
        self.done = Done(
            reason=done.reason,
            prompt_tokens=self.done.prompt_tokens + done.prompt_tokens,
            completion_tokens=self.done.completion_tokens + done.completion_tokens,
            eval_seconds=self.done.eval_seconds + done.eval_seconds,
        )


def _reason(error: BaseException) -> str:
    """One line for the log: the error's type and message, no traceback."""
    return f"{type(error).__name__}: {error}"


async def _best_effort(awaitable: Awaitable[object]) -> None:
    try:
        await awaitable
    except Exception as e:
        log.warning("could not tell the user: %s", e)
