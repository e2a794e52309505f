"""The `parley` console script end to end, in a subprocess, against a fake model server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.model_server import FakeModelServer
from tests.support import closed_url

PARLEY = str(Path(sys.executable).with_name("parley"))
KEY = "sk-backend-key-never-printed-77"


@dataclass
class Run:
    returncode: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.out.splitlines() if line.strip()]


async def parley(*args: str, env: dict[str, str], cwd: Path, stdin: str = "") -> Run:
    """Run the real console script; the fake server keeps serving in this loop meanwhile."""
    process = await asyncio.create_subprocess_exec(
        PARLEY,
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def backends(*entries: tuple[str, str, str] | tuple[str, str, str, str]) -> str:
    listed = []
    for name, kind, url, *key in entries:
        entry = {"name": name, "kind": kind, "url": url}
        if key:
            entry["api_key"] = key[0]
        listed.append(entry)
    return json.dumps(listed)


@pytest.fixture
def env(tmp_path: Path, redis_url: str, model_server: FakeModelServer) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("PARLEY_", "OLLAMA_")) and k != "REDIS_SERVER"
    }
    return {
        **base,
        "PARLEY_REDIS_URL": redis_url,
        "PARLEY_BACKENDS": backends(("local", "ollama", model_server.url)),
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
    }


async def test_piped_chat_answers_each_line_and_remembers_the_thread(
    env: dict[str, str], tmp_path: Path, model_server: FakeModelServer
) -> None:
    run = await parley(
        "chat", "--thread", uuid.uuid4().hex, env=env, cwd=tmp_path, stdin="hello\nsecond\n"
    )
    assert run.returncode == 0, run.err
    assert run.lines == ["You said: hello", "You said: second"]
    first, second = model_server.chat_requests
    assert first["model"] == "llama3.2:latest"
    assert [(m["role"], m["content"]) for m in first["messages"][1:]] == [("user", "hello")]
    assert [(m["role"], m["content"]) for m in second["messages"][1:]] == [
        ("user", "hello"),
        ("assistant", "You said: hello"),
        ("user", "second"),
    ]
    assert second["messages"][0]["role"] == "system"


async def test_models_lists_one_model_per_line_with_its_backend(
    env: dict[str, str], tmp_path: Path, model_server: FakeModelServer
) -> None:
    async with FakeModelServer(models=["gemma3:4b"]) as other:
        env["PARLEY_BACKENDS"] = backends(
            ("local", "ollama", model_server.url), ("gpu", "openai", other.url)
        )
        run = await parley("models", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.err
    assert [line.split() for line in run.lines] == [
        ["llama3.2:latest", "local"],
        ["qwen3:8b", "local"],
        ["gemma3:4b", "gpu"],
    ]


async def test_check_fails_naming_the_url_of_an_unreachable_backend(
    env: dict[str, str], tmp_path: Path, model_server: FakeModelServer
) -> None:
    dead = closed_url()
    env["PARLEY_BACKENDS"] = backends(
        ("local", "ollama", model_server.url, KEY), ("spare", "ollama", dead)
    )
    run = await parley("check", env=env, cwd=tmp_path)
    assert run.returncode != 0
    failures = [line for line in run.lines if line.startswith("FAIL")]
    assert len(failures) == 1
    assert "spare" in failures[0]
    assert dead in failures[0]
    assert any(line.startswith("ok") and "local" in line for line in run.lines)
    assert KEY not in run.out + run.err


async def test_check_exits_0_when_settings_redis_and_every_backend_are_fine(
    env: dict[str, str], tmp_path: Path, model_server: FakeModelServer
) -> None:
    env["PARLEY_BACKENDS"] = backends(("local", "ollama", model_server.url, KEY))
    run = await parley("check", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.out + run.err
    assert all(line.startswith("ok") for line in run.lines), run.out
    assert any("redis" in line for line in run.lines)
    assert any(model_server.url in line for line in run.lines)
    assert KEY not in run.out + run.err


async def test_without_a_redis_url_chat_keeps_history_in_an_embedded_redis(
    env: dict[str, str], tmp_path: Path, model_server: FakeModelServer
) -> None:
    del env["PARLEY_REDIS_URL"]
    thread = uuid.uuid4().hex
    first = await parley("chat", "--thread", thread, env=env, cwd=tmp_path, stdin="hello\n")
    assert first.returncode == 0, first.err
    assert first.lines == ["You said: hello"]
    assert any((tmp_path / "data" / "redis").iterdir())  # its data lives in the data dir

    again = await parley("chat", "--thread", thread, env=env, cwd=tmp_path, stdin="again\n")
    assert again.returncode == 0, again.err
    assert again.lines == ["You said: again"]
    last = model_server.chat_requests[-1]
    assert [(m["role"], m["content"]) for m in last["messages"][1:]] == [
        ("user", "hello"),
        ("assistant", "You said: hello"),
        ("user", "again"),
    ]
