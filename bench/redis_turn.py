"""Redis per turn: round trips, commands, bytes and time as a thread's history grows.

    python -m bench.redis_turn [--quick] [--sizes 10,100,1000] [--turns 30]

A small asyncio TCP proxy sits between Parley and a real redis-server and counts, per client
connection, request bursts: data from the client after the server last answered starts a new
round trip, so a pipeline counts once however many commands (and TCP segments) it holds. It also
parses the RESP requests to list the commands, and counts the bytes each way.

Before every measured turn the thread's history list is reset (directly, not through the proxy)
to exactly N valid entries (`HistoryEntry.to_json`, ~200 characters each, users and assistant
alternating) and `history_max_messages` is set above N, so each turn sees N messages. The
backend answers at once (5 tokens, no TTFT) and the platform has no latency, so the time per
turn is Parley + Redis + loopback; it is compared across sizes in the same run. (The platform
has no rate limits here: every turn edits the same channel.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from bench.common import (
    BackendOptions,
    BackendProcess,
    cpu_seconds,
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
from bench.platform import NO_LIMITS, FakePlatform, ReplyRecord
from bot.state import HistoryEntry, State
from bot.turn import ConversationKey, Turn


@dataclass
class Traffic:
    round_trips: int = 0
    sequential: int = 0  # bursts that started while no other burst was waiting for an answer
    outstanding: int = 0
    commands: list[str] = field(default_factory=list)
    bursts: list[tuple[int, list[str]]] = field(default_factory=list)
    to_server: int = 0
    to_client: int = 0
    connections: set[int] = field(default_factory=set)  # connections that carried requests

    def snapshot(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.round_trips,
            self.sequential,
            len(self.commands),
            self.to_server,
            self.to_client,
            len(self.bursts),
        )


class RespRequests:
    """Incremental parser of RESP request arrays: yields each command's name."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self.buffer += data
        names: list[str] = []
        while True:
            parsed = self._one()
            if parsed is None:
                return names
            names.append(parsed)

    def _one(self) -> str | None:
        buf = self.buffer
        if not buf.startswith(b"*"):
            end = buf.find(b"\r\n")  # an inline command
            if end < 0:
                return None
            self.buffer = buf[end + 2 :]
            return buf[:end].split(b" ", 1)[0].decode().upper()
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        count, pos, first = int(buf[1:end]), end + 2, ""
        for i in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            length = int(buf[pos + 1 : end])
            if len(buf) < end + 2 + length + 2:
                return None
            if i == 0:
                first = buf[end + 2 : end + 2 + length].decode().upper()
            elif i == 1 and first in ("SCRIPT", "CLIENT"):  # SCRIPT EXISTS, CLIENT SETINFO
                first += " " + buf[end + 2 : end + 2 + length].decode().upper()
            pos = end + 2 + length + 2
        self.buffer = buf[pos:]
        return first


class CountingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.traffic = Traffic()
        self.server: asyncio.Server | None = None
        self.ids = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.ids += 1
        conn = self.ids
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        awaiting = [False]
        parser = RespRequests()
        traffic = self.traffic
        burst: list[str] = []

        async def client_to_server() -> None:
            nonlocal burst
            while data := await reader.read(65536):
                if not awaiting[0]:
                    awaiting[0] = True
                    traffic.round_trips += 1
                    if traffic.outstanding == 0:
                        traffic.sequential += 1
                    traffic.outstanding += 1
                    traffic.connections.add(conn)
                    burst = []
                    traffic.bursts.append((conn, burst))
                traffic.to_server += len(data)
                names = parser.feed(data)
                traffic.commands.extend(names)
                burst.extend(names)
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if awaiting[0]:
                    awaiting[0] = False
                    traffic.outstanding -= 1
                traffic.to_client += len(data)
                writer.write(data)
                await writer.drain()
            writer.close()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(client_to_server(), server_to_client())


def history_entries(n: int) -> list[str]:
    text = (
        "a message of about two hundred characters, the length of an ordinary chat turn in a "
        "team thread, with a little detail about what was asked and a short follow-up question?"
    )
    out = []
    for i in range(n):
        if i % 2 == 0:
            entry = HistoryEntry("user", f"{i}: {text}", "U1", "alice")
        else:
            entry = HistoryEntry("assistant", f"{i}: {text}", model="llama3.2:latest")
        out.append(entry.to_json())
    return out


