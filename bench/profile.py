"""Profile: where Parley's CPU goes under many concurrent streams, and what a fix would gain.

    python -m bench.profile [--quick] [--streams 300] [--repeat 2] [--split 40,400] [--warm]

1. Where the CPU goes: the concurrency benchmark at --streams in a child process, sampled by
   bench/sampler.py (SIGPROF every 1 ms of CPU): shares by package and the hottest functions.
2. The hot path alone: --streams concurrent backend streams read by the core's
   `OllamaBackend.chat` and by the candidates in bench/variants.py, nothing else running; CPU
   per 1,000 tokens and loop lag, repeated --repeat times in alternation, as ratios to the core.
3. End to end: the concurrency benchmark at --streams once per reader (the candidate is handed to
   Parley's Router in place of the core's backend object), same table as bench.concurrency.
4. Per reply: short replies (10 tokens, no wait) one after another through one client, per
   reader: the fixed cost of a request (connection, pool, headers), CPU and wall time per reply.
5. Fixed and per token: the concurrency benchmark at --streams with short and with long replies
   (--split), solved for what a reply costs once and what each token adds, end to end.

It all runs on the loop `parley run` uses (bot/eventloop.py).

`asyncio-transport` (the core's transport before httpx-aiohttp, see bench/variants.py) puts None
in sys.modules for `sniffio` when it is first used, as it did in the core: that entry is
process-wide, so readers on httpcore that run after it in this process do not look it up.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from typing import Any

from bench import concurrency
from bench.common import (
    MODEL,
    BackendOptions,
    Monitor,
    backends,
    cpu_seconds,
    ms,
    percentile,
    print_machine,
    print_table,
    redis_server,
    run_like_parley,
)
from bench.variants import VARIANTS
from bot.backends.base import Content, Message, Timeouts
from bot.backends.ollama import OllamaBackend
from bot.settings import BackendConfig

READERS: dict[str, Any] = {"core": OllamaBackend, **VARIANTS}
# The transport of 8abd922 takes asyncio's own transports only (it asserts asyncio.Transport,
# which uvloop's are not): it runs where Parley runs on asyncio's loop (PARLEY_EVENT_LOOP=asyncio).
ASYNCIO_ONLY = {"asyncio-transport"}


def usable_readers() -> None:
    """Drop the readers this process's loop cannot run (called on the running loop)."""
    if eventloop_name() != "asyncio":
        for name in ASYNCIO_ONLY:
            if READERS.pop(name, None) is not None:
                print(f"({name} left out: it needs asyncio's loop)\n", flush=True)


def eventloop_name() -> str:
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


async def read_streams(url: str, reader: str, n: int, per_client: int = 100) -> dict[str, Any]:
    """n concurrent /api/chat streams through `reader`, ⌈n/100⌉ clients (as bench.concurrency)."""
    cls = READERS[reader]
    clients = [
        cls(BackendConfig(name=f"b{i}", kind="ollama", url=url), Timeouts())
        for i in range(max(1, math.ceil(n / per_client)))
    ]
    messages = [Message("user", "Hello! Tell me something.")]

    async def consume(i: int) -> int:
        count = 0
        async for chunk in clients[i % len(clients)].chat(MODEL, messages):
            if isinstance(chunk, Content):
                count += 1
        return count

    monitor = Monitor()
    monitor.start()
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    counts = await asyncio.gather(*(consume(i) for i in range(n)), return_exceptions=True)
    cpu, wall = cpu_seconds() - cpu0, time.monotonic() - wall0
    await monitor.stop()
    for client in clients:
        await client.aclose()
    tokens = sum(c for c in counts if isinstance(c, int))
    failed = sum(1 for c in counts if not isinstance(c, int))
    return {
        "reader": reader,
        "tokens": tokens,
        "failed": failed,
        "cpu_per_1k": cpu / tokens * 1000 if tokens else float("nan"),
        "lag_p99": percentile(monitor.lags, 0.99),
        "wall": wall,
    }


