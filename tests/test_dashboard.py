"""The alert rules and the Grafana dashboard against a real Prometheus scraping the test
stack: the rules pass promtool, and every expression of the dashboard returns data.

Needs Debian's ``prometheus`` package (``apt-get install prometheus``, for ``prometheus``
and ``promtool``); skipped, saying so, where it is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from shared.devstack.embedded import free_port
from tests.conftest import ROW, Stack, submit, wait_done

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "compose" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "compose" / "grafana" / "inferq.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="Debian's prometheus package is not installed (apt-get install prometheus)",
)


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


@needs
def test_the_alert_rules_pass_promtool() -> None:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "5 rules found" in checked.stdout


@needs
def test_every_dashboard_expression_returns_data_from_a_real_prometheus(
    stack: Stack, owner: httpx.Client
) -> None:
    from workers.app import celery_app

    assert PROMETHEUS is not None
    # Work that feeds every panel: predict jobs (twice the same row: the prediction
    # cache), an entity_ids job (the feature cache), a drift report.
    for _ in range(2):
        assert wait_done(owner, submit(owner, inputs=[ROW]).json()["id"])["status"] == "succeeded"
    for _ in range(2):
        wait_done(owner, submit(owner, entity_ids=[1, 2, 3]).json()["id"])
    celery_app.send_task("ops.drift", queue="ops")

    target = urlsplit(stack.api_url).netloc
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="inferq-prom-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(ALERTS))}]\n"
            "scrape_configs:\n"
            "  - job_name: inferq\n"
            f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
        )
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            api = f"http://127.0.0.1:{port}/api/v1"
            missing: list[str] = []
            deadline = time.monotonic() + 60
            while True:
                # Keep jobs flowing so rates have something to show between scrapes.
                submit(owner, inputs=[ROW])
                missing = []
                for expr in expressions():
                    try:
                        answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=5)
                    except httpx.HTTPError:
                        answer = None
                    if answer is None or answer.status_code == 503:  # still starting up
                        missing.append(expr)
                        continue
                    r = answer.json()
                    assert r.get("status") == "success", (expr, r)
                    if not r["data"]["result"]:
                        missing.append(expr)
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert not missing, missing
            rules = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
            assert {r["name"] for g in rules for r in g["rules"]} >= {
                "InferqFeatureDrift",
                "InferqNoWorker",
            }
        finally:
            proc.terminate()
            proc.wait(15)
