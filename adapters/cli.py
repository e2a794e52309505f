"""`parley run | chat | models | check`: the composition root, wiring the adapters to the core.

It lives at the edge so that nothing under `bot/` imports `adapters/`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from aiohttp import web

from adapters import platform_adapters
from adapters.console import ConsoleAdapter
from bot import eventloop
from bot.app import Parley, check_redis
from bot.errors import BackendError
from bot.http import add_routes
from bot.logs import setup_logging
from bot.router import Router
from bot.settings import Settings, load_settings

log = logging.getLogger("parley")


async def chat(settings: Settings, thread: str) -> int:
    parley = await Parley.open(settings)
    try:
        return await ConsoleAdapter(parley, thread=thread).run()
    finally:
        await parley.aclose()


async def run(settings: Settings) -> int:
    log.info("event loop: %s", eventloop.loop_name())
    parley = await Parley.open(settings)
    adapters = platform_adapters(parley)
    if not adapters:
        log.info("no Slack or Discord token: opening the console chat")
        try:
            return await ConsoleAdapter(parley).run()
        finally:
            await parley.aclose()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    add_routes(parley, lambda: {a.name: a.ready for a in adapters})
    runner = web.AppRunner(parley.http)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        log.info("HTTP server on %s:%s", settings.http_host, settings.http_port)
        for adapter in adapters:
            await adapter.start()
            log.info("%s adapter started", adapter.name)
        await stop.wait()
        log.info("shutting down: replies in flight get %.0fs to finish", settings.shutdown_grace)
        for adapter in adapters:  # new events go to the other replicas meanwhile
            await adapter.quiesce()
        await parley.conversation.drain(settings.shutdown_grace)
    finally:
        for adapter in reversed(adapters):
            try:
                await adapter.stop()
            except Exception:
                log.exception("stopping the %s adapter failed", adapter.name)
        await runner.cleanup()
        await parley.aclose()
    log.info("stopped")
    return 0


async def models(settings: Settings) -> int:
    router = _router(settings)
    try:
        entries = await router.catalog()
        for name, error in router.errors.items():
            print(
                f"parley: backend {name} ({router.backends[name].config.url}): {error.message}",
                file=sys.stderr,
            )
        for entry in entries:
            print(f"{entry.name}\t{entry.backend}")
        return 0 if entries or not router.errors else 1
    finally:
        await router.aclose()


async def check(settings: Settings) -> int:
    failures = 0
    print("ok    settings")
    try:
        print(f"ok    redis ({await check_redis(settings)})")
    except Exception as e:
        failures += 1
        print(f"FAIL  redis: {type(e).__name__}: {e}")
    router = _router(settings)
    try:
        for name in router.order:
            backend = router.backends[name]
            try:
                found = await backend.list_models()
                print(f"ok    backend {name} {backend.config.url} ({len(found)} models)")
            except BackendError as e:
                failures += 1
                print(f"FAIL  backend {name} {backend.config.url}: {type(e).__name__}: {e.message}")
    finally:
        await router.aclose()
    return 1 if failures else 0


def _router(settings: Settings) -> Router:
    return Router.from_settings(settings, ttl=0)  # a one-off command: no cached catalog


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="start every configured adapter (console chat if none)")
    chat_parser = sub.add_parser(
        "chat", help="chat in the terminal (one message per line if piped)"
    )
    chat_parser.add_argument("--thread", default="main", help="conversation to continue")
    sub.add_parser("models", help="list the models every backend serves")
    sub.add_parser("check", help="check settings, Redis and every backend")
    args = parser.parse_args(argv)
    command = args.command or "run"
    settings = load_settings()
    setup_logging(settings.log_level, quiet=command in ("chat", "models", "check"))
    coroutine: Any
    match command:
        case "chat":
            coroutine = chat(settings, args.thread)
        case "models":
            coroutine = models(settings)
        case "check":
            coroutine = check(settings)
        case _:
            coroutine = run(settings)
    try:
        sys.exit(eventloop.run(coroutine, settings.event_loop))
    except KeyboardInterrupt:
        sys.exit(130)
