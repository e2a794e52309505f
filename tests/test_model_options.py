"""Per-model options, capped replies, context windows and thinking: from PARLEY_MODEL_OPTIONS to
the request each backend kind sends, against the fake model server (which honours num_predict /
max_tokens and refuses what a model cannot do, as Ollama does)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.app import Parley
from bot.backends.base import Content, Done, ModelInfo, Thinking
from bot.conversation import Outcome
from bot.markdown import THINKING, cut_short
from bot.options import plan
from bot.settings import Settings, load_settings
from bot.state import HistoryEntry
from bot.streaming import Status
from bot.turn import ConversationKey, Phase, Turn
from tests.fakes.model_server import FakeModelServer, Script, count_tokens
from tests.sinks import RecordingSink
from tests.support import make_settings
from tests.test_streaming import on_loop_clock

KEY = ConversationKey("slack", "T1", "C1", "1700000000.000100")


def turn(text: str) -> Turn:
    return Turn(KEY, "U1", "ada", text, uuid.uuid4().hex)


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def model_server() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer(["llama3.2:latest", "qwen3:8b", "gpt-oss:20b"]) as fake:
        yield fake


async def answer(
    redis_url: str, server: FakeModelServer, text: str = "hi", **values: Any
) -> tuple[RecordingSink, dict[str, Any]]:
    """One turn through Parley with these settings: what the person saw, what the model got."""
    app = await Parley.open(make_settings(redis_url, server, **values))
    try:
        sink = RecordingSink(min_edit_interval=0.05)
        await app.conversation.handle(turn(text), sink)
    finally:
        await app.aclose()
    return sink, server.chat_requests[-1]


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('{"qwen3*": {"tempreature": 0.2}}', "PARLEY_MODEL_OPTIONS.qwen3*.tempreature: not an"),
        ('{"qwen3*": {"temperature": 9}}', "PARLEY_MODEL_OPTIONS.qwen3*.temperature:"),
        ('{"m": {"think": "loud"}}', "PARLEY_MODEL_OPTIONS.m.think: must be true, false"),
        ('{"m": {"keep_alive": "ten"}}', "PARLEY_MODEL_OPTIONS.m.keep_alive: 'ten' is not"),
        ('{"m": {"stop": ["a", "b", "c", "d", "e"]}}', "PARLEY_MODEL_OPTIONS.m.stop:"),
        ('["qwen3"]', "PARLEY_MODEL_OPTIONS: must be a JSON object"),
        ("{qwen3: 1}", "PARLEY_MODEL_OPTIONS: not valid JSON"),
    ],
)
def test_a_bad_model_option_stops_start_up_with_one_line_naming_it(
    value: str, says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PARLEY_MODEL_OPTIONS", value)
    with pytest.raises(SystemExit) as stopped:
        load_settings(_env_file=None)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_every_matching_entry_applies_a_later_one_over_an_earlier_one() -> None:
    chosen = settings(
        model_options={
            "*": {"temperature": 0.7, "seed": 1},
            "qwen3*": {"temperature": 0.2, "stop": ["</s>"]},
            "other": {"temperature": 1.5},
        }
    )
    options = plan("local/qwen3:8b", chosen, ModelInfo()).options  # with its backend's name
    assert (options.temperature, options.seed, options.stop) == (0.2, 1, ("</s>",))
    assert plan("llama3.2:latest", chosen, ModelInfo()).options.temperature == 0.7


def test_the_window_is_the_smaller_of_the_models_and_parleys_unless_set() -> None:
    info = ModelInfo(context_length=2048)
    assert plan("m", settings(context_tokens=8192), info).window == 2048
    assert plan("m", settings(context_tokens=1024), info).window == 1024
    assert plan("m", settings(context_tokens=1024), ModelInfo()).window == 1024
    own = settings(context_tokens=1024, model_options={"m": {"num_ctx": 16384}})
    assert plan("m", own, info).options.num_ctx == 16384  # the operator knows best
    capped = plan("m", settings(context_tokens=4096, reply_reserve_tokens=512), ModelInfo())
    assert capped.options.num_predict == 512 and capped.prompt_tokens == 4096 - 512
    greedy = settings(context_tokens=1024, model_options={"m": {"num_predict": 4000}})
    assert plan("m", greedy, ModelInfo()).prompt_tokens == 512  # the question keeps room


def test_parley_think_applies_only_to_models_that_think() -> None:
    on = settings(think="high")
    thinker = ModelInfo(frozenset({"completion", "thinking"}))
    assert plan("qwen3", on, thinker).options.think == "high"
    assert plan("llama3.2", on, ModelInfo()).options.think is None
    assert plan("qwen3", settings(think="off"), thinker).options.think is False
    assert plan("qwen3", settings(think="on"), thinker).options.think is True
    own = settings(think="off", model_options={"qwen3*": {"think": "low"}})
    assert plan("qwen3:8b", own, thinker).options.think == "low"


# --- what each backend kind is sent --------------------------------------------------------

OPTIONS = {
    "qwen3*": {
        "temperature": 0.3,
        "top_p": 0.9,
        "num_predict": 200,
        "stop": ["\n\nUser:"],
        "seed": 7,
        "think": "low",
        "keep_alive": "10m",
    }
}


async def test_ollama_gets_options_keep_alive_and_think_and_the_real_window(
    redis_url: str, model_server: FakeModelServer
) -> None:
    _, sent = await answer(
        redis_url,
        model_server,
        model_options=OPTIONS,
        default_model="qwen3:8b",
        context_tokens=65536,
    )
    assert sent["options"] == {
        "temperature": 0.3,
        "top_p": 0.9,
        "num_ctx": 40960,  # qwen3's own context (/api/show), smaller than PARLEY_CONTEXT_TOKENS
        "num_predict": 200,
        "stop": ["\n\nUser:"],
        "seed": 7,
    }
    assert sent["keep_alive"] == "10m" and sent["think"] == "low"


async def test_an_openai_server_gets_the_same_options_in_its_own_names(
    redis_url: str, model_server: FakeModelServer
) -> None:
    _, sent = await answer(
        redis_url,
        model_server,
        backends=[{"name": "box", "kind": "openai", "url": model_server.url + "/v1"}],
        model_options=OPTIONS,
        default_model="qwen3:8b",
    )
    picked = {k: sent.get(k) for k in OPTIONS["qwen3*"]} | {
        k: sent.get(k) for k in ("max_tokens", "reasoning_effort")
    }
    assert picked == {
        "temperature": 0.3,
        "top_p": 0.9,
        "num_predict": None,
        "stop": ["\n\nUser:"],
        "seed": 7,
        "think": None,
        "keep_alive": None,
        "max_tokens": 200,
        "reasoning_effort": "low",
    }
    assert "options" not in sent and "num_ctx" not in sent  # the OpenAI API has no num_ctx


async def test_with_nothing_configured_a_reply_is_still_capped_and_the_window_is_sent(
    redis_url: str, model_server: FakeModelServer
) -> None:
    _, sent = await answer(redis_url, model_server, think="high")
    assert sent["options"] == {"num_ctx": 4096, "num_predict": 1024}
    assert "think" not in sent  # llama3.2 does not think: asking would be refused (400)
    assert "temperature" not in sent["options"]  # the model's own default stands


async def test_parley_think_reaches_a_thinking_model(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.script(Script(thinking=["Hmm, ", "let me see"], tokens=["Four."]))
    sink, sent = await answer(redis_url, model_server, think="high", default_model="qwen3:8b")
    assert sent["think"] == "high"
    assert sink.messages == ["Four."]  # the reasoning is never posted as the answer


# --- capped replies ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_a_reply_that_reaches_its_cap_ends_with_a_note(
    redis_url: str, model_server: FakeModelServer, kind: str
) -> None:
    model_server.script(Script(tokens=[f"word{i} " for i in range(50)]))
    url = model_server.url + ("/v1" if kind == "openai" else "")
    sink, sent = await answer(
        redis_url,
        model_server,
        backends=[{"name": "box", "kind": kind, "url": url}],
        reply_reserve_tokens=8,
    )
    (final,) = sink.messages
    assert final.startswith("word0 word1") and "word8" not in final
    assert final.endswith(cut_short(8))
    assert sent.get("max_tokens", (sent.get("options") or {}).get("num_predict")) == 8


async def test_a_reply_within_its_cap_has_no_note(
    redis_url: str, model_server: FakeModelServer
) -> None:
    sink, _ = await answer(redis_url, model_server, "short", reply_reserve_tokens=8)
    assert sink.messages == ["You said: short"]


async def test_the_cut_reply_is_remembered_without_the_note(
    redis_url: str, model_server: FakeModelServer
) -> None:
    model_server.script(Script(tokens=["a ", "b ", "c ", "d "]))
    app = await Parley.open(make_settings(redis_url, model_server, reply_reserve_tokens=2))
    try:
        assert await app.conversation.handle(turn("go"), RecordingSink()) is Outcome.COMPLETE
        history = await app.state.history(KEY)
    finally:
        await app.aclose()
    assert history[-1].content == "a b "


# --- thinking, on the loop's clock ---------------------------------------------------------


@pytest.mark.looptime
async def test_a_long_think_shows_for_how_long_and_never_the_reasoning() -> None:
    sink, renderer = on_loop_clock(min_edit_interval=0.5)
    await renderer.begin()
    renderer.feed(Thinking("The user wants a secret plan"))
    await asyncio.sleep(3.0)
    assert sink.messages == [THINKING]  # a few seconds: the plain placeholder
    for _ in range(20):
        renderer.feed(Thinking(" and more"))
        await asyncio.sleep(1.0)
    shown = [c.text for c in sink.calls if c.frame is not None and c.frame.phase is Phase.THINKING]
    assert shown == [THINKING, "💭 _Thinking… (5 s)_", "💭 _Thinking… (15 s)_"]
    assert sink.waiting[-1] == "thinking"
    renderer.feed(Content("Here it is."))
    renderer.feed(Done())
    await renderer.finish(Status.COMPLETE)
    assert sink.messages == ["Here it is."]
    assert all("secret plan" not in c.text for c in sink.calls)


# --- token counts, measured per model ------------------------------------------------------


async def test_each_models_token_rate_is_learnt_from_what_its_backend_counted(
    redis_url: str, model_server: FakeModelServer
) -> None:
    prose = "abcdefghij " * 60  # the fake counts 2 tokens a word: 5.5 characters a token
    app = await Parley.open(make_settings(redis_url, model_server))
    try:
        assert await app.state.chars_per_token("llama3.2:latest") is None
        await app.conversation.handle(turn(prose), RecordingSink())
        sent = model_server.chat_requests[-1]["messages"]
        counted = sum(count_tokens(m["content"]) + 4 for m in sent)
        chars = sum(len(m["content"]) for m in sent)
        learnt = await app.state.chars_per_token("llama3.2:latest")
        assert learnt == pytest.approx(chars / (counted - 4 * len(sent)), rel=1e-3)
        assert 5.0 < learnt < 5.6
        assert await app.state.chars_per_token("qwen3:8b") is None  # per model
        raw = await app.state.redis.hget(f"{app.settings.redis_prefix}calib", "llama3.2:latest")
        assert raw is not None  # in Redis: every replica packs by it
    finally:
        await app.aclose()


async def test_a_learnt_rate_packs_more_of_the_thread_and_still_within_the_window(
    redis_url: str, model_server: FakeModelServer
) -> None:
    app = await Parley.open(
        make_settings(
            redis_url,
            model_server,
            context_tokens=700,
            reply_reserve_tokens=100,
            rate_limit="99/minute",
            summaries=False,  # the history stays as it was preloaded
        )
    )
    try:
        for i in range(12):
            said = f"turn {i} " + "abcdefghij " * 18
            await app.state.append(
                KEY,
                HistoryEntry("user", said, user_id="U1", user_name="ada"),
                HistoryEntry("assistant", said),
            )
        sizes = []
        for question in ("first", "second"):
            await app.conversation.handle(turn(question), RecordingSink())
            sent = model_server.chat_requests[-1]["messages"]
            sizes.append(len(sent))
            assert sum(count_tokens(m["content"]) + 4 for m in sent) <= 700 - 100
        assert sizes[1] > sizes[0]  # the guess (4 characters a token) was cautious
        assert model_server.truncated == 0
    finally:
        await app.aclose()
