"""A lean, protocol-faithful fake Ollama for the benchmarks, run as its own process.

It speaks the wire format of /work/shared/protocols/ollama.md section 1: `POST /api/chat` answers
200 `application/x-ndjson`, one compact JSON object per line, one HTTP chunk per line (as Go's
`http.Flusher` does), content pieces first, then a `done:true` line with the metrics in integer
nanoseconds; `GET /api/tags` lists the models; `POST /api/show` says what a model can do and its
context length (a text model), so Parley caches it as it would a real Ollama's answer (without
it, every turn asked again: an answer that could not be had is not cached); an unknown model gets
404 `{"error": …}`.

What makes it lean: one asyncio Protocol per connection, no framework, and one timer for every
stream in the process (a heap of due times) instead of one sleeping task per stream, so a single
process can feed thousands of concurrent streams at 30–80 tokens/s.

What is bench-only: the first content piece carries `[[r=<request received>,s=<sent>]]` and the
last one `[[e=<sent>]]` (time.time() on this machine), so the fake platform can measure the time
from the model's first token to the first visible text and from its last token to the final edit.
Each stream picks its rate uniformly in [tps_min, tps_max] (seeded, so runs repeat).

    python -m bench.fake_backend --port 0 --tokens 200 --tps 30,80 --ttft 0.5
    python -m bench.fake_backend --check 2000           # can it sustain 2,000 streams?
    python -m bench.fake_backend --check 2000 --impl faithful   # the tests' FakeModelServer

The first line on stdout is `URL http://127.0.0.1:PORT`. `GET /bench/stats` returns its counters
(streams, tokens, how late tokens went out against their schedule, its own CPU seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import heapq
import json
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

MODEL = "llama3.2:latest"
TEXT = (
    "the model answers in short plain sentences and keeps each paragraph about one idea so "
    "that people reading a busy channel can follow along without scrolling back through every "
    "earlier message in the thread while the reply is still being written"
)
WORDS = TEXT.split()


@dataclass
class Config:
    tokens: int = 200
    tps_min: float = 30.0
    tps_max: float = 80.0
    ttft: float = 0.5
    seed: int = 1
    stamps: bool = True
    models: list[str] = field(default_factory=lambda: [MODEL])


def go_string(text: str) -> str:
    """A JSON string as Go's encoding/json writes it (UTF-8, HTML-safe escapes)."""
    return (
        json.dumps(text, ensure_ascii=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )


class Clock:
    """Go's RFC3339Nano in UTC, with the per-second part cached."""

    def __init__(self) -> None:
        self._second = -1
        self._base = ""

    def rfc3339(self, now: float) -> str:
        ns = int(now * 1e9)
        second, fraction = divmod(ns, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        digits = f"{fraction:09d}".rstrip("0")
        return f"{self._base}.{digits}Z" if digits else f"{self._base}Z"


def http_date() -> str:
    return formatdate(usegmt=True)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class Stream:
    conn: BackendConnection
    model: str  # JSON-encoded
    pieces: list[str]  # JSON-encoded content strings, stamps filled in when sent
    interval: float
    received: float  # time.time() the request was complete
    received_ns: int
    prompt_tokens: int
    due: float = 0.0  # loop time of the next piece
    index: int = 0
    first_sent_ns: int = 0
    headers_sent: bool = False
    closed: bool = False


class Stats:
    def __init__(self) -> None:
        self.streams = 0
        self.completed = 0
        self.disconnects = 0
        self.tokens = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.late_ms = [0] * 1001  # histogram of lateness against schedule, 1 ms bins
        self.late_max = 0.0

    def late(self, seconds: float) -> None:
        ms = max(0, int(seconds * 1000))
        self.late_ms[min(ms, 1000)] += 1
        self.late_max = max(self.late_max, seconds)

    def late_quantile(self, q: float) -> float:
        total = sum(self.late_ms)
        if not total:
            return 0.0
        target, seen = q * total, 0
        for ms, count in enumerate(self.late_ms):
            seen += count
            if seen >= target:
                return ms / 1000
        return 1.0

    def as_json(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "streams": self.streams,
            "completed": self.completed,
            "disconnects": self.disconnects,
            "tokens": self.tokens,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "late_p50": self.late_quantile(0.5),
            "late_p99": self.late_quantile(0.99),
            "late_max": self.late_max,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
        }

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


class Scheduler:
    """One timer for every stream: pops whatever is due, writes it, re-arms for the earliest."""

    def __init__(self, config: Config, stats: Stats) -> None:
        self.config = config
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.heap: list[tuple[float, int, Stream]] = []
        self.seq = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = float("inf")
        self.clock = Clock()

    def add(self, stream: Stream, due: float) -> None:
        stream.due = due
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, stream))
        if due < self.timer_at:
            self._arm(due)

    def _arm(self, at: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.loop.call_at(at, self._run)

    def _run(self) -> None:
        self.timer, self.timer_at = None, float("inf")
        now = self.loop.time()
        horizon = now + 0.0005  # what is due within half a millisecond goes now
        heap = self.heap
        while heap and heap[0][0] <= horizon:
            due, _, stream = heapq.heappop(heap)
            if stream.closed:
                continue
            self.stats.late(now - due)
            self._send(stream)
            if not stream.closed:
                heapq.heappush(heap, (stream.due, self.seq, stream))
                self.seq += 1
        if heap:
            self._arm(heap[0][0])

    def _send(self, stream: Stream) -> None:
        """Write one content piece (or the last piece and the done line); set the next due."""
        wall = time.time()
        index = stream.index
        piece = stream.pieces[index]
        if self.config.stamps and index == 0:
            piece = go_string(f"[[r={stream.received:.6f},s={wall:.6f}]]")
        elif self.config.stamps and index == len(stream.pieces) - 1:
            piece = go_string(f" [[e={wall:.6f}]]")
        if index == 0:
            stream.first_sent_ns = time.perf_counter_ns()
        created = self.clock.rfc3339(wall)
        line = (
            f'{{"model":{stream.model},"created_at":"{created}",'
            f'"message":{{"role":"assistant","content":{piece}}},"done":false}}\n'
        )
        out = chunk(line.encode())
        if not stream.headers_sent:  # Go sends the status line with the first flush
            stream.headers_sent = True
            out = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Date: " + http_date().encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + out
            )
        stream.index += 1
        self.stats.tokens += 1
        if stream.index >= len(stream.pieces):
            out += chunk(self._done_line(stream, wall).encode()) + b"0\r\n\r\n"
            stream.closed = True
            self.stats.completed += 1
            self.stats.in_flight -= 1
            stream.conn.write(out)
            stream.conn.stream_over()
            return
        stream.conn.write(out)
        stream.due += stream.interval

    def _done_line(self, stream: Stream, wall: float) -> str:
        now_ns = time.perf_counter_ns()
        load = max(stream.first_sent_ns - stream.received_ns, 1)
        prompt_eval = stream.prompt_tokens * 250_000
        evaluation = max(now_ns - stream.first_sent_ns, 1)
        return (
            f'{{"model":{stream.model},"created_at":"{self.clock.rfc3339(wall)}",'
            f'"message":{{"role":"assistant","content":""}},"done":true,"done_reason":"stop",'
            f'"total_duration":{load + prompt_eval + evaluation},"load_duration":{load},'
            f'"prompt_eval_count":{stream.prompt_tokens},"prompt_eval_duration":{prompt_eval},'
            f'"eval_count":{len(stream.pieces)},"eval_duration":{evaluation}}}\n'
        )


