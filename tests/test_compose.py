"""The compose deployment's file, checked offline (compose/smoke.sh runs it for real on
a Docker engine): every image a setting whose default is the official one, services
listening where other containers reach them, secrets only from the environment."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
FILE = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = FILE["services"]
POOLS = ("worker", "jobs-worker")


@pytest.mark.parametrize(
    ("service", "variable", "default"),
    [
        ("postgres", "INFERQ_POSTGRES_IMAGE", "postgres:16-alpine"),
        ("redis", "INFERQ_REDIS_IMAGE", "redis:7-alpine"),
        ("cache", "INFERQ_REDIS_IMAGE", "redis:7-alpine"),
        ("prometheus", "INFERQ_PROMETHEUS_IMAGE", "prom/prometheus:v2.53.0"),
        ("grafana", "INFERQ_GRAFANA_IMAGE", "grafana/grafana:11.1.0"),
    ],
)
def test_every_image_is_a_setting_defaulting_to_the_official_one(
    service: str, variable: str, default: str
) -> None:
    assert SERVICES[service]["image"] == f"${{{variable}:-{default}}}"


def test_the_inferq_image_builds_on_a_base_that_is_a_setting() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    args = SERVICES["api"]["build"]["args"]
    assert args == {"BASE_IMAGE": "${INFERQ_BASE_IMAGE:-python:3.11-slim}"}
    # Each offline stand-in starts from the imported Debian root file system.
    for path in sorted((COMPOSE / "offline").glob("*/Dockerfile")):
        assert "FROM ${ROOT}" in path.read_text(), path


@pytest.mark.parametrize("service", ["api", "flower"])
def test_published_services_listen_beyond_their_container(service: str) -> None:
    """A server bound to 127.0.0.1 inside its container answers no published port or
    Service (Flower did, until the smoke run found its connections reset)."""
    docs = yaml.safe_load_all((COMPOSE / "kubernetes" / "base" / f"{service}.yaml").read_text())
    kube = next(d for d in docs if d and d["kind"] == "Deployment")
    pod = kube["spec"]["template"]["spec"]["containers"][0]
    for command in (SERVICES[service]["command"], pod["command"]):
        assert command[command.index("--host") + 1] == "0.0.0.0", command


def test_secrets_come_from_the_environment_and_are_required() -> None:
    text = (COMPOSE / "docker-compose.yml").read_text()
    for name in ("POSTGRES_PASSWORD", "INFERQ_FLOWER_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert f"${{{name}:?" in text, name
    env = FILE["x-inferq"]["environment"]
    assert "${POSTGRES_PASSWORD:?" in env["INFERQ_DATABASE_URL"]


def test_exactly_one_beat_and_worker_pools_that_drain() -> None:
    assert "deploy" not in SERVICES["beat"] and "scale" not in SERVICES["beat"]
    for pool in POOLS:
        assert SERVICES[pool]["stop_grace_period"] == "120s"
        assert "-Q" in SERVICES[pool]["command"]
    queues = {SERVICES[p]["command"][SERVICES[p]["command"].index("-Q") + 1] for p in POOLS}
    assert queues == {"predict", "score,ops"}


@pytest.mark.parametrize("script", ["smoke.sh", "offline/build.sh"])
def test_the_scripts_parse(script: str) -> None:
    out = subprocess.run(["bash", "-n", str(COMPOSE / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
