"""The Kubernetes manifests under compose/kubernetes/, checked offline: every built-in
resource against the Kubernetes API's own schemas (kubernetes-validate, strict: an
unknown field fails), KEDA's ScaledObjects field by field, and the promises the
deployment makes (readiness on /readyz, a worker Deployment per queue, one beat, grace
longer than the soft shutdown, requests everywhere, secrets only by reference)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shared.broker import QUEUES, celery_app

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "compose" / "kubernetes"
#: The Kubernetes release the manifests are validated against.
K8S_VERSION = "1.30.0"


def _kustomization(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def _resources(path: Path) -> list[dict[str, Any]]:
    """The documents a kustomization lists, bases followed (what `kustomize build` reads)."""
    out: list[dict[str, Any]] = []
    for entry in _kustomization(path)["resources"]:
        target = (path / entry).resolve()
        if target.is_dir():
            out += _resources(target)
        else:
            out += [d for d in yaml.safe_load_all(target.read_text()) if d]
    return out


BASE = _resources(KUBE / "base")
ALL = _resources(KUBE / "autoscaling")


def _named(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in ALL if d["kind"] == kind}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def test_every_file_is_listed_and_every_listed_file_exists() -> None:
    for directory in (KUBE / "base", KUBE / "autoscaling"):
        listed = {e for e in _kustomization(directory)["resources"] if not e.startswith("..")}
        present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, directory


@pytest.mark.parametrize(
    "doc", [d for d in ALL if d["apiVersion"] != "keda.sh/v1alpha1"], ids=lambda d: d["kind"]
)
def test_built_in_resources_match_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    """The check above can fail: a misspelt field and a wrong type are rejected."""
    api = _named("Deployment")["inferq-api"]
    broken = yaml.safe_load(yaml.safe_dump(api))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(api))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_api_is_ready_only_on_readyz_and_has_a_service() -> None:
    api = _named("Deployment")["inferq-api"]
    [container] = _containers(api)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = _named("Service")["inferq-api"]
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]


def test_one_worker_deployment_per_queue_with_grace_longer_than_the_soft_shutdown() -> None:
    deployments = _named("Deployment")
    soft = float(celery_app.conf.worker_soft_shutdown_timeout)
    for queue in QUEUES:
        worker = deployments[f"inferq-worker-{queue}"]
        [container] = _containers(worker)
        command = container["command"]
        assert command[:2] == ["inferq", "worker"]
        assert command[command.index("-Q") + 1] == queue
        grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > soft + 60, (queue, grace)  # the shutdown, then the drain, then more
    workers = {n for n in deployments if n.startswith("inferq-worker-")}
    assert workers == {f"inferq-worker-{q}" for q in QUEUES}


def test_exactly_one_beat_and_it_is_never_doubled_by_a_rollout() -> None:
    beats = [
        d
        for d in _named("Deployment").values()
        if any(c["command"][:2] == ["inferq", "beat"] for c in _containers(d))
    ]
    assert len(beats) == 1
    assert beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"]["type"] == "Recreate"


def test_a_migration_job_and_disruption_budgets_for_the_workers() -> None:
    [job] = _named("Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["inferq", "migrate"]
    budgets = _named("PodDisruptionBudget")
    for queue in QUEUES:
        selector = budgets[f"inferq-worker-{queue}"]["spec"]["selector"]["matchLabels"]
        labels = _named("Deployment")[f"inferq-worker-{queue}"]["spec"]["template"]["metadata"]
        assert selector.items() <= labels["labels"].items()


def test_every_container_requests_resources_and_reads_secrets_only_by_reference() -> None:
    assert not [d for d in ALL if d["kind"] == "Secret"], "no Secret belongs in the repository"
    config = _named("ConfigMap")["inferq-config"]["data"]
    assert not {k for k in config if re.search("PASSWORD|SECRET|API_KEY|DATABASE_URL", k)}
    for doc in ALL:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in _containers(doc):
            requests = container["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests), doc["metadata"]["name"]
            sources = container["envFrom"]
            assert {"configMapRef": {"name": "inferq-config"}} in sources
            assert {"secretRef": {"name": "inferq-secrets"}} in sources


def test_keda_scales_predict_on_its_backlog_and_score_on_its_queue_down_to_one() -> None:
    scaled = {d["metadata"]["name"]: d for d in ALL if d["kind"] == "ScaledObject"}
    assert not [d for d in BASE if d["kind"] == "ScaledObject"]  # the base needs no KEDA
    deployments = _named("Deployment")
    metrics = (ROOT / "shared" / "metrics.py").read_text()
    wanted = {"inferq-worker-predict": "inferq_pending_jobs", "inferq-worker-score": "score"}
    assert set(scaled) == set(wanted)
    for name, doc in scaled.items():
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        spec = doc["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "triggers",
        }
        assert spec["scaleTargetRef"]["name"] in deployments
        assert spec["minReplicaCount"] == 1 < spec["maxReplicaCount"]
        [trigger] = spec["triggers"]
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert set(meta) == {"serverAddress", "query", "threshold"}
        assert all(isinstance(v, str) for v in meta.values())  # KEDA's metadata is strings
        assert float(meta["threshold"]) > 0
        assert meta["serverAddress"].startswith("http")
        assert wanted[name] in meta["query"]
        for metric in re.findall(r"inferq_[a-z_]+", meta["query"]):
            assert f'"{metric}"' in metrics, metric  # a metric the API exports


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian: apt-get install prometheus)",
)
def test_the_autoscalers_queries_are_valid_promql(tmp_path: Path) -> None:
    queries = [
        d["spec"]["triggers"][0]["metadata"]["query"] for d in ALL if d["kind"] == "ScaledObject"
    ]
    rules = {
        "groups": [
            {
                "name": "keda",
                "rules": [{"record": f"keda:query{i}", "expr": q} for i, q in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "keda.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    path.write_text(path.read_text().replace("max(", "max((", 1))  # unbalanced: must fail
    bad = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True)
    assert bad.returncode != 0