class BackendConnection(asyncio.Protocol):
    def __init__(self, server: BackendServer) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None and not self.stream.closed:
            self.stream.closed = True
            self.server.stats.disconnects += 1
            self.server.stats.in_flight -= 1
        self.stream = None
        self.transport = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def stream_over(self) -> None:
        self.stream = None
        if self.buffer:  # a request that arrived while we were streaming
            self.data_received(b"")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.stream is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, *_ = [*head[0].split(" "), "", ""]
            self.server.dispatch(self, method, path, body)

    def respond(self, status: int, body: bytes, content_type: str) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        self.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Date: {http_date()}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )


class BackendServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.random = random.Random(config.seed)
        self.scheduler: Scheduler | None = None
        self.words = [go_string(" " + w) for w in WORDS]

    def dispatch(self, conn: BackendConnection, method: str, path: str, body: bytes) -> None:
        json_ct = "application/json; charset=utf-8"
        if method == "GET" and path == "/api/tags":
            models = [
                {"name": m, "model": m, "modified_at": "2025-05-04T17:37:44.706015396-07:00"}
                for m in self.config.models
            ]
            conn.respond(200, json.dumps({"models": models}).encode(), json_ct)
        elif method == "GET" and path == "/bench/stats":
            conn.respond(200, json.dumps(self.stats.as_json()).encode(), json_ct)
        elif method == "POST" and path == "/bench/reset":
            self.stats.reset()
            conn.respond(200, b"{}", json_ct)
        elif method == "GET" and path == "/":
            conn.respond(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif method == "POST" and path == "/api/chat":
            self.chat(conn, body)
        elif method == "POST" and path == "/api/show":
            self.show(conn, body)
        else:
            conn.respond(404, b"404 page not found", "text/plain")

    def show(self, conn: BackendConnection, body: bytes) -> None:
        """What the model can do and its context length, as Ollama's /api/show says (the
        fields Parley reads): a text model, 128K tokens trained."""
        json_ct = "application/json; charset=utf-8"
        try:
            model = str(json.loads(body).get("model") or "")
        except (ValueError, AttributeError):
            conn.respond(400, b'{"error":"unexpected EOF"}', json_ct)
            return
        wanted = model if ":" in model.rsplit("/", 1)[-1] else model + ":latest"
        if wanted not in self.config.models:
            conn.respond(404, json.dumps({"error": f"model '{model}' not found"}).encode(), json_ct)
            return
        show = {
            "details": {"format": "gguf", "family": "llama", "families": ["llama"]},
            "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
            "capabilities": ["completion", "tools"],
        }
        conn.respond(200, json.dumps(show).encode(), json_ct)

    def chat(self, conn: BackendConnection, body: bytes) -> None:
        json_ct = "application/json; charset=utf-8"
        try:
            data = json.loads(body)
        except ValueError:
            conn.respond(400, b'{"error":"unexpected EOF"}', json_ct)
            return
        model = str(data.get("model") or "")
        if not model:
            conn.respond(400, b'{"error":"model is required"}', json_ct)
            return
        wanted = model if ":" in model.rsplit("/", 1)[-1] else model + ":latest"
        if wanted not in self.config.models:
            error = json.dumps({"error": f"model '{model}' not found"}).encode()
            conn.respond(404, error, json_ct)
            return
        messages = data.get("messages") or []
        prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in messages)
        config = self.config
        count = max(config.tokens, 2)
        words = self.words
        start = self.random.randrange(len(words))
        pieces = [words[(start + i) % len(words)] for i in range(count)]
        rate = self.random.uniform(config.tps_min, config.tps_max)
        stream = Stream(
            conn=conn,
            model=go_string(model),
            pieces=pieces,
            interval=1.0 / rate,
            received=time.time(),
            received_ns=time.perf_counter_ns(),
            prompt_tokens=prompt_tokens,
        )
        conn.stream = stream
        self.stats.streams += 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        assert self.scheduler is not None
        self.scheduler.add(stream, self.scheduler.loop.time() + config.ttft)