async def per_reply(url: str, reader: str, n: int) -> dict[str, Any]:
    """n short replies one after another through one client: CPU and wall time per reply."""
    client = READERS[reader](BackendConfig(name="b0", kind="ollama", url=url), Timeouts())
    messages = [Message("user", "Hello!")]
    walls: list[float] = []
    async for _ in client.chat(MODEL, messages):  # warm: connection, imports
        pass
    cpu0 = cpu_seconds()
    for _ in range(n):
        started = time.monotonic()
        async for _ in client.chat(MODEL, messages):
            pass
        walls.append(time.monotonic() - started)
    cpu = cpu_seconds() - cpu0
    await client.aclose()
    return {"cpu": cpu / n, "wall_p50": percentile(walls, 0.5), "wall_p99": percentile(walls, 0.99)}


async def main_async(args: argparse.Namespace) -> None:
    print_machine()
    usable_readers()
    n = args.streams
    options = BackendOptions(tokens=args.tokens, tps="30,80", ttft=0.5)

    # 1. where the CPU goes
    base = concurrency.build_parser().parse_args([])
    base.tokens, base.profile, base.warm = args.tokens, "sample", args.warm
    async with redis_server() as redis_url, backends(options, 1) as fakes:
        print(f"1. Where the CPU goes: {n} streams, core reader, sampled\n", flush=True)
        base.variant = "core"
        sampled = await concurrency.run_level(base, redis_url, fakes, n, 100)
        print(sampled["profile"], "\n", flush=True)

        # 2. the hot path alone
        print(f"2. The hot path alone: {n} streams read by each reader\n", flush=True)
        rounds: dict[str, list[dict[str, Any]]] = {r: [] for r in READERS}
        for _ in range(args.repeat):
            for reader in READERS:
                rounds[reader].append(await read_streams(fakes[0].url, reader, n))
        core_cpu = sum(r["cpu_per_1k"] for r in rounds["core"]) / args.repeat
        rows = []
        for reader, results in rounds.items():
            cpu = sum(r["cpu_per_1k"] for r in results) / len(results)
            rows.append(
                [
                    reader,
                    n,
                    sum(r["tokens"] for r in results),
                    sum(r["failed"] for r in results),
                    cpu * 1000,
                    f"{cpu / core_cpu:.2f}x",
                    " ".join(f"{ms(r['lag_p99']):.0f}" for r in results),
                    " ".join(f"{r['wall']:.1f}" for r in results),
                ]
            )
        print_table(
            f"Reading {n} concurrent backend streams ({args.repeat} rounds, alternating)",
            [
                "reader",
                "streams",
                "tokens",
                "failed",
                "CPU ms/1k tok",
                "vs core",
                "lag p99 ms",
                "wall s",
            ],
            rows,
        )

        # 3. end to end
        print(f"3. End to end: {n} streams through Parley, per reader\n", flush=True)
        results = []
        base.profile = "none"
        for run, reader in enumerate(READERS):
            base.variant = reader
            results.append(await concurrency.run_level(base, redis_url, fakes, n, 200 + run))
    table = [[reader, *concurrency.row(r)] for reader, r in zip(READERS, results, strict=True)]
    print_table(
        f"Parley end to end, {n} streams, by backend reader",
        ["reader", *concurrency.HEADERS],
        table,
    )
    core = results[0]["cpu_per_1k"]
    ratios = [f"{r}: {x['cpu_per_1k'] / core:.2f}x" for r, x in zip(READERS, results, strict=True)]
    print("CPU per 1k tokens vs core: " + ", ".join(ratios) + "\n")

    # 4. per reply
    n = args.replies
    print(f"4. Per reply: {n} short replies one after another, per reader\n", flush=True)
    short = BackendOptions(tokens=10, tps="1000,1000", ttft=0.0)
    replies: dict[str, list[dict[str, Any]]] = {r: [] for r in READERS}
    async with backends(short, 1) as quick:
        for _ in range(args.repeat):
            for reader in READERS:
                replies[reader].append(await per_reply(quick[0].url, reader, n))
    core_cpu = sum(r["cpu"] for r in replies["core"]) / args.repeat
    rows = []
    for reader, results_ in replies.items():
        cpu = sum(r["cpu"] for r in results_) / len(results_)
        rows.append(
            [
                reader,
                n * len(results_),
                ms(cpu),
                f"{cpu / core_cpu:.2f}x",
                " ".join(f"{ms(r['wall_p50']):.2f}" for r in results_),
                " ".join(f"{ms(r['wall_p99']):.2f}" for r in results_),
            ]
        )
    print_table(
        f"Short replies (10 tokens, no wait), one at a time ({args.repeat} rounds, alternating)",
        ["reader", "replies", "CPU ms/reply", "vs core", "wall p50 ms", "wall p99 ms"],
        rows,
    )

    # 5. a reply's fixed cost and each token's
    if args.split:
        async with redis_server() as redis_url:
            await split_cost(args, redis_url)


