"""Settings: OLLAMA_HOST parsing, the cloud backend, PARLEY_BACKENDS, one-line start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from bot.settings import CLOUD_URL, BackendConfig, Settings

PARLEY = str(Path(sys.executable).with_name("parley"))
KEY = "sk-ollama-very-secret-0123456789"


def clean_env() -> dict[str, str]:
    """The process environment without any Parley or Ollama setting."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("PARLEY_", "OLLAMA_")) and k != "REDIS_SERVER"
    }


@pytest.fixture(autouse=True)
def no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(("PARLEY_", "OLLAMA_")):
            monkeypatch.delenv(name)


def settings() -> Settings:
    return Settings(_env_file=None)  # type: ignore[call-arg]


# --- OLLAMA_HOST ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ollama_host", "url"),
    [
        ("1.2.3.4", "http://1.2.3.4:11434"),
        ("localhost", "http://localhost:11434"),
        (":56789", "http://127.0.0.1:56789"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("0.0.0.0:8000", "http://127.0.0.1:8000"),
        ("http://h", "http://h:80"),
        ("https://h", "https://h:443"),
        ("https://h:8443", "https://h:8443"),
        ("example.com:56789/path/", "http://example.com:56789/path"),
        ("http://example.com/ollama", "http://example.com:80/ollama"),
        ("[::1]", "http://[::1]:11434"),
        ("[::1]:9000", "http://[::1]:9000"),
        ("http://[::]:11434", "http://[::1]:11434"),
    ],
)
def test_ollama_host_becomes_the_local_backend_url(
    monkeypatch: pytest.MonkeyPatch, ollama_host: str, url: str
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", ollama_host)
    configs = settings().backend_configs()
    assert [(c.name, c.kind, c.url, c.cloud) for c in configs] == [("local", "ollama", url, False)]


def test_without_ollama_host_the_local_backend_is_loopback_11434() -> None:
    configs = settings().backend_configs()
    assert [(c.name, c.url) for c in configs] == [("local", "http://127.0.0.1:11434")]
    assert configs[0].api_key is None


# --- OLLAMA_API_KEY -------------------------------------------------------------------------


def test_ollama_api_key_adds_a_cloud_backend_after_the_local_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    local, cloud = settings().backend_configs()
    assert (local.name, local.api_key) == ("local", None)
    assert (cloud.name, cloud.kind, cloud.url, cloud.cloud) == ("cloud", "ollama", CLOUD_URL, True)
    assert CLOUD_URL == "https://ollama.com"
    assert isinstance(cloud.api_key, SecretStr)
    assert cloud.api_key.get_secret_value() == KEY


def test_the_api_key_never_shows_in_repr_or_str_of_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    monkeypatch.setenv(
        "PARLEY_BACKENDS",
        json.dumps([{"name": "gpu", "kind": "openai", "url": "http://gpu:8000", "api_key": KEY}]),
    )
    loaded = settings()
    shown = [
        repr(loaded),
        str(loaded),
        repr(loaded.backend_configs()),
        str(loaded.backend_configs()),
        loaded.model_dump_json(),
    ]
    assert all(KEY not in text for text in shown)
    assert "**********" in repr(loaded)


# --- PARLEY_BACKENDS ------------------------------------------------------------------------


def test_parley_backends_gives_full_control_of_the_backend_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "gpu-box:1234")  # ignored once backends are listed
    monkeypatch.setenv(
        "PARLEY_BACKENDS",
        json.dumps(
            [
                {"name": "vllm", "kind": "openai", "url": "http://10.0.0.5:8000/v1/"},
                {"name": "home", "kind": "ollama", "url": "http://home:11434", "api_key": "k1"},
                {"name": "sky", "kind": "ollama", "url": "https://ollama.com", "cloud": True},
            ]
        ),
    )
    configs = settings().backend_configs()
    assert [(c.name, c.kind, c.url, c.cloud) for c in configs] == [
        ("vllm", "openai", "http://10.0.0.5:8000/v1", False),
        ("home", "ollama", "http://home:11434", False),
        ("sky", "ollama", "https://ollama.com", True),
    ]
    assert configs[1].api_key is not None
    assert configs[1].api_key.get_secret_value() == "k1"
    assert configs[0].api_key is None


def test_parley_backends_plus_api_key_appends_cloud_only_when_none_is_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    monkeypatch.setenv(
        "PARLEY_BACKENDS", json.dumps([{"name": "a", "kind": "ollama", "url": "http://a:1"}])
    )
    assert [c.name for c in settings().backend_configs()] == ["a", "cloud"]
    monkeypatch.setenv(
        "PARLEY_BACKENDS",
        json.dumps([{"name": "c", "kind": "ollama", "url": "https://ollama.com", "cloud": True}]),
    )
    assert [c.name for c in settings().backend_configs()] == ["c"]


def test_backend_config_rejects_a_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match="not an http"):
        BackendConfig(name="x", kind="ollama", url="localhost:11434")


# --- bad settings stop start-up with one line -------------------------------------------------

