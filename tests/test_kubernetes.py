"""deploy/kubernetes: every overlay renders with `kubectl kustomize`, validates against the
Kubernetes JSON schemas (kubernetes-validate, which ships them: no network), and says what
Parley needs — probes on the right paths and port, a grace period longer than Parley's own,
Discord shards from the pod index, secrets only from Secrets, a hardened non-root pod."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, get_args

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, SecretStr

from bot.http import READY_TIMEOUT
from bot.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl")

# The oldest Kubernetes the manifests are for (the pod-index label is 1.28's) and the newest
# schemas kubernetes-validate bundles.
SCHEMA_VERSIONS = ("1.28", kubernetes_validate.latest_version())

OVERLAYS = {
    "slack-http": {
        "ConfigMap": 1,
        "Deployment": 1,
        "Service": 1,
        "HorizontalPodAutoscaler": 1,
        "PodDisruptionBudget": 1,
    },
    "slack-socket": {
        "ConfigMap": 1,
        "Deployment": 1,
        "HorizontalPodAutoscaler": 1,
        "PodDisruptionBudget": 1,
    },
    "discord": {"ConfigMap": 1, "StatefulSet": 1, "Service": 1, "PodDisruptionBudget": 1},
    "try-out": {
        "ConfigMap": 1,
        "Deployment": 1,
        "StatefulSet": 1,
        "Service": 1,
        "Secret": 1,
        "NetworkPolicy": 1,
    },
}

# Which platform settings each workload must get, and which it must never see: an app token
# turns Slack HTTP mode into Socket Mode, a token of the other platform starts its adapter too.
PLATFORM_SECRETS = {
    "slack-http": {"PARLEY_SLACK_BOT_TOKEN", "PARLEY_SLACK_SIGNING_SECRET"},
    "slack-socket": {"PARLEY_SLACK_BOT_TOKEN", "PARLEY_SLACK_APP_TOKEN"},
    "discord": {"PARLEY_DISCORD_TOKEN"},
}
ALL_PLATFORM_SECRETS = set().union(*PLATFORM_SECRETS.values())

SLACK_SOCKET_CONNECTIONS = 10  # per app (shared/PLATFORMS.md)
# After PARLEY_SHUTDOWN_GRACE: up to 5 s for the replies then stopped to show it
# (Conversation.drain), up to 10 s for an adapter to close (its stop()).
SHUTDOWN_TAIL = 15


def _holds_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return any(_holds_secret(f.annotation) for f in annotation.model_fields.values())
    return any(_holds_secret(arg) for arg in get_args(annotation))


def _env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"PARLEY_{field.upper()}"


# Every setting that is or carries a SecretStr: PARLEY_REDIS_URL, the tokens, OLLAMA_API_KEY,
# PARLEY_BACKENDS (whose entries carry api_key).
SECRET_SETTINGS = {
    _env_name(name) for name, f in Settings.model_fields.items() if _holds_secret(f.annotation)
}


def render(overlay: str) -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the Kubernetes manifests were not rendered")
    result = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def of_kind(docs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] in kinds]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parley's Deployments and StatefulSets (not the try-out Redis)."""
    return [
        doc
        for doc in of_kind(docs, "Deployment", "StatefulSet")
        if doc["metadata"]["labels"]["app.kubernetes.io/name"] == "parley"
    ]


def parley_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["parley"]
    container: dict[str, Any] = containers[0]
    return container


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    (configmap,) = of_kind(docs, "ConfigMap")
    assert configmap["metadata"]["name"].startswith("parley-config")
    data: dict[str, str] = configmap["data"]
    return data


def component(workload: dict[str, Any]) -> str:
    name: str = workload["metadata"]["labels"]["app.kubernetes.io/component"]
    return name


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def every_workload(
    rendered: dict[str, list[dict[str, Any]]],
) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    found = [(docs, w) for docs in rendered.values() for w in workloads(docs)]
    assert {component(w) for _, w in found} == set(PLATFORM_SECRETS)
    return found


def test_the_overlays_are_the_ones_tested() -> None:
    on_disk = {p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml")}
    assert on_disk == set(OVERLAYS)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_each_overlay_renders_the_kinds_it_should(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    assert Counter(doc["kind"] for doc in rendered[overlay]) == OVERLAYS[overlay]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_each_overlay_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str
) -> None:
    for doc in rendered[overlay]:
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version})"
        try:
            # strict: an unknown (misspelt) field is an error, not silently dropped
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {e.message}")


def test_the_configmap_holds_valid_settings_and_no_secret(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for docs in rendered.values():
        data = config(docs)
        assert not set(data) & SECRET_SETTINGS
        assert "PARLEY_SHUTDOWN_GRACE" in data  # said explicitly, next to the grace periods
        clear_settings_env(monkeypatch)
        for name, value in data.items():
            monkeypatch.setenv(name, value)
        settings = Settings(_env_file=None)
        assert settings.http_port == int(data["PARLEY_HTTP_PORT"])


def clear_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("PARLEY_", "OLLAMA_")):
            monkeypatch.delenv(name)


