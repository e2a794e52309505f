"""What every benchmark shares: the machine, tables, loop lag and RSS, Parley and its fakes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from bench.platform import FakePlatform, ReplyRecord
from bot.app import Parley
from bot.embedded_redis import EmbeddedRedis
from bot.settings import Settings
from bot.turn import ConversationKey, Turn

MODEL = "llama3.2:latest"
T = TypeVar("T")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- the machine and the tables ---------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "code": code_version(),
        "cpu": f"{cpu}, {usable} usable of {os.cpu_count()} (nproc {usable})",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "load average at start": load,
    }


def code_version() -> str:
    """The commit, which core files differ from it, and a digest of bot/ as it is now."""
    import hashlib
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for path in sorted((root / "bot").rglob("*.py")):
        digest.update(path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "bot"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
    except OSError:
        head, changed = "?", []
    dirty = [line[3:] for line in changed if line.strip()]
    modified = f" + changes in {', '.join(dirty)}" if dirty else ""
    return f"{head or '?'}{modified} (bot/ digest {digest.hexdigest()[:10]})"


def print_machine() -> None:
    for name, value in machine().items():
        print(f"{name + ':':<22} {value}")
    print()


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(title)
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print()


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1), nearest-rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[min(rank, len(ordered) - 1)]


def ms(seconds: float) -> float:
    return seconds * 1000


# --- the process: CPU, RSS, event-loop lag ----------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def child_cpu_seconds(pid: int) -> float:
    """utime + stime of another process, from /proc (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Monitor:
    """Sleeps `interval` again and again and records the overshoot; samples RSS as it goes."""

    interval: float = 0.010
    lags: list[float] = field(default_factory=list)
    peak_rss: int = 0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.peak_rss = rss_bytes()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.lags.append(max(0.0, loop.time() - before - self.interval))
            n += 1
            if n % 10 == 0:
                self.peak_rss = max(self.peak_rss, rss_bytes())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.peak_rss = max(self.peak_rss, rss_bytes())


# --- the fakes: Redis and the model backend ---------------------------------------------------


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[str]:
    """A real redis-server child on a loopback port, nothing persisted."""
    server = EmbeddedRedis(None, persist=False)
    url = await server.start()
    try:
        yield url
    finally:
        await server.stop()


@dataclass
class BackendOptions:
    tokens: int = 200
    tps: str = "30,80"
    ttft: float = 0.5
    impl: str = "lean"
    seed: int = 1

    def argv(self) -> list[str]:
        return [
            "--tokens",
            str(self.tokens),
            "--tps",
            self.tps,
            "--ttft",
            str(self.ttft),
            "--impl",
            self.impl,
            "--seed",
            str(self.seed),
        ]


class BackendProcess:
    """bench/fake_backend.py in its own process, so its CPU and memory are not Parley's."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.url = ""
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.fake_backend",
            *self.options.argv(),
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        if not line.startswith(b"URL "):
            raise RuntimeError(f"fake backend did not start: {line!r}")
        self.url = line.decode().split()[1]
        return self.url

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def stats(self) -> dict[str, Any]:
        if self.options.impl != "lean":
            return {}
        async with httpx.AsyncClient() as client:
            result: dict[str, Any] = (await client.get(self.url + "/bench/stats")).json()
            return result

    async def reset(self) -> None:
        if self.options.impl == "lean":
            async with httpx.AsyncClient() as client:
                await client.post(self.url + "/bench/reset")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


@contextlib.asynccontextmanager
async def backends(options: BackendOptions, count: int = 1) -> AsyncIterator[list[BackendProcess]]:
    procs = [BackendProcess(options) for _ in range(count)]
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        await asyncio.gather(*(p.stop() for p in procs))


# --- Parley itself ------------------------------------------------------------------------------


def settings(
    redis_url: str,
    backend_urls: Sequence[str],
    *,
    redis_max_connections: int = 0,
    **overrides: Any,
) -> Settings:
    """Parley's real settings with the limits opened up so the bench measures Parley, not them.

    `redis_max_connections` > 0 sets the Redis connection pool's cap through the URL, as an
    operator can (`redis://host:port/0?max_connections=N`); 0 leaves the core's own setting
    (`PARLEY_REDIS_MAX_CONNECTIONS`: a blocking pool, 200 by default).
    """
    if redis_max_connections > 0:
        sep = "&" if "?" in redis_url else "?"
        redis_url = f"{redis_url}{sep}max_connections={redis_max_connections}"
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "backends": [
            {"name": f"b{i}", "kind": "ollama", "url": url} for i, url in enumerate(backend_urls)
        ],
        "default_model": MODEL,
        "backend_concurrency": 1_000_000,
        "rate_limit": "100000/minute",
        "max_in_flight": 1_000_000,
        "edit_interval": 1.0,
        "catalog_ttl": 3600.0,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@contextlib.asynccontextmanager
async def parley(config: Settings) -> AsyncIterator[Parley]:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    app = await Parley.open(config)
    try:
        yield app
    finally:
        await app.aclose()


def emit_json(data: dict[str, Any]) -> None:
    """A child's result: one JSON line on stdout, marked so the parent can find it."""
    print("RESULT " + json.dumps(data), flush=True)


def read_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    raise RuntimeError("the child printed no result")


def run_like_parley(main: Coroutine[Any, Any, T]) -> T:
    """On the loop `parley run` uses: bot/eventloop.py's, or asyncio.run for code from before it
    (an older version's bot/ under --versions, whose tree has no bot/eventloop.py: an editable
    install of this checkout would otherwise lend it this one's)."""
    import bot

    if not (Path(bot.__file__).parent / "eventloop.py").exists():
        return asyncio.run(main)
    from bot.eventloop import run

    return run(main, os.environ.get("PARLEY_EVENT_LOOP", "auto"))  # type: ignore[arg-type]


def now() -> float:
    return time.time()


# --- one simulated event ----------------------------------------------------------------------


async def run_turn(
    app: Parley,
    fake: FakePlatform,
    run: str,
    index: int,
    *,
    text: str = "Hello! Tell me something.",
    space: str | None = None,
) -> ReplyRecord:
    """One incoming event from its own user in its own channel (and, by default, workspace)."""
    name = fake.spec.name
    space = space or f"S{run}-{index}"
    channel = f"C{run}-{index}"
    key = ConversationKey(name, space, channel, f"{index}.0")
    turn = Turn(key, f"U{run}-{index}", f"user{index}", text, f"E{run}-{index}")
    record = ReplyRecord(event_at=time.time())
    outcome = await app.conversation.handle(turn, fake.sink(space, channel, record))
    record.outcome = str(outcome)
    return record