async def serve_lean(config: Config, host: str, port: int) -> None:
    server = BackendServer(config)
    server.scheduler = Scheduler(config, server.stats)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: BackendConnection(server), host, port, backlog=4096, reuse_address=True
    )
    bound = listener.sockets[0].getsockname()[1]
    print(f"URL http://{host}:{bound}", flush=True)
    await _wait_for_signal()
    listener.close()


async def serve_faithful(config: Config, host: str, port: int) -> None:
    """The tests' FakeModelServer, at one fixed rate (the middle of the range), no stamps."""
    from tests.fakes.model_server import FakeModelServer, Script

    rate = (config.tps_min + config.tps_max) / 2
    words = [" " + WORDS[i % len(WORDS)] for i in range(config.tokens)]
    server = FakeModelServer(models=list(config.models))
    server.default = Script(tokens=words, delay=1.0 / rate, first_delay=config.ttft)
    url = await server.start()
    print(f"URL {url}", flush=True)
    await _wait_for_signal()
    await server.stop()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# --- the capacity check ----------------------------------------------------------------------


class _CountingClient(asyncio.Protocol):
    """Reads one streamed /api/chat answer, counting NDJSON lines, until the last chunk."""

    def __init__(self, done: asyncio.Future[tuple[float, float, int]]) -> None:
        self.done = done
        self.first = 0.0
        self.lines = 0
        self.tail = b""

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.first:
            self.first = now
        self.lines += data.count(b"}\n")
        self.tail = (self.tail + data)[-16:]
        if self.tail.endswith(b"0\r\n\r\n") and not self.done.done():
            self.done.set_result((self.first, now, self.lines))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed early"))


