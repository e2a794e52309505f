"""The Dockerfile, compose file and .env.example say what Parley needs (no engine runs here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pip_installs(lines: list[str]) -> list[str]:
    found = []
    for line in lines:
        if match := re.search(r"pip install (?:-q )?(.*)$", line):
            found.append(re.sub(r"\s+", " ", match[1]).replace("-e .", "."))
    return found


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    steps = dockerfile_instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2 and all("slim" in f for f in froms)
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert health and "/healthz" in health[0]
    assert ("CMD", '["parley", "run"]') in steps


def test_the_image_installs_exactly_as_the_readme_does() -> None:
    docker = pip_installs([rest for word, rest in dockerfile_instructions() if word == "RUN"])
    make = pip_installs((ROOT / "Makefile").read_text().splitlines())
    assert docker == ["-r requirements.lock", "--no-deps ."]
    # make installs the same lock (plus the dev tools) and Parley without deps
    assert make[1].startswith("-r requirements.lock")
    assert make[2] == "--no-deps ."
    copied = " ".join(rest for word, rest in dockerfile_instructions() if word == "COPY")
    for needed in ("requirements.lock", "pyproject.toml", "bot", "adapters"):
        assert needed in copied


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_runs_parley_with_persistent_redis_and_optional_ollama() -> None:
    services = compose()["services"]
    parley, redis = services["parley"], services["redis"]
    assert parley["build"] == "."
    assert "redis://redis:6379" in parley["environment"]["PARLEY_REDIS_URL"]
    assert parley["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert services["ollama"]["profiles"] == ["ollama"]
    named = set(compose()["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in named
    grace = int(parley["stop_grace_period"].rstrip("s"))
    assert grace > Settings.model_fields["shutdown_grace"].default


def test_env_example_names_only_real_settings() -> None:
    fields = set(Settings.model_fields)
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*(PARLEY_[A-Z_]+)=", line)
        if match:
            assert match[1].removeprefix("PARLEY_").lower() in fields, match[1]


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no docker compose client on this machine",
)
def test_docker_compose_config_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