# env, the setting the line must name
BAD_SETTINGS: dict[str, tuple[dict[str, str], str]] = {
    "rate_not_a_rate": ({"PARLEY_RATE_LIMIT": "fast"}, "PARLEY_RATE_LIMIT"),
    "backend_missing_fields": ({"PARLEY_BACKENDS": '[{"name":"x"}]'}, "PARLEY_BACKENDS"),
    "backends_not_json": ({"PARLEY_BACKENDS": "not json"}, "PARLEY_BACKENDS"),
    "negative_edit_interval": ({"PARLEY_EDIT_INTERVAL": "-1"}, "PARLEY_EDIT_INTERVAL"),
}
MORE_BAD_SETTINGS: dict[str, tuple[dict[str, str], str]] = {
    "backend_url_not_http": (
        {"PARLEY_BACKENDS": '[{"name":"x","kind":"ollama","url":"nope"}]'},
        "PARLEY_BACKENDS",
    ),
    "duplicate_backend_names": (
        {
            "PARLEY_BACKENDS": json.dumps(
                [
                    {"name": "a", "kind": "ollama", "url": "http://x:1"},
                    {"name": "a", "kind": "ollama", "url": "http://y:1"},
                ]
            )
        },
        "PARLEY_BACKENDS",
    ),
    "ollama_host_bad_scheme": ({"OLLAMA_HOST": "ftp://h"}, "OLLAMA_HOST"),
    "app_token_not_xapp": ({"PARLEY_SLACK_APP_TOKEN": "xoxb-1"}, "PARLEY_SLACK_APP_TOKEN"),
    "shard_id_negative": (
        {"PARLEY_DISCORD_SHARD_IDS": "-1", "PARLEY_DISCORD_SHARD_COUNT": "2"},
        "PARLEY_DISCORD_SHARD_IDS",
    ),
    "shard_id_past_the_count": (
        {"PARLEY_DISCORD_SHARD_IDS": "0,2", "PARLEY_DISCORD_SHARD_COUNT": "2"},
        "PARLEY_DISCORD_SHARD_IDS",
    ),
    "shard_ids_without_a_count": ({"PARLEY_DISCORD_SHARD_IDS": "0"}, "PARLEY_DISCORD_SHARD_IDS"),
}


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """`parley check` once per bad setting, all started at once (each start costs ~1 s)."""
    cwd = tmp_path_factory.mktemp("no-dotenv")  # no .env file to read
    procs = {
        case: subprocess.Popen(
            [PARLEY, "check"],
            env={**clean_env(), **extra},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (extra, _) in BAD_SETTINGS.items()
    }
    runs = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        runs[case] = (proc.returncode, out, err)
    return runs


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_parley_check_with_a_bad_setting_exits_2_with_one_line_naming_it(
    check_runs: dict[str, tuple[int, str, str]], case: str
) -> None:
    returncode, out, err = check_runs[case]
    _, setting = BAD_SETTINGS[case]
    lines = err.strip().splitlines()
    assert returncode == 2, err
    assert out == ""
    assert len(lines) == 1, err
    assert lines[0].startswith("parley: invalid setting ")
    assert setting in lines[0]


@pytest.mark.parametrize("case", [*BAD_SETTINGS, *MORE_BAD_SETTINGS])
def test_load_settings_with_a_bad_setting_exits_2_with_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    from bot.settings import load_settings

    env, setting = {**BAD_SETTINGS, **MORE_BAD_SETTINGS}[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        load_settings(_env_file=None)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("parley: invalid setting ")
    assert setting in lines[0]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://:hunter2@:7000", "needs host:port"),
        ("redis+cluster://:hunter2@h:7000,h2:x", "needs host:port"),
        ("redis+cluster://:hunter2@h:7000/3", "only database 0"),
        ("redis+sentinel://:hunter2@,s:26379/parley", "needs host:port"),
        ("memcached://:hunter2@h:11211", "is not redis://"),
    ],
)
def test_a_bad_redis_url_is_refused_clearly_without_echoing_the_password(
    url: str, says: str
) -> None:
    from pydantic import ValidationError

    from bot.settings import Settings, describe_validation_error

    try:
        Settings(_env_file=None, redis_url=url)  # type: ignore[call-arg]
    except ValidationError as e:
        line = describe_validation_error(e)
    else:
        raise AssertionError(f"{url} was accepted")
    assert line.startswith("invalid setting PARLEY_REDIS_URL: ")
    assert says in line
    assert "hunter2" not in line


def test_cluster_and_sentinel_urls_are_accepted() -> None:
    from bot.settings import Settings

    for url in (
        "redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7000",
        "rediss+cluster://user:pw@redis.internal:6380",
        "redis+sentinel://s1:26379,s2:26379/parley/2",
    ):
        settings = Settings(_env_file=None, redis_url=url)  # type: ignore[call-arg]
        assert settings.redis_url is not None


def test_an_empty_variable_is_unset_not_an_empty_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """`OLLAMA_API_KEY=` (a copied .env.example) must not add a cloud backend with no key."""
    monkeypatch.setenv("OLLAMA_API_KEY", "")
    monkeypatch.setenv("PARLEY_DEFAULT_MODEL", "")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.ollama_api_key is None and settings.default_model is None
    assert [c.name for c in settings.backend_configs()] == ["local"]