def run_settings(
    docs: list[dict[str, Any]],
    workload: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    ordinal: int = 0,
) -> Settings:
    """The settings a pod of this workload starts with: the ConfigMap, then its env, with a
    stand-in for each required secret and the pod-index label for the ordinal."""
    clear_settings_env(monkeypatch)
    for name, value in config(docs).items():
        monkeypatch.setenv(name, value)
    stand_ins = {
        "PARLEY_REDIS_URL": "redis://redis:6379/0",
        "PARLEY_SLACK_APP_TOKEN": "xapp-stand-in",
    }
    for name, entry in env_of(parley_container(workload)).items():
        source = entry.get("valueFrom", {})
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        elif "secretKeyRef" in source and not source["secretKeyRef"].get("optional"):
            monkeypatch.setenv(name, stand_ins.get(name, "stand-in"))
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            assert path == "metadata.labels['apps.kubernetes.io/pod-index']", path
            monkeypatch.setenv(name, str(ordinal))
    return Settings(_env_file=None)


def test_each_workload_runs_its_own_mode(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for docs, workload in every_workload(rendered):
        settings = run_settings(docs, workload, monkeypatch)
        mode = component(workload)
        slack = settings.slack_bot_token is not None
        assert slack == mode.startswith("slack")
        assert (settings.slack_app_token is not None) == (mode == "slack-socket")
        assert (settings.slack_signing_secret is not None) == (mode == "slack-http")
        assert (settings.discord_token is not None) == (mode == "discord")
        assert settings.redis_url is not None  # never the embedded Redis


def test_secrets_come_only_from_secrets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert {"PARLEY_REDIS_URL", "PARLEY_BACKENDS", "OLLAMA_API_KEY"} <= SECRET_SETTINGS
    assert ALL_PLATFORM_SECRETS <= SECRET_SETTINGS
    for _, workload in every_workload(rendered):
        container = parley_container(workload)
        where = workload["metadata"]["name"]
        # envFrom a Secret would hand every workload every token in it
        assert all("secretRef" not in source for source in container.get("envFrom", [])), where
        env = env_of(container)
        for name, entry in env.items():
            if name in SECRET_SETTINGS:
                assert "value" not in entry, f"{where}: {name} in plain text"
                assert "secretKeyRef" in entry["valueFrom"], f"{where}: {name}"
            elif "value" in entry:
                assert not re.search(r"xox[abp]-|xapp-|://[^/\s]*:[^@/\s]*@", entry["value"])
        wanted = PLATFORM_SECRETS[component(workload)]
        assert ALL_PLATFORM_SECRETS & set(env) == wanted, where
        assert "PARLEY_REDIS_URL" in env, where
        for name in wanted | {"PARLEY_REDIS_URL"}:
            assert not env[name]["valueFrom"]["secretKeyRef"].get("optional"), (where, name)


def test_the_only_secret_rendered_is_the_try_out_redis_url(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay, docs in rendered.items():
        for secret in of_kind(docs, "Secret"):
            assert overlay == "try-out"
            assert secret["metadata"]["name"].startswith("parley-redis-")
            values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            # an in-cluster Redis without a password: nothing secret in the repository
            assert values == {"PARLEY_REDIS_URL": "redis://parley-redis:6379/0"}
    (try_out,) = workloads(rendered["try-out"])
    ref = env_of(parley_container(try_out))["PARLEY_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    (secret,) = of_kind(rendered["try-out"], "Secret")
    assert ref["name"] == secret["metadata"]["name"]
    (redis,) = of_kind(rendered["try-out"], "StatefulSet")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"


def test_the_example_secret_holds_placeholders_only() -> None:
    example = (DEPLOY / "secrets.env.example").read_text()
    names = set()
    for line in example.splitlines():
        match = re.match(r"^#?([A-Z_]+)=(.*)$", line)
        if match:
            names.add(match[1])
            assert "REPLACE_ME" in match[2], line
            assert not re.search(r"xox[abp]-|xapp-", match[2]), line
    assert names <= SECRET_SETTINGS
    assert ALL_PLATFORM_SECRETS | {"PARLEY_REDIS_URL"} <= names
    assert "deploy/kubernetes/**/secrets.env" in (ROOT / ".gitignore").read_text()


def test_probes_use_healthz_and_readyz_on_the_http_port(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for docs, workload in every_workload(rendered):
        container = parley_container(workload)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == int(config(docs)["PARLEY_HTTP_PORT"])
        probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
        assert probes["livenessProbe"]["path"] == "/healthz"
        assert probes["readinessProbe"]["path"] == "/readyz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        for probe in (*probes.values(), container["startupProbe"]["httpGet"]):
            assert probe["port"] == "http"
        # /readyz waits up to READY_TIMEOUT for Redis, then twice that for the catalog
        assert container["readinessProbe"]["timeoutSeconds"] > 3 * READY_TIMEOUT


def test_services_reach_the_pods_they_name(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        pods = [w["spec"]["template"] for w in of_kind(docs, "Deployment", "StatefulSet")]
        for service in of_kind(docs, "Service"):
            selector = service["spec"]["selector"]
            (pod,) = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
            names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
        for budget in of_kind(docs, "PodDisruptionBudget"):
            labels = budget["spec"]["selector"]["matchLabels"].items()
            assert sum(labels <= p["metadata"]["labels"].items() for p in pods) == 1


def prestop_sleep(container: dict[str, Any]) -> int:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    command = hook["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def test_the_grace_period_covers_parleys_shutdown(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for docs, workload in every_workload(rendered):
        grace = float(config(docs)["PARLEY_SHUTDOWN_GRACE"])
        pod = workload["spec"]["template"]["spec"]
        sleep = prestop_sleep(parley_container(workload))
        # the kubelet's countdown starts with the preStop hook, before SIGTERM
        assert pod["terminationGracePeriodSeconds"] >= sleep + grace + SHUTDOWN_TAIL
        # only Slack HTTP mode is behind a Service whose endpoints must catch up
        assert (sleep > 0) == (component(workload) == "slack-http")


def test_discord_shards_come_from_the_pod_index(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered["discord"]
    (shards,) = of_kind(docs, "StatefulSet")
    assert shards["spec"]["podManagementPolicy"] == "Parallel"
    env = env_of(parley_container(shards))
    assert env["PARLEY_DISCORD_SHARD_IDS"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    replicas = shards["spec"]["replicas"]
    assert env["PARLEY_DISCORD_SHARD_COUNT"]["value"] == str(replicas)
    for ordinal in range(replicas):  # one id is a valid PARLEY_DISCORD_SHARD_IDS
        settings = run_settings(docs, shards, monkeypatch, ordinal)
        assert settings.discord_shard_ids == [ordinal]
        assert settings.discord_shard_count == replicas
    with pytest.raises(ValueError, match="PARLEY_DISCORD_SHARD_IDS"):
        run_settings(docs, shards, monkeypatch, replicas)  # a pod past the count: refused
    # no autoscaler may change the shard count behind the settings' back
    for overlay_docs in rendered.values():
        for hpa in of_kind(overlay_docs, "HorizontalPodAutoscaler"):
            assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh on this machine")
def test_a_discord_pod_without_its_index_refuses_to_start(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """An empty PARLEY_DISCORD_SHARD_IDS means every shard to Parley: every pod would run them
    all. The container's command refuses that, and otherwise execs `parley run`."""
    (shards,) = of_kind(rendered["discord"], "StatefulSet")
    container = parley_container(shards)
    fake = tmp_path / "parley"
    fake.write_text('#!/bin/sh\necho "parley $* shard=$PARLEY_DISCORD_SHARD_IDS"\n')
    fake.chmod(0o755)
    for index, expected in (
        ("", None),
        ("x1", None),
        ("0", "parley run shard=0"),
        ("12", "parley run shard=12"),
    ):
        env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PARLEY_DISCORD_SHARD_IDS": index}
        result = subprocess.run(
            [*container["command"], *container["args"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if expected is None:
            assert result.returncode == 2 and "pod-index" in result.stderr, index
        else:
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == expected


def test_pods_are_hardened_and_run_as_the_images_user(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    user = re.search(r"useradd[^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert user is not None
    uid = int(user[1])
    for _, workload in every_workload(rendered):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["automountServiceAccountToken"] is False
        # Kubernetes would otherwise add <SERVICE>_PORT=tcp://… variables: a Service named
        # parley-http would set PARLEY_HTTP_PORT
        assert pod["enableServiceLinks"] is False
        container = parley_container(workload)
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        # the image comes from the overlay's `images:`, with a tag
        assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", container["image"]), container["image"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


def test_autoscalers_fit_the_platforms(rendered: dict[str, list[dict[str, Any]]]) -> None:
    scaled = set()
    for docs in rendered.values():
        deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
        for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
            target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
            (metric,) = hpa["spec"]["metrics"]
            assert metric["resource"]["name"] == "cpu"
            assert "cpu" in parley_container(target)["resources"]["requests"]
            mode = component(target)
            scaled.add(mode)
            if mode == "slack-socket":  # one connection per pod, a surging one included
                surge = target["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
                assert hpa["spec"]["maxReplicas"] + surge < SLACK_SOCKET_CONNECTIONS
    assert scaled == {"slack-http", "slack-socket"}
