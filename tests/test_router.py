"""The router over real backends and fake servers: catalog, naming, cloud, failover, caps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bot.backends.base import Content, Done, Message, Timeouts
from bot.backends.ollama import OllamaBackend
from bot.backends.openai import OpenAIBackend
from bot.errors import BackendStreamError, BackendUnreachable, ModelNotFound
from bot.router import CatalogEntry, Generation, Router
from bot.settings import BackendConfig
from tests.fakes.model_server import FakeModelServer, Script
from tests.support import until

HELLO = [Message("user", "hello")]
TIMEOUTS = Timeouts(connect=2, first_chunk=5, idle=5)


def ollama(name: str, server: FakeModelServer, *, cloud: bool = False) -> OllamaBackend:
    return OllamaBackend(
        BackendConfig(name=name, kind="ollama", url=server.url, cloud=cloud), TIMEOUTS
    )


def openai(name: str, server: FakeModelServer) -> OpenAIBackend:
    return OpenAIBackend(BackendConfig(name=name, kind="openai", url=server.url), TIMEOUTS)


@pytest.fixture
async def first() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer(models=["llama3.2:latest", "qwen3:8b"]) as server:
        yield server


@pytest.fixture
async def second() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer(models=["gemma3:4b", "llama3.2:latest"]) as server:
        yield server


@pytest.fixture
async def router(first: FakeModelServer, second: FakeModelServer) -> AsyncIterator[Router]:
    made = Router([ollama("a", first), openai("b", second)], concurrency=4, catalog_ttl=30)
    yield made
    await made.aclose()


async def text_of(generation: Generation) -> str:
    return "".join([c.text async for c in generation if isinstance(c, Content)])


# --- catalog and naming ---------------------------------------------------------------------


async def test_catalog_merges_every_backend_in_backend_order(router: Router) -> None:
    assert await router.catalog() == [
        CatalogEntry("llama3.2:latest", "a"),
        CatalogEntry("qwen3:8b", "a"),
        CatalogEntry("gemma3:4b", "b"),
        CatalogEntry("llama3.2:latest", "b"),
    ]
    assert await router.model_names() == ["llama3.2:latest", "qwen3:8b", "gemma3:4b"]


async def test_catalog_is_cached_for_its_ttl(router: Router, first: FakeModelServer) -> None:
    await router.catalog()
    await router.catalog()
    assert [r.path for r in first.requests] == ["/api/tags"]
    await router.catalog(refresh=True)
    assert [r.path for r in first.requests] == ["/api/tags", "/api/tags"]


async def test_catalog_skips_an_unreachable_backend_and_says_why(
    router: Router, second: FakeModelServer
) -> None:
    await second.stop()
    assert await router.model_names() == ["llama3.2:latest", "qwen3:8b"]
    assert isinstance(router.errors["b"], BackendUnreachable)


async def test_a_model_goes_to_the_first_backend_that_serves_it(
    router: Router, first: FakeModelServer, second: FakeModelServer
) -> None:
    generation = await router.open("llama3.2", HELLO)
    assert (generation.backend, generation.model) == ("a", "llama3.2")
    assert await text_of(generation) == "You said: hello"
    assert [b["model"] for b in first.chat_requests] == ["llama3.2"]
    assert second.chat_requests == []


async def test_a_backend_prefix_picks_that_backend(
    router: Router, first: FakeModelServer, second: FakeModelServer
) -> None:
    generation = await router.open("b/llama3.2", HELLO)
    assert (generation.backend, generation.model) == ("b", "llama3.2")
    await text_of(generation)
    assert first.chat_requests == []
    assert [b["model"] for b in second.chat_requests] == ["llama3.2"]


async def test_a_model_only_on_the_second_backend_goes_there(
    router: Router, first: FakeModelServer, second: FakeModelServer
) -> None:
    generation = await router.open("gemma3:4b", HELLO)
    assert generation.backend == "b"
    assert await text_of(generation) == "You said: hello"
    assert first.chat_requests == []
    assert [b["model"] for b in second.chat_requests] == ["gemma3:4b"]


@pytest.mark.parametrize(
    ("asked", "cloud_name"),
    [("gpt-oss:120b-cloud", "gpt-oss:120b"), ("kimi-k2.6:cloud", "kimi-k2.6")],
)
async def test_a_cloud_suffix_goes_to_the_cloud_backend_without_the_suffix(
    first: FakeModelServer, asked: str, cloud_name: str
) -> None:
    async with FakeModelServer(models=["gpt-oss:120b", "kimi-k2.6"]) as sky:
        router = Router([ollama("local", first), ollama("cloud", sky, cloud=True)])
        try:
            assert await router.find(asked) == asked
            generation = await router.open(asked, HELLO)
            assert (generation.backend, generation.model) == ("cloud", cloud_name)
            assert await text_of(generation) == "You said: hello"
        finally:
            await router.aclose()
        assert [b["model"] for b in sky.chat_requests] == [cloud_name]
    assert first.chat_requests == []


async def test_without_a_cloud_backend_a_cloud_name_goes_unchanged_to_a_local_ollama(
    second: FakeModelServer,
) -> None:
    async with FakeModelServer(models=["llama3.2", "gpt-oss:120b-cloud"]) as local:
        # the OpenAI-kind backend comes first but cannot proxy cloud models
        router = Router([openai("vllm", second), ollama("local", local)])
        try:
            generation = await router.open("gpt-oss:120b-cloud", HELLO)
            assert (generation.backend, generation.model) == ("local", "gpt-oss:120b-cloud")
            await text_of(generation)
        finally:
            await router.aclose()
        assert [b["model"] for b in local.chat_requests] == ["gpt-oss:120b-cloud"]
    assert second.chat_requests == []


async def test_find_knows_a_backend_prefixed_model_before_any_catalog_fetch(
    router: Router,
) -> None:
    # `/model b/gemma3:4b` may be the first thing a fresh process is asked
    assert await router.find("b/gemma3:4b") == "b/gemma3:4b"
    assert await router.find("b/qwen3:8b") is None  # a serves it, b does not


async def test_a_model_no_backend_serves_is_model_not_found(router: Router) -> None:
    assert await router.find("nope:7b") is None
    with pytest.raises(ModelNotFound) as caught:
        await router.open("nope:7b", HELLO)
    assert (caught.value.backend, caught.value.model) == ("a", "nope:7b")
    with pytest.raises(ModelNotFound) as caught:
        await router.open("b/nope:7b", HELLO)
    assert (caught.value.backend, caught.value.model) == ("b", "nope:7b")


# --- failover -------------------------------------------------------------------------------


async def test_an_unreachable_backend_fails_over_to_the_next_that_serves_the_model(
    router: Router, first: FakeModelServer, second: FakeModelServer
) -> None:
    await router.catalog()  # both serve llama3.2
    await first.stop()
    generation = await router.open("llama3.2", HELLO)
    assert generation.backend == "b"
    assert await text_of(generation) == "You said: hello"
    assert [b["model"] for b in second.chat_requests] == ["llama3.2"]


async def test_a_slow_first_token_fails_over_to_the_next_backend(
    first: FakeModelServer, second: FakeModelServer
) -> None:
    quick = Timeouts(connect=1, first_chunk=0.2, idle=5)
    router = Router(
        [
            OllamaBackend(BackendConfig(name="a", kind="ollama", url=first.url), quick),
            OllamaBackend(BackendConfig(name="b", kind="ollama", url=second.url), quick),
        ]
    )
    first.script(Script(first_delay=2))
    try:
        generation = await router.open("llama3.2", HELLO)
        assert generation.backend == "b"
        assert await text_of(generation) == "You said: hello"
    finally:
        await router.aclose()


async def test_an_error_after_output_started_does_not_fail_over(
    router: Router, first: FakeModelServer, second: FakeModelServer
) -> None:
    first.script(Script(tokens=["par", "tial", "!"], fail_after=2))
    generation = await router.open("llama3.2", HELLO)
    seen = []
    with pytest.raises(BackendStreamError):
        async for chunk in generation:
            seen.append(chunk)
    assert seen == [Content("par"), Content("tial")]
    assert second.chat_requests == []


async def test_when_every_backend_is_unreachable_the_last_failure_is_raised(
    router: Router, first: FakeModelServer, second: FakeModelServer
) -> None:
    await router.catalog()
    await first.stop()
    await second.stop()
    with pytest.raises(BackendUnreachable) as caught:
        await router.open("llama3.2", HELLO)
    assert caught.value.backend == "b"


# --- per-backend cap ------------------------------------------------------------------------


async def test_with_concurrency_1_a_second_generation_waits_until_the_first_is_closed(
    first: FakeModelServer, second: FakeModelServer
) -> None:
    router = Router([ollama("a", first), ollama("b", second)], concurrency=1)
    first.script(Script(tokens=["x"] * 20, delay=0.05), Script(tokens=["second"]))
    try:
        one = await router.open("a/llama3.2", HELLO)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(router.open("a/llama3.2", HELLO), 0.3)
        # the cap is per backend: the other backend still answers
        other = await asyncio.wait_for(router.open("b/llama3.2", HELLO), 2)
        assert await text_of(other) == "You said: hello"
        waiting = asyncio.create_task(router.open("a/llama3.2", HELLO))
        await asyncio.sleep(0)
        assert not waiting.done()
        await one.aclose()
        two = await asyncio.wait_for(waiting, 2)
        assert await text_of(two) == "second"
    finally:
        await router.aclose()
    assert first.max_in_flight == 1


async def test_reading_a_generation_to_the_end_frees_its_slot(first: FakeModelServer) -> None:
    router = Router([ollama("a", first)], concurrency=1)
    try:
        for _ in range(3):
            generation = await asyncio.wait_for(router.open("llama3.2", HELLO), 2)
            chunks = [c async for c in generation]
            assert isinstance(chunks[-1], Done)
    finally:
        await router.aclose()


async def test_closing_a_generation_disconnects_so_the_model_stops(
    router: Router, first: FakeModelServer
) -> None:
    first.script(Script(tokens=["x"] * 40, delay=0.05))
    generation = await router.open("llama3.2", HELLO)
    await generation.aclose()
    await until(lambda: first.disconnects == 1, within=2.0)
    assert first.completed == 0


async def test_a_burst_of_turns_asks_what_a_model_can_do_once(
    router: Router, first: FakeModelServer
) -> None:
    infos = await asyncio.gather(*(router.profile("a/llama3.2:latest") for _ in range(20)))
    assert len(set(infos)) == 1
    assert [r.path for r in first.requests].count("/api/show") == 1
    await router.profile("a/llama3.2:latest")  # cached
    assert [r.path for r in first.requests].count("/api/show") == 1
