"""Concurrency: N simultaneous streaming replies in one Parley process.

    python -m bench.concurrency [--quick] [--streams 1,100,1000,2000] [--platform discord]

The parent starts a real redis-server and the fake backend (bench/fake_backend.py, its own
process), then runs each N in a fresh child process (`--child`), so every row starts from the
same clean process and its peak RSS is its own. The child opens Parley's real core
(`Parley.open`), runs one warm-up turn, then N turns at once — distinct users, channels and
workspaces — each answered by a backend stream of --tokens tokens at 30–80 tokens/s after a
--ttft wait, on the fake platform (~50 ms per call, Discord's or Slack's edit limits, 429s).

Per row:
  cpu s/1k tok   Parley's CPU (getrusage RUSAGE_SELF, user + sys) over the run ÷ tokens × 1000
  peak RSS       the child's resident set at its peak; per conv = (peak − before the run) ÷ N
  lag p99        event-loop lag: a task sleeps 10 ms again and again; the overshoot's p99
  edits/reply    mean edits, the mean minimum ⌈stream duration ÷ edit interval⌉, the worst
                 excess over that minimum and the share of replies within +1
  429s           platform refusals (target 0)
  tail p99       the backend's last token → final edit done: how far Parley fell behind
  fake late p99  how late the fake backend sent tokens against its own schedule (if it is
                 late, the fake, not Parley, was the bottleneck)

By default the streams are spread over ⌈N/100⌉ backend entries that all point at the same fake
(one httpx client each), each conversation pinned to one with a channel preference `bK/model`, as
when the httpx pool capped a client at 100 connections. `--conns-per-backend 0` puts every stream
on one backend entry (the pool no longer caps it: the router's per-backend semaphore does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.common import (
    MODEL,
    BackendOptions,
    BackendProcess,
    Monitor,
    backends,
    child_cpu_seconds,
    code_version,
    cpu_seconds,
    emit_json,
    ms,
    parley,
    percentile,
    print_machine,
    print_table,
    read_json,
    redis_server,
    rss_bytes,
    run_like_parley,
    run_turn,
    settings,
)
from bench.platform import PLATFORMS, FakePlatform, ReplyRecord
from bench.variants import VARIANTS, install
from bot.turn import ConversationKey

MiB = 1024 * 1024


# --- the child: one level of concurrency --------------------------------------------------------


async def child(args: argparse.Namespace) -> dict[str, Any]:
    n = args.streams_n
    per = args.conns_per_backend
    urls = args.backend_urls.split(",")
    entries = 1 if per <= 0 else max(1, math.ceil(n / per))
    entries = min(n, max(entries, len(urls)))
    config = settings(
        args.redis_url,
        [urls[i % len(urls)] for i in range(entries)],
        redis_max_connections=args.redis_max_connections,
        redis_prefix=f"bc{args.run}:",
    )
    fake = FakePlatform(PLATFORMS[args.platform], latency=args.latency)
    run = f"r{args.run}"
    async with parley(config) as app:
        await install(app.router, args.variant)
        warm = f"w{args.run}"
        if entries > 1:  # pin conversation i to backend entry i mod entries (setup, not measured)
            for prefix in (run, warm) if args.warm else (run,):
                for i in range(n):
                    key = ConversationKey(args.platform, f"S{prefix}-{i}", f"C{prefix}-{i}", "")
                    await app.state.set_preference(key, "model", f"b{i % entries}/{MODEL}")
        await run_turn(app, fake, "warm", 0)
        if args.warm:  # as a busy process is: pools of Redis and backend connections, caches
            await asyncio.gather(*(run_turn(app, fake, warm, i) for i in range(n)))
        fake.refused = fake.calls = 0
        idle = Monitor()  # what the lag monitor itself costs on an idle loop, per second
        idle.start()
        cpu_idle = cpu_seconds()
        await asyncio.sleep(1.0)
        monitor_cost = cpu_seconds() - cpu_idle
        await idle.stop()
        profiler = start_profiler(args.profile)
        monitor = Monitor()
        rss_before = rss_bytes()
        monitor.start()
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        tasks = [asyncio.create_task(run_turn(app, fake, run, i)) for i in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=args.timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall, cpu = time.monotonic() - wall0, cpu_seconds() - cpu0
        await monitor.stop()
        profile = stop_profiler(profiler, args.profile)
    records = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    errors = [repr(t.exception()) for t in done if not t.cancelled() and t.exception()]
    loop = asyncio.get_running_loop()
    return summarise(args, n, entries, records, errors, len(pending), fake, monitor, cpu, wall) | {
        "loop": "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio",
        "warm": args.warm,
        "rss_before": rss_before,
        "profile": profile,
        "monitor_cost": monitor_cost,
    }


def summarise(
    args: argparse.Namespace,
    n: int,
    entries: int,
    records: list[ReplyRecord],
    errors: list[str],
    unfinished: int,
    fake: FakePlatform,
    monitor: Monitor,
    cpu: float,
    wall: float,
) -> dict[str, Any]:
    complete = [r for r in records if r.outcome == "complete"]
    edits, minimum, excess, tails, visible = [], [], [], [], []
    for r in complete:
        if r.first_token_at is None or r.last_token_at is None:
            continue
        least = max(1, math.ceil((r.last_token_at - r.first_token_at) / 1.0))
        edits.append(r.edits)
        minimum.append(least)
        excess.append(r.edits - least)
        tails.append(r.last_call_at - r.last_token_at)
        if r.first_visible_at is not None:
            visible.append(r.first_visible_at - r.event_at)
    tokens = len(complete) * args.tokens
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    return {
        "streams": n,
        "backend_entries": entries,
        "complete": len(complete),
        "outcomes": outcomes,
        "errors": errors[:3],
        "unfinished": unfinished,
        "tokens": tokens,
        "cpu": cpu,
        "wall": wall,
        "cpu_per_1k": cpu / tokens * 1000 if tokens else float("nan"),
        "peak_rss": monitor.peak_rss,
        "lag_p50": percentile(monitor.lags, 0.5),
        "lag_p99": percentile(monitor.lags, 0.99),
        "lag_max": max(monitor.lags, default=float("nan")),
        "edits_mean": sum(edits) / len(edits) if edits else float("nan"),
        "min_mean": sum(minimum) / len(minimum) if minimum else float("nan"),
        "excess_max": max(excess, default=0),
        "within_1": sum(1 for e in excess if e <= 1) / len(excess) if excess else float("nan"),
        "refused": fake.refused,
        "calls": fake.calls,
        "tail_p50": percentile(tails, 0.5),
        "tail_p99": percentile(tails, 0.99),
        "visible_p50": percentile(visible, 0.5),
        "visible_p99": percentile(visible, 0.99),
    }


def start_profiler(kind: str) -> Any:
    if kind == "cprofile":
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        return profiler
    if kind == "sample":
        from bench.sampler import Sampler

        sampler = Sampler()
        sampler.start()
        return sampler
    return None


def stop_profiler(profiler: Any, kind: str) -> Any:
    if profiler is None:
        return None
    if kind == "cprofile":
        import io
        import pstats

        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        return out.getvalue()
    profiler.stop()
    return profiler.report()


# --- the parent: the levels, one child each -------------------------------------------------------


async def run_level(
    args: argparse.Namespace,
    redis_url: str,
    fakes: list[BackendProcess],
    n: int,
    run: int,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """One child at N streams; `cwd`: the checkout whose bench/ and bot/ it runs (this one)."""
    await asyncio.gather(*(f.reset() for f in fakes))
    redis = aioredis.Redis.from_url(redis_url)
    redis_cpu0 = await _redis_cpu(redis)
    backend_cpu0 = sum(child_cpu_seconds(f.pid) for f in fakes)
    command = [
        sys.executable,
        "-m",
        "bench.concurrency",
        "--child",
        "--redis-url",
        redis_url,
        "--backend-urls",
        ",".join(f.url for f in fakes),
        "--streams",
        str(n),
        "--run",
        str(run),
        "--platform",
        args.platform,
        "--latency",
        str(args.latency),
        "--tokens",
        str(args.tokens),
        "--conns-per-backend",
        str(args.conns_per_backend),
        "--timeout",
        str(args.timeout),
        "--profile",
        args.profile,
        "--redis-max-connections",
        str(args.redis_max_connections),
        "--variant",
        args.variant,
        *(["--warm"] if args.warm else []),
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, cwd=cwd
    )
    stdout, _ = await process.communicate()
    result = read_json(stdout.decode())
    result["redis_cpu"] = await _redis_cpu(redis) - redis_cpu0
    result["backend_cpu"] = sum(child_cpu_seconds(f.pid) for f in fakes) - backend_cpu0
    stats = await asyncio.gather(*(f.stats() for f in fakes))
    result["backend"] = {
        "late_p99": max((s.get("late_p99", float("nan")) for s in stats), default=float("nan")),
        "tokens": sum(s.get("tokens", 0) for s in stats),
    }
    await redis.aclose()
    return result


async def _redis_cpu(redis: aioredis.Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def row(r: dict[str, Any]) -> list[object]:
    late = r["backend"].get("late_p99", float("nan"))
    return [
        r["streams"],
        f"{r['complete']}/{r['streams']}",
        r["wall"],
        r["cpu_per_1k"],
        excl_monitor(r),
        r["peak_rss"] / MiB,
        (r["peak_rss"] - r["rss_before"]) / max(r["streams"], 1) / 1024,
        ms(r["lag_p99"]),
        ms(r["lag_max"]),
        f"{r['edits_mean']:.2f}/{r['min_mean']:.2f}" if r["tokens"] else "n/a",
        f"{r['excess_max']:+d}",
        f"{r['within_1']:.0%}" if r["within_1"] == r["within_1"] else "n/a",
        r["refused"],
        ms(r["visible_p99"]),
        ms(r["tail_p99"]),
        ms(late),
        r["backend_cpu"] / max(r["wall"], 1e-9),
        r["redis_cpu"] / r["tokens"] * 1000 if r["tokens"] else float("nan"),
    ]


HEADERS = [
    "streams",
    "complete",
    "wall s",
    "cpu s/1k tok",
    "excl. monitor",
    "peak RSS MiB",
    "KiB/conv",
    "lag p99 ms",
    "lag max",
    "edits/min",
    "worst",
    "≤ +1",
    "429s",
    "visible p99 ms",
    "tail p99 ms",
    "fake late p99",
    "fake cores",
    "redis s/1k",
]


async def parent(args: argparse.Namespace) -> list[dict[str, Any]]:
    print_machine()
    print(
        f"platform {args.platform} (round trip {ms(args.latency):.0f} ms), replies of "
        f"{args.tokens} tokens at {args.tps} tokens/s after a {args.ttft:.1f} s TTFT, "
        f"edit_interval 1.0 s, {args.conns_per_backend or 'all'} streams per backend entry, "
        f"redis pool cap {args.redis_max_connections or 'default (100)'}\n",
        flush=True,
    )
    results = []
    options = BackendOptions(tokens=args.tokens, tps=args.tps, ttft=args.ttft, impl=args.impl)
    async with redis_server() as redis_url, backends(options, args.backend_procs) as fakes:
        for run, n in enumerate(int(x) for x in args.streams.split(",")):
            result = await run_level(args, redis_url, fakes, n, run)
            results.append(result)
            print(
                f"  {n} streams: {result['complete']} complete in {result['wall']:.1f} s, "
                f"outcomes {result['outcomes']}, unfinished {result['unfinished']}"
                + (f", errors {result['errors']}" if result["errors"] else ""),
                file=sys.stderr,
                flush=True,
            )
            if result.get("profile"):
                print(result["profile"])
    print_table(
        "Concurrency: N simultaneous streaming replies in one process",
        HEADERS,
        [row(r) for r in results],
    )
    base = results[0]
    if len(results) > 1 and base["cpu_per_1k"] == base["cpu_per_1k"]:
        ratios = ", ".join(
            f"{r['streams']}: {r['cpu_per_1k'] / base['cpu_per_1k']:.2f}x" for r in results[1:]
        )
        print(f"CPU per 1k tokens relative to {base['streams']} stream(s): {ratios}")
    print(
        "edits/min: mean edits per reply / mean ⌈stream duration ÷ 1 s⌉; worst: largest excess; "
        "fake cores: the fake backend's CPU ÷ wall; redis s/1k: redis-server CPU per 1k tokens.\n"
        "excl. monitor: minus the lag monitor's own cost, measured on the idle loop just before "
        f"the run ({results[0]['monitor_cost'] * 1000:.0f} ms CPU per second)."
    )
    return results


# --- code versions side by side: before and after a change, in one run -----------------------


@contextlib.contextmanager
def checkouts(revisions: list[str]) -> Iterator[dict[str, Path]]:
    """Each revision's tree: this checkout as it is for `.`, else a temporary git worktree of the
    commit (removed afterwards) with this checkout's bench/ in place of its own, so that a child
    started there runs the same benchmark on that version's bot/ and adapters/."""
    root = Path(__file__).resolve().parent.parent
    trees: dict[str, Path] = {}
    made: list[Path] = []
    scratch = Path(tempfile.mkdtemp(prefix="parley-versions-"))
    try:
        for i, rev in enumerate(revisions):
            if rev == ".":
                trees[rev] = root
                continue
            path = scratch / str(i)
            subprocess.run(
                ["git", "worktree", "add", "--detach", "--quiet", str(path), rev],
                cwd=root,
                check=True,
            )
            made.append(path)
            shutil.rmtree(path / "bench")  # this checkout's benchmark, that version's code
            shutil.copytree(root / "bench", path / "bench", ignore=shutil.ignore_patterns("__py*"))
            trees[rev] = path
        yield trees
    finally:
        for path in made:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=root)
        shutil.rmtree(scratch, ignore_errors=True)