async def measure(args: argparse.Namespace) -> None:
    print_machine()
    sizes = [int(s) for s in args.sizes.split(",")]
    async with redis_server() as redis_url:
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        proxy = CountingProxy(port)
        proxy_url = await proxy.start()
        backend = BackendProcess(BackendOptions(tokens=5, tps="1000,1000", ttft=0.0))
        await backend.start()
        direct = aioredis.Redis.from_url(redis_url)
        config = settings(
            proxy_url,
            [backend.url],
            history_max_messages=max(sizes) * 2 + 10,
            redis_prefix="rt:",
        )
        rows: list[list[object]] = []
        sequences: dict[int, str] = {}
        try:
            async with parley(config) as app:
                fake = FakePlatform(NO_LIMITS, latency=0.0)
                await run_turn(app, fake, "warm", 0)
                await run_turn(app, fake, "warm", 1)
                base_time = 0.0
                for size in sizes:
                    result = await one_size(app, fake, proxy, direct, size, args.turns)
                    sequences[size] = result["sequence"]
                    base_time = base_time or result["time_p50"]
                    rows.append(
                        [
                            size,
                            args.turns,
                            result["rtt_mean"],
                            f"{result['rtt_min']}–{result['rtt_max']}",
                            result["sequential"],
                            result["commands"],
                            result["connections"],
                            result["from_redis"] / 1024,
                            result["to_redis"] / 1024,
                            ms(result["time_p50"]),
                            ms(result["time_p99"]),
                            f"{result['time_p50'] / base_time:.2f}x",
                            ms(result["cpu"]),
                        ]
                    )
        finally:
            await direct.aclose()
            await backend.stop()
            await proxy.stop()
    print_table(
        "Redis per turn as the thread's history grows (one turn at a time)",
        [
            "history",
            "turns",
            "round trips",
            "min–max",
            "sequential",
            "commands",
            "conns",
            "KiB from redis",
            "KiB to redis",
            "time p50 ms",
            "p99",
            f"vs {sizes[0]}",
            "CPU ms",
        ],
        rows,
    )
    for size, sequence in sequences.items():
        print(f"round trips of one turn at {size} messages: {sequence}")
    print(
        "\nround trips: client→server request bursts over all connections (a pipeline counts "
        "once).\nsequential: those that began while no other was waiting for its answer, i.e. "
        "the round trips a turn waits for one after another."
    )


async def one_size(
    app: Any,
    fake: FakePlatform,
    proxy: CountingProxy,
    direct: aioredis.Redis,
    size: int,
    turns: int,
) -> dict[str, Any]:
    state: State = app.state
    run, index = f"h{size}", 0
    key = ConversationKey(fake.spec.name, f"S{run}-{index}", f"C{run}-{index}", f"{index}.0")
    name = state.history_key(key)
    entries = history_entries(size)
    rtts, seqs, commands, times, cpus = [], [], [], [], []
    from_redis = to_redis = 0
    sequence = ""
    connections: set[int] = set()
    for t in range(turns):
        async with direct.pipeline(transaction=True) as pipe:
            pipe.delete(name)
            pipe.rpush(name, *entries)
            await pipe.execute()
        proxy.traffic.connections = set()
        rt0, seq0, cmd0, up0, down0, b0 = proxy.traffic.snapshot()
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        record = await run_turn_on(app, fake, key, f"{run}-{t}")
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        rt1, seq1, cmd1, up1, down1, b1 = proxy.traffic.snapshot()
        if record.outcome != "complete":
            raise RuntimeError(f"turn ended {record.outcome}")
        rtts.append(rt1 - rt0)
        seqs.append(seq1 - seq0)
        commands.append(cmd1 - cmd0)
        to_redis += up1 - up0
        from_redis += down1 - down0
        times.append(elapsed)
        cpus.append(cpu)
        connections |= proxy.traffic.connections
        if t == turns - 1:
            sequence = bursts_text(proxy.traffic.bursts[b0:b1])
        stored = await direct.llen(name)
        if stored < size:
            raise RuntimeError(f"history trimmed to {stored} < {size}: raise history_max")
    return {
        "rtt_mean": sum(rtts) / len(rtts),
        "rtt_min": min(rtts),
        "rtt_max": max(rtts),
        "sequential": sum(seqs) / len(seqs),
        "commands": sum(commands) / len(commands),
        "connections": len(connections),
        "from_redis": from_redis / turns,
        "to_redis": to_redis / turns,
        "time_p50": percentile(times, 0.5),
        "time_p99": percentile(times, 0.99),
        "cpu": sum(cpus) / len(cpus),
        "sequence": sequence,
    }


async def run_turn_on(app: Any, fake: FakePlatform, key: ConversationKey, event: str) -> Any:
    """A turn in an existing thread (the same user each time, a new event id)."""
    turn = Turn(key, "U1", "alice", "And what about the next step?", f"E{event}")
    record = ReplyRecord(event_at=time.time())
    outcome = await app.conversation.handle(turn, fake.sink(key.space, key.channel, record))
    record.outcome = str(outcome)
    return record


def bursts_text(bursts: list[tuple[int, list[str]]]) -> str:
    """[SET SET LRANGE]@c1 — one round trip's commands, and which connection carried it."""
    ids: dict[int, int] = {}
    parts = []
    for conn, names in bursts:
        number = ids.setdefault(conn, len(ids) + 1)
        parts.append(f"[{' '.join(_compact(names))}]@c{number}")
    return " ".join(parts)


def _compact(commands: list[str]) -> list[str]:
    """MULTI RPUSH LTRIM EXPIRE EXEC stays as is; repeated names are shown once with ×n."""
    out: list[str] = []
    counts = Counter[str]()
    for name in commands:
        if out and out[-1].split("×")[0] == name:
            counts[name] += 1
            out[-1] = f"{name}×{counts[name] + 1}"
        else:
            counts[name] = 0
            out.append(name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Redis round trips per turn (see module doc).")
    parser.add_argument("--quick", action="store_true", help="5 turns per size")
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--turns", type=int, default=30)
    args = parser.parse_args()
    if args.quick:
        args.turns = 5
    run_like_parley(measure(args))  # on the loop `parley run` uses


if __name__ == "__main__":
    main()