async def split_cost(args: argparse.Namespace, redis_url: str) -> None:
    """5. What a reply costs once and what each token adds: the concurrency benchmark at
    --streams with short and long replies (--split tokens), solved for the two."""
    short, long_ = (int(x) for x in args.split.split(","))
    base = concurrency.build_parser().parse_args([])
    base.warm = args.warm
    cpu: dict[int, list[float]] = {short: [], long_: []}
    edits: dict[int, list[float]] = {short: [], long_: []}
    for tokens in (short, long_):
        base.tokens = tokens
        async with backends(BackendOptions(tokens=tokens, tps="30,80", ttft=0.5), 2) as fakes:
            for round_ in range(args.repeat):
                r = await concurrency.run_level(
                    base, redis_url, fakes, args.streams, 500 + 10 * round_ + tokens
                )
                cpu[tokens].append(concurrency.excl_monitor(r) * tokens / 1000)  # s per reply
                edits[tokens].append(r["edits_mean"])
    per_reply = {t: sum(v) / len(v) for t, v in cpu.items()}
    per_token = (per_reply[long_] - per_reply[short]) / (long_ - short)
    fixed = per_reply[short] - short * per_token
    rows = [
        [t, args.streams, ms(per_reply[t]), sum(edits[t]) / len(edits[t]), ms(per_reply[t]) / t]
        for t in (short, long_)
    ]
    print_table(
        f"5. A reply's fixed cost and each token's, {args.streams} streams "
        f"({'warm' if args.warm else 'cold burst'}, {args.repeat} rounds each, excl. monitor)",
        ["tokens/reply", "streams", "CPU ms/reply", "edits/reply", "ms per token"],
        rows,
    )
    print(
        f"each token: {per_token * 1e6:.1f} µs (with the edits that grow with a reply's length); "
        f"each reply once: {ms(fixed):.2f} ms (Redis round trips, the request, placeholder, "
        f"final edit); so at 200 tokens a reply: {(per_token + fixed / 200) * 1e6:.0f} ms per "
        f"1,000 tokens\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Profile the hot path (see module doc).")
    parser.add_argument(
        "--quick", action="store_true", help="100 streams of 60 tokens, 100 replies, 1 round"
    )
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--replies", type=int, default=300, help="per reader and round, in (4)")
    parser.add_argument(
        "--split", default="40,400", help="short,long tokens per reply in (5); empty: skip (5)"
    )
    parser.add_argument("--warm", action="store_true", help="(1), (3), (5) in a warm process")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.tokens, args.repeat, args.replies = 100, 60, 1, 100
    run_like_parley(main_async(args))  # the hot path on the loop `parley run` uses


if __name__ == "__main__":
    main()
