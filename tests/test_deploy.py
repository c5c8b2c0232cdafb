"""Deployment files agree with each other and with the server: they are never run here (no
container registry), so these checks are what keeps them honest."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from server.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install '.[test]')")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ROUTES = ("/incoming-call", "/connect-action", "/media-stream", "/calls", "/calls/*",
          "/healthz", "/readyz")
AIOHTTP_SHUTDOWN = 5  # server.main: runner shutdown_timeout after the drain


def seconds(value: str | int) -> int:
    match = re.fullmatch(r"(\d+)s?", str(value))
    assert match, value
    return int(match.group(1))


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default} with nothing set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def manifests() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[doc["kind"]] = doc
    return found


def test_compose_runs_two_bridges_behind_caddy_with_redis_and_postgres() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"bridge-1", "bridge-2", "caddy", "redis", "postgres"} <= set(services)
    one, two = services["bridge-1"], services["bridge-2"]
    assert one["environment"] == two["environment"]
    env = {k: interpolate(str(v)) for k, v in one["environment"].items()}
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert env["SHUTDOWN_MODE"] == "handover"
    drain = float(env["SHUTDOWN_DRAIN_SECONDS"])
    for bridge in (one, two):
        assert seconds(bridge["stop_grace_period"]) >= drain + AIOHTTP_SHUTDOWN
        assert {"redis", "postgres"} <= set(bridge["depends_on"])
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in services["caddy"]["volumes"]
    # the environment the bridges get is one the server accepts
    settings = Settings.from_env({"OPENAI_API_KEY": "sk-test", **env})
    assert settings.redis_url and settings.shutdown_mode == "handover"


def test_caddy_forwards_every_route_to_both_bridges() -> None:
    caddyfile = (DEPLOY / "Caddyfile").read_text()
    matcher = re.search(r"@bridge path (.+)", caddyfile)
    assert matcher, "no @bridge matcher"
    assert set(ROUTES) <= set(matcher.group(1).split())
    assert caddyfile.count("reverse_proxy bridge-1:5050 bridge-2:5050") == 2  # + /metrics
    assert "health_uri /readyz" in caddyfile
    assert re.search(r"@metrics \{\s*path /metrics\s*remote_ip private_ranges", caddyfile)


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy not installed")
def test_caddyfile_is_valid_for_caddy() -> None:
    result = subprocess.run(
        ["caddy", "adapt", "--config", str(DEPLOY / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=30, env={"SITE_ADDRESS": ":80"}, check=False)
    assert result.returncode == 0, result.stderr


def test_kubernetes_waits_for_the_drain_and_probes_the_right_endpoints() -> None:
    found = manifests()
    assert {"Deployment", "Service", "ConfigMap", "Secret", "Ingress",
            "PodDisruptionBudget"} <= set(found)
    pod = found["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == 5050
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    config = found["ConfigMap"]["data"]
    drain = float(config["SHUTDOWN_DRAIN_SECONDS"])
    assert config["SHUTDOWN_MODE"] in ("drain", "handover")
    assert pod["terminationGracePeriodSeconds"] >= int(command[1]) + drain + AIOHTTP_SHUTDOWN
    assert pod["securityContext"]["runAsNonRoot"] is True
    refs = {ref.get("configMapRef", ref.get("secretRef", {}))["name"]
            for ref in container["envFrom"]}
    assert refs == {found["ConfigMap"]["metadata"]["name"], found["Secret"]["metadata"]["name"]}
    env = {**config, **found["Secret"]["stringData"], "OPENAI_API_KEY": "sk-test"}
    assert Settings.from_env(env).redis_url  # a fleet: Redis configured


def test_dockerfile_is_slim_non_root_and_health_checked() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"pip install \.(\s|$)", dockerfile)
    assert re.search(r"^USER (?!root|0\b)\S+", dockerfile, re.M)
    assert re.search(r"^HEALTHCHECK .*/healthz", dockerfile, re.M | re.S)
    assert re.search(r"^EXPOSE 5050$", dockerfile, re.M)
    assert re.search(r"^COPY config ", dockerfile, re.M)
    assert re.search(r'^CMD \["python", "-m", "server"\]$', dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored and ".git" in ignored
    assert not {"server", "config", "README.md", "setup.cfg", "pyproject.toml"} & set(ignored)