def describe(rev: str, tree: Path) -> str:
    """What a version is: the commit (and, for `.`, its uncommitted changes under bot/)."""
    if rev == ".":
        return f"this checkout: {code_version()}"
    short = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True
    ).stdout.strip()
    return f"{rev} = {short} (its bot/ and adapters/, this checkout's bench/)"


def carried(levels: list[int], lags: dict[int, list[float]], limit: float) -> str:
    """The most streams whose loop lag p99 (median over rounds) stays under `limit`, with every
    level below it also under: `≥ L` (and `< next` when a level above was measured)."""
    best: int | None = None
    for n in levels:
        if statistics.median(lags[n]) >= limit:
            break
        best = n
    above = [n for n in levels if best is None or n > best]
    if best is None:
        return f"< {levels[0]}"
    return f"{best}–{above[0]}" if above else f"≥ {best}"


async def compare(args: argparse.Namespace) -> None:
    """--versions: every level, --repeat rounds, each version's child in turn (the order swapped
    every round), on one Redis and one set of fake backends; tables of each, then side by side."""
    print_machine()
    revisions = args.versions.split(",")
    levels = [int(x) for x in args.streams.split(",")]
    options = BackendOptions(tokens=args.tokens, tps=args.tps, ttft=args.ttft, impl=args.impl)
    results: dict[str, dict[int, list[dict[str, Any]]]] = {
        rev: {n: [] for n in levels} for rev in revisions
    }
    with checkouts(revisions) as trees:
        names = {rev: describe(rev, trees[rev]) for rev in revisions}
        for rev in revisions:
            print(f"version {rev}: {names[rev]}")
        print(
            f"\nplatform {args.platform}, replies of {args.tokens} tokens at {args.tps} tokens/s "
            f"after a {args.ttft:.1f} s TTFT, {args.backend_procs} fake backend process(es), "
            f"{args.repeat} round(s) per level, "
            f"{'warm (N turns before the measured N)' if args.warm else 'cold burst'}\n",
            flush=True,
        )
        async with redis_server() as redis_url, backends(options, args.backend_procs) as fakes:
            run = 0
            for n in levels:
                for round_ in range(args.repeat):
                    order = revisions if round_ % 2 == 0 else revisions[::-1]
                    for rev in order:
                        result = await run_level(args, redis_url, fakes, n, run, trees[rev])
                        run += 1
                        results[rev][n].append(result)
                        print(
                            f"  {rev} at {n}: {result['complete']}/{n} complete, "
                            f"{result['cpu_per_1k'] * 1000:.1f} ms CPU/1k tok, lag p99 "
                            f"{ms(result['lag_p99']):.0f} ms, {result.get('loop', 'asyncio')}",
                            file=sys.stderr,
                            flush=True,
                        )
    for rev in revisions:
        rows = [
            [result.get("loop", "asyncio"), *row(result)]
            for n in levels
            for result in results[rev][n]
        ]
        print_table(f"{rev} ({names[rev]})", ["loop", *HEADERS], rows)
    first = revisions[0]
    side: list[list[object]] = []
    for n in levels:
        base = statistics.mean(r["cpu_per_1k"] for r in results[first][n])
        cells: list[object] = [n]
        for rev in revisions:
            cpu = statistics.mean(r["cpu_per_1k"] for r in results[rev][n])
            excl = statistics.mean(excl_monitor(r) for r in results[rev][n])
            each = " ".join(f"{ms(r['lag_p99']):.0f}" for r in results[rev][n])
            cells += [ms(cpu), ms(excl), f"{cpu / base:.2f}x", each]
        side.append(cells)
    headers = ["streams"]
    for rev in revisions:
        headers += [f"{rev} ms/1k", "excl. mon.", "vs " + first, "lag p99 ms"]
    print_table("CPU per 1,000 tokens end to end and loop lag, side by side", headers, side)
    for rev in revisions:
        lags = {n: [r["lag_p99"] for r in results[rev][n]] for n in levels}
        print(f"streams with loop lag p99 < 50 ms, {rev}: {carried(levels, lags, 0.050)}")
    print(
        "\nms/1k: Parley's CPU per 1,000 tokens (mean of the rounds); excl. mon.: less the lag "
        "monitor's own cost on an idle loop; lag p99: each round's. Streams carried: the largest "
        "level whose median lag p99 over the rounds is under 50 ms, every level below it too."
    )