async def check(args: argparse.Namespace) -> None:
    """Start the chosen implementation in a child and pull N concurrent streams from it."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fake_backend",
        "--impl",
        args.impl,
        "--tokens",
        str(args.tokens),
        "--tps",
        args.tps,
        "--ttft",
        str(args.ttft),
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    url = (await child.stdout.readline()).decode().split()[1]
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    request = (
        f"POST /api/chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    tps_min, tps_max = (float(x) for x in args.tps.split(","))
    futures = []
    cpu0 = _child_cpu(child.pid)
    started = time.monotonic()
    for _ in range(args.check):
        done: asyncio.Future[tuple[float, float, int]] = loop.create_future()
        transport, _ = await loop.create_connection(
            functools.partial(_CountingClient, done), host, int(port)
        )
        transport.write(request)
        futures.append(done)
    results = await asyncio.gather(*futures, return_exceptions=True)
    wall = time.monotonic() - started
    cpu = _child_cpu(child.pid) - cpu0
    child.terminate()
    await child.wait()
    ok = [r for r in results if isinstance(r, tuple)]
    slowest_rate = tps_min if args.impl == "lean" else (tps_min + tps_max) / 2
    expected = args.ttft + args.tokens / slowest_rate
    print(
        f"{args.impl}: {len(ok)}/{args.check} streams of {args.tokens} tokens complete in "
        f"{wall:.1f} s (a stream at the slowest rate needs {expected:.1f} s); server CPU "
        f"{cpu:.1f} s = {cpu / wall:.0%} of one core"
    )


def _child_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime in clock ticks (100 Hz)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=200, help="content pieces per answer")
    parser.add_argument("--tps", default="30,80", help="tokens/s range: MIN,MAX")
    parser.add_argument("--ttft", type=float, default=0.5, help="seconds to the first token")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-stamps", action="store_true")
    parser.add_argument("--impl", choices=["lean", "faithful"], default="lean")
    parser.add_argument("--check", type=int, default=0, metavar="N", help="capacity check")
    args = parser.parse_args()
    if args.check:
        asyncio.run(check(args))
        return
    tps_min, tps_max = (float(x) for x in args.tps.split(","))
    config = Config(
        tokens=args.tokens,
        tps_min=tps_min,
        tps_max=tps_max,
        ttft=args.ttft,
        seed=args.seed,
        stamps=not args.no_stamps,
    )
    serve = serve_lean if args.impl == "lean" else serve_faithful
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
