"""Overhead: what Parley adds between an incoming event and the text people see.

    python -m bench.overhead [--quick] [--platform discord,slack] [--ttft 0.2,0.5,1.5]

For each platform and backend time-to-first-token (TTFT) it runs --turns turns, --concurrency at
a time, each from its own user in its own channel, and reports:

  added latency   (event → first visible answer text) − the backend's TTFT − one platform round
                  trip. The TTFT is the backend's own (stamp s − stamp r: request received →
                  first token sent), so loopback HTTP and everything Parley does count as added.
  of which        event → the backend has the request; first token → visible − one round trip.
  tail            the backend's last token → the final edit completed (includes that edit's
                  round trip, which is shown as a ratio of it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from bench.common import (
    BackendOptions,
    BackendProcess,
    ms,
    parley,
    percentile,
    print_machine,
    print_table,
    redis_server,
    run_like_parley,
    run_turn,
    settings,
)
from bench.platform import PLATFORMS, FakePlatform, ReplyRecord


async def measure(
    redis_url: str,
    platform_name: str,
    ttft: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    backend = BackendProcess(BackendOptions(tokens=args.tokens, tps=args.tps, ttft=ttft))
    await backend.start()
    try:
        config = settings(redis_url, [backend.url], redis_prefix=f"bench{platform_name}{ttft}:")
        async with parley(config) as app:
            fake = FakePlatform(PLATFORMS[platform_name], latency=args.latency)
            await run_turn(app, fake, "warm", 0)  # scripts loaded, pools and catalog warm
            fake.refused = 0
            gate = asyncio.Semaphore(args.concurrency)

            async def one(i: int) -> ReplyRecord:
                async with gate:
                    return await run_turn(app, fake, f"{platform_name}{ttft}", i)

            records = await asyncio.gather(*(one(i) for i in range(args.turns)))
    finally:
        await backend.stop()
    return summarise(platform_name, ttft, records, fake, args.latency)


def summarise(
    name: str, ttft: float, records: list[ReplyRecord], fake: FakePlatform, rtt: float
) -> dict[str, Any]:
    added, before, after, tail, backend_ttft = [], [], [], [], []
    failed = 0
    for r in records:
        if (
            r.outcome != "complete"
            or r.first_visible_at is None
            or r.requested_at is None
            or r.first_token_at is None
            or r.last_token_at is None
        ):
            failed += 1
            continue
        model_ttft = r.first_token_at - r.requested_at
        backend_ttft.append(model_ttft)
        added.append(r.first_visible_at - r.event_at - model_ttft - rtt)
        before.append(r.requested_at - r.event_at)
        after.append(r.first_visible_at - r.first_token_at - rtt)
        tail.append(r.last_call_at - r.last_token_at)
    return {
        "platform": name,
        "ttft": ttft,
        "n": len(added),
        "failed": failed,
        "refused": fake.refused,
        "backend_ttft_p50": percentile(backend_ttft, 0.5),
        "added_p50": percentile(added, 0.5),
        "added_p99": percentile(added, 0.99),
        "before_p50": percentile(before, 0.5),
        "before_p99": percentile(before, 0.99),
        "after_p50": percentile(after, 0.5),
        "after_p99": percentile(after, 0.99),
        "tail_p50": percentile(tail, 0.5),
        "tail_p99": percentile(tail, 0.99),
        "rtt": rtt,
    }


async def main_async(args: argparse.Namespace) -> None:
    print_machine()
    print(
        f"{args.turns} turns per row, {args.concurrency} at a time; replies of {args.tokens} "
        f"tokens at {args.tps} tokens/s; platform round trip {ms(args.latency):.0f} ms; "
        "edit_interval 1.0 s\n"
    )
    rows = []
    async with redis_server() as redis_url:
        for name in args.platform.split(","):
            for ttft in (float(t) for t in args.ttft.split(",")):
                s = await measure(redis_url, name, ttft, args)
                rows.append(
                    [
                        s["platform"],
                        ms(s["ttft"]),
                        s["n"],
                        ms(s["added_p50"]),
                        ms(s["added_p99"]),
                        ms(s["before_p50"]),
                        ms(s["before_p99"]),
                        ms(s["after_p50"]),
                        ms(s["after_p99"]),
                        ms(s["tail_p50"]),
                        ms(s["tail_p99"]),
                        f"{s['tail_p99'] / s['rtt']:.1f}x",
                        s["failed"],
                        s["refused"],
                    ]
                )
                print(f"  measured {name} TTFT {ms(ttft):.0f} ms", file=sys.stderr)
    print_table(
        "Overhead (ms). added = event→first visible text − backend TTFT − 1 platform round trip",
        [
            "platform",
            "TTFT",
            "n",
            "added p50",
            "added p99",
            "event→req p50",
            "p99",
            "tok→vis−RTT p50",
            "tok→vis−RTT p99",
            "last tok→final p50",
            "p99",
            "p99/RTT",
            "failed",
            "429s",
        ],
        rows,
    )
    print(
        "event→req: event to the backend having the request (Redis, placeholder post, HTTP).\n"
        "tok→vis−RTT: the backend's first token to the text being visible, minus one round trip."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Parley's added latency (see module doc).")
    parser.add_argument("--quick", action="store_true", help="a few turns, seconds")
    parser.add_argument("--platform", default="discord,slack")
    parser.add_argument("--ttft", default="0.2,0.5,1.5", help="backend TTFTs in seconds")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--tps", default="30,80")
    parser.add_argument("--latency", type=float, default=0.05, help="platform round trip (s)")
    args = parser.parse_args()
    if args.quick:
        args.turns, args.concurrency, args.ttft = 20, 5, "0.5"
    run_like_parley(main_async(args))  # on the loop `parley run` uses


if __name__ == "__main__":
    main()