def excl_monitor(r: dict[str, Any]) -> float:
    """CPU seconds per 1,000 tokens less the lag monitor's own cost (measured on the idle loop
    just before the run)."""
    if not r["tokens"]:
        return float("nan")
    return float(max(0.0, r["cpu"] - r["monitor_cost"] * r["wall"]) / r["tokens"] * 1000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="N simultaneous streams (see module doc).")
    parser.add_argument("--quick", action="store_true", help="1,50 streams of 60 tokens")
    parser.add_argument("--streams", default="1,100,1000,2000")
    parser.add_argument("--platform", default="discord", choices=sorted(PLATFORMS))
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--tps", default="30,80")
    parser.add_argument("--ttft", type=float, default=0.5)
    parser.add_argument("--impl", default="lean", choices=["lean", "faithful"])
    parser.add_argument("--conns-per-backend", type=int, default=100)
    parser.add_argument(
        "--backend-procs", type=int, default=1, help="fake backend processes (round robin)"
    )
    parser.add_argument(
        "--redis-max-connections",
        type=int,
        default=10_000,
        help="redis pool cap via the URL (0: the core's own, PARLEY_REDIS_MAX_CONNECTIONS)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per level, seconds")
    parser.add_argument("--profile", default="none", choices=["none", "cprofile", "sample"])
    parser.add_argument(
        "--versions",
        help="compare code versions in one run: git revisions, `.` for this checkout as it is "
        "(e.g. f09cfe2,.); each level's children alternate between them",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds per level (--versions)")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="before the measured N, N turns in other channels: the steady state of a busy "
        "process (its Redis and backend connections open, caches full) instead of a cold burst",
    )
    # child-only
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--backend-urls", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--variant",
        default="core",
        choices=["core", *VARIANTS],
        help="backend stream reader: the core's, or a candidate from bench/variants.py",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.quick:
        args.streams, args.tokens = "1,50", 60
    if args.child:
        args.streams_n = int(args.streams)
        emit_json(run_like_parley(child(args)))
        return
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(compare(args) if args.versions else parent(args))


if __name__ == "__main__":
    main()
