"""A tiny statistical CPU profiler (stdlib only): SIGPROF every `interval` of CPU time.

Each sample records the Python stack of the main thread at that moment. Time spent inside a C
function (a socket send, json's scanner) is charged to the Python function that called it, which
is where a fix would go anyway. Unlike cProfile it does not slow every call down, so the shares it
reports are the shares of a normal run.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from types import FrameType

ROOT = f"{Path(__file__).resolve().parent.parent}/"  # the checkout: bot/… and bench/… below it

GROUPS = (
    ("/bot/backends/", "bot.backends (HTTP stream → chunks)"),
    ("/bot/streaming", "bot.streaming (renderer)"),
    ("/bot/router", "bot.router (Generation)"),
    ("/bot/conversation", "bot.conversation"),
    ("/bot/", "bot (other)"),
    ("/bench/", "bench (fake platform, monitor)"),
    ("/httpx/", "httpx"),
    ("/httpx_aiohttp/", "httpx-aiohttp (the transport)"),
    ("/httpcore/", "httpcore"),
    ("/h11/", "h11 (HTTP/1.1 parser)"),
    ("/anyio/", "anyio"),
    ("/aiohttp/", "aiohttp"),
    ("/asyncio/", "asyncio (event loop, tasks)"),
    ("/redis/", "redis-py"),
    ("/limits/", "limits"),
    ("/json/", "json"),
    ("/ssl", "ssl"),
)


WATCH = (
    ("reading the backend stream, per line", "bot/backends/base.py", "timed_lines"),
    ("httpx: the response's byte iterators", "httpx/_models.py", "aiter_raw"),
    ("httpx-aiohttp: the body, chunk by chunk", "httpx_aiohttp/transport.py", "__aiter__"),
    ("aiohttp: reading the body", "aiohttp/streams.py", "read"),
    ("aiohttp: each packet (C parser)", "aiohttp/client_proto.py", "data_received"),
    ("h11: HTTP/1.1 chunked parsing (httpcore)", "httpcore/_async/http11.py", "_receive_event"),
    ("json.loads of each line", "json/__init__.py", "loads"),
    ("orjson (or json) of each line, history", "bot/fastjson.py", "loads"),
    ("aiohttp: the body, read directly (timed_lines)", "aiohttp/streams.py", "readany"),
    ("renderer.feed() per chunk", "bot/streaming.py", "feed"),
    ("redis-py: importlib.metadata per new connection", "redis/utils.py", "get_lib_version"),
    ("per-user rate check (limits library)", "bot/ratelimit.py", "check_rate"),
    ("router.open (request, first chunk)", "bot/router.py", "open"),
)


def group_of(filename: str) -> str:
    for needle, name in GROUPS:
        if needle in filename:
            return name
    return "other: " + os.path.basename(filename)


def label(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("/site-packages/", "/lib/python3.11/", ROOT):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{code.co_firstlineno}({code.co_name})"


class Sampler:
    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.samples = 0
        self.self_counts: Counter[str] = Counter()
        self.inclusive: Counter[str] = Counter()
        self.groups: Counter[str] = Counter()
        self.group_inclusive: Counter[str] = Counter()

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_DFL)

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        if frame is None:
            return
        self.samples += 1
        self.self_counts[label(frame)] += 1
        self.groups[group_of(frame.f_code.co_filename)] += 1
        seen: set[str] = set()
        seen_groups: set[str] = set()
        f: FrameType | None = frame
        while f is not None:
            name = label(f)
            if name not in seen:
                seen.add(name)
                self.inclusive[name] += 1
            group = group_of(f.f_code.co_filename)
            if group not in seen_groups:
                seen_groups.add(group)
                self.group_inclusive[group] += 1
            f = f.f_back

    def report(self, top: int = 25) -> str:
        total = max(self.samples, 1)
        lines = [f"{self.samples} samples of {self.interval * 1000:.0f} ms CPU", ""]
        lines.append("CPU by package (self = the innermost Python frame is there):")
        lines.append(f"{'self':>6}  {'incl':>6}  package")
        for group, count in self.groups.most_common():
            incl = self.group_inclusive[group]
            lines.append(f"{count / total:6.1%}  {incl / total:6.1%}  {group}")
        lines += ["", f"Top {top} functions by self time:", f"{'self':>6}  {'incl':>6}  function"]
        for name, count in self.self_counts.most_common(top):
            lines.append(f"{count / total:6.1%}  {self.inclusive[name] / total:6.1%}  {name}")
        lines += ["", "Selected call sites (inclusive: CPU spent in them and below):"]
        for what, path, function in WATCH:
            count = max(
                (
                    c
                    for n, c in self.inclusive.items()
                    if n.startswith(path + ":") and n.endswith(f"({function})")
                ),
                default=0,
            )
            lines.append(f"{count / total:6.1%}  {what}  [{path} {function}]")
        lines += ["", f"Top {top} functions by inclusive time (bot/ and bench/ only):"]
        ours = [(n, c) for n, c in self.inclusive.most_common() if n.startswith(("bot/", "bench/"))]
        for name, count in ours[:top]:
            lines.append(f"{count / total:6.1%}  {name}")
        return "\n".join(lines)
