"""Deployment files agree with each other and with the server: they are never run here (no
container registry), so these checks are what keeps them honest."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from server.metrics import READY_PING_TIMEOUT
from server.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install '.[test]')")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# What the outside world may reach: Twilio's requests and the operators' routes (bearer
# ADMIN_TOKEN in the bridge). Sample paths, as a client would send them.
EXPOSED = ("/incoming-call", "/connect-action", "/media-stream", "/call-status", "/amd-status",
           "/calls", "/calls/CA0123", "/calls/CA0123/hangup", "/calls/CA0123/recording.wav",
           "/campaigns", "/campaigns/cmp_1/pause", "/do-not-call",
           "/console", "/console/app.js", "/events", "/stats", "/calls/CA0123/events",
           "/calls/CA0123/listen", "/calls/CA0123/talk", "/console/static/js/main.js",
           "/calls/CA0123/whisper", "/calls/CA0123/takeover", "/calls/CA0123/handback",
           "/calls/CA0123/transfer")
INTERNAL = ("/metrics", "/healthz", "/readyz", "/", "/metrics/", "/incoming-call/x",
            "/callsx", "/anything", "/statsx")
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


def caddy_matches(patterns: list[str], path: str) -> bool:
    """Caddy's `path` matcher: exact, or a prefix when the pattern ends in `*`."""
    return any(path.startswith(p[:-1]) if p.endswith("*") else path == p for p in patterns)


def ingress_matches(paths: list[dict[str, Any]], path: str) -> bool:
    """Kubernetes Ingress matching: Exact, or Prefix by whole path elements."""
    for rule in paths:
        want, kind = rule["path"], rule["pathType"]
        if kind == "Exact" and path == want:
            return True
        if kind == "Prefix" and (want == "/" or path == want.rstrip("/")
                                 or path.startswith(want.rstrip("/") + "/")):
            return True
    return False


def test_caddy_exposes_only_twilio_and_operator_routes() -> None:
    caddyfile = (DEPLOY / "Caddyfile").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in caddyfile.splitlines())
    matcher = re.search(r"@bridge path (.+)", code)
    assert matcher, "no @bridge matcher"
    patterns = matcher.group(1).split()
    for path in EXPOSED:
        assert caddy_matches(patterns, path), f"{path} not forwarded"
    for path in INTERNAL:
        assert not caddy_matches(patterns, path), f"{path} reachable from outside"
    # One proxy, behind that matcher; the rest is 404; nothing else mentions /metrics.
    assert code.count("reverse_proxy") == 1
    assert "handle @bridge {" in code and re.search(r"handle \{\s*respond 404", code)
    assert "/metrics" not in code
    assert "health_uri /readyz" in code
    health = re.search(r"health_timeout (\d+)s", code)
    assert health and int(health.group(1)) > READY_PING_TIMEOUT


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
    for probe in ("readinessProbe", "livenessProbe"):  # never cut /readyz's database ping
        assert container[probe]["timeoutSeconds"] > READY_PING_TIMEOUT, probe
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


def test_the_ingress_exposes_only_twilio_and_operator_routes() -> None:
    ingress = manifests()["Ingress"]
    (rule,) = ingress["spec"]["rules"]
    paths = rule["http"]["paths"]
    for path in EXPOSED:
        assert ingress_matches(paths, path), f"{path} not routed"
    for path in INTERNAL:
        assert not ingress_matches(paths, path), f"{path} reachable from outside"
    service = manifests()["Service"]["metadata"]["name"]
    assert {p["backend"]["service"]["name"] for p in paths} == {service}
    # Prometheus scrapes the pods themselves.
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_docs_and_manifests_say_readiness_does_not_depend_on_redis() -> None:
    deployment = (DEPLOY / "k8s" / "deployment.yaml").read_text()
    above_probe = " ".join(deployment.split("readinessProbe:", 1)[0].splitlines()[-3:])
    assert "does not depend on Redis" in above_probe
    assert "Redis is unreachable" not in deployment
    for doc in (ROOT / "README.md", DEPLOY / "README.md"):
        text = " ".join(doc.read_text().split())
        assert "Readiness does not depend on Redis" in text, doc
        assert "(or Redis)" not in text, doc
