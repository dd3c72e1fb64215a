"""Prometheus metrics that span processes and machines.

Workers add their counts to one Redis hash (a few HINCRBYs in the pipeline that already
writes the job's hot copy); the API's ``/metrics`` turns the hash, queue lengths and its own
request histogram into Prometheus text. No per-process exporter, no multiprocess files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from shared.config import get_settings
from shared.jobs.fields import JobStatus, JobType

log = logging.getLogger(__name__)

__all__ = [
    "record_ended",
    "count",
    "StatsCollector",
    "RUNTIME_BUCKETS",
    "SCORE_BUCKETS",
    "drift_key",
    "drift_metrics",
]

RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SEP = _SEP = "|"
JOB_LABELS = ["type", "status", "model"]


def _stats_key() -> str:
    return get_settings().key("stats")


def drift_key() -> str:
    """The hash of the latest drift figures (``shared.monitoring.reports.publish``)."""
    return get_settings().key("drift")


def count(pipe: Any, name: str, *labels: object, by: float = 1) -> None:
    """Add ``by`` to the counter ``name{labels}`` (in a Redis pipeline)."""
    pipe.hincrbyfloat(_stats_key(), _SEP.join([name, *map(str, labels)]), by)


def _bucket(value: float, bounds: Iterable[float]) -> str:
    for b in bounds:
        if value <= b:
            return str(b)
    return "+Inf"


def record_ended(pipe: Any, jobs: Iterable[Any]) -> None:
    """Counts for jobs that just reached a terminal state: summed here first, so a batch
    of jobs costs one HINCRBYFLOAT per distinct series, not several per job."""
    totals: dict[str, float] = defaultdict(float)

    def add(*parts: object, by: float = 1) -> None:
        totals[_SEP.join(map(str, parts))] += by

    for job in jobs:
        add("jobs", job.type, job.status, job.model)
        if job.started_at and job.finished_at:
            secs = (job.finished_at - job.started_at).total_seconds()
            add("runtime_bucket", job.type, job.model, _bucket(secs, RUNTIME_BUCKETS))
            add("runtime_sum", job.type, job.model, by=secs)
        if job.status != JobStatus.SUCCEEDED:
            continue
        result = job.result or {}
        if job.type == JobType.SCORE and result.get("rows_scored"):
            add("predictions", job.model, job.model_version, "score", by=result["rows_scored"])
        preds = result.get("predictions") if job.type == JobType.PREDICT else None
        if preds:
            add("predictions", job.model, job.model_version, "online", by=len(preds))
            for p in preds:
                if p.get("label") is not None and 0.0 <= p["score"] <= 1.0:
                    add("score_bucket", job.model, _bucket(p["score"], SCORE_BUCKETS))
                    add("score_sum", job.model, by=p["score"])
    key = _stats_key()
    for field, value in totals.items():
        pipe.hincrbyfloat(key, field, value)


Labels = tuple[str, ...]


def _cumulative(
    name: str,
    doc: str,
    labels: list[str],
    buckets: dict[Labels, dict[str, float]],
    sums: dict[Labels, float],
    bounds: tuple[float, ...],
) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=labels)
    for values, counts in sorted(buckets.items()):
        running, out = 0.0, []
        for b in [*map(str, bounds), "+Inf"]:
            running += counts.get(b, 0.0)
            out.append((b, running))
        h.add_metric(list(values), out, sums.get(values, 0.0))
    return h


class StatsCollector(Collector):
    """Reads the shared stats hash and queue lengths at scrape time."""

    def __init__(
        self,
        redis: Redis,
        queues: Iterable[str],
        priority_steps: Iterable[int],
        pending: dict[str, str] | None = None,
    ) -> None:
        self._redis = redis
        self._queues = list(queues)
        self._steps = list(priority_steps)
        self._pending = dict(pending or {})  # priority -> list of pending predict job ids

    def _queue_keys(self, queue: str) -> list[str]:
        # kombu's Redis transport keeps one list per priority step: "q", "q:5", "q:9".
        prefix = f"{get_settings().redis_prefix}:celery:"
        return [prefix + (f"{queue}:{p}" if p else queue) for p in self._steps]

    def describe(self) -> list[Metric]:
        # Registration must not touch Redis: the API starts (and answers 503) without it.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except RedisError as exc:
            up = GaugeMetricFamily("inferq_stats_up", "Whether the shared stats could be read.")
            up.add_metric([], 0.0)
            yield up
            log.warning("metrics: Redis unavailable (%s)", exc)

    def _collect(self) -> Iterator[Metric]:
        stats = self._redis.hgetall(_stats_key())
        raw = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in stats.items()}
        jobs = CounterMetricFamily(
            "inferq_jobs", "Jobs ended, by type, status and model.", labels=JOB_LABELS
        )
        preds = CounterMetricFamily(
            "inferq_predictions",
            "Rows predicted, by model version and source (online: predict jobs; score: "
            "score runs, counted when the run ends).",
            labels=["model", "version", "source"],
        )
        cache = CounterMetricFamily(
            "inferq_cache_requests",
            "Cache lookups, by cache and outcome.",
            labels=["cache", "outcome"],
        )
        rt_buckets: dict[Labels, dict[str, float]] = defaultdict(dict)
        rt_sums: dict[Labels, float] = {}
        score_buckets: dict[Labels, dict[str, float]] = defaultdict(dict)
        score_sums: dict[Labels, float] = {}
        for field, value in raw.items():
            name, *labels = field.split(_SEP)
            # Fields of an older layout (fewer labels) are left out, not misread.
            if name == "jobs" and len(labels) == 3:
                jobs.add_metric(labels, value)
            elif name == "predictions" and len(labels) == 3:
                preds.add_metric(labels, value)
            elif name == "cache":
                cache.add_metric(labels, value)
            elif name == "runtime_bucket" and len(labels) == 3:
                rt_buckets[tuple(labels[:2])][labels[2]] = value
            elif name == "runtime_sum" and len(labels) == 2:
                rt_sums[tuple(labels)] = value
            elif name == "score_bucket":
                score_buckets[(labels[0],)][labels[1]] = value
            elif name == "score_sum":
                score_sums[(labels[0],)] = value
        yield jobs
        yield preds
        yield cache
        yield _cumulative(
            "inferq_job_run_seconds",
            "Job run time, start to end, by type and model.",
            ["type", "model"],
            rt_buckets,
            rt_sums,
            RUNTIME_BUCKETS,
        )
        yield _cumulative(
            "inferq_prediction_score",
            "Classifier scores served online, by model.",
            ["model"],
            score_buckets,
            score_sums,
            SCORE_BUCKETS,
        )
        depth = GaugeMetricFamily(
            "inferq_queue_depth", "Messages waiting, by queue.", labels=["queue"]
        )
        pending = GaugeMetricFamily(
            "inferq_pending_jobs",
            "Predict jobs committed and waiting for a draining worker, by priority.",
            labels=["priority"],
        )
        pipe = self._redis.pipeline(transaction=False)
        for q in self._queues:
            for key in self._queue_keys(q):
                pipe.llen(key)
        for key in self._pending.values():
            pipe.llen(key)
        lengths = iter(pipe.execute())
        for q in self._queues:
            depth.add_metric([q], sum(next(lengths) for _ in self._steps))
        for priority in self._pending:
            pending.add_metric([priority], next(lengths))
        yield depth
        yield pending
        yield from self._backlog_age()
        yield from self._workers()
        yield from drift_metrics(self._redis)

    def _backlog_age(self) -> Iterator[Metric]:
        """The age of the oldest pending predict job of each priority: the head of its
        pending list, dated by its hot copy."""
        age = GaugeMetricFamily(
            "inferq_pending_oldest_seconds",
            "Seconds since the oldest pending predict job was created, by priority (0: none).",
            labels=["priority"],
        )
        pipe = self._redis.pipeline(transaction=False)
        for key in self._pending.values():
            pipe.lindex(key, 0)
        heads = {
            priority: head.decode() if isinstance(head, bytes) else head
            for priority, head in zip(self._pending, pipe.execute(), strict=True)
            if head
        }
        s = get_settings()
        docs = self._redis.mget([s.key("job", h) for h in heads.values()]) if heads else []
        created = {}
        for priority, doc in zip(heads, docs, strict=True):
            if doc is None:  # its hot copy expired: the job's age is unknown
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                created[priority] = datetime.fromisoformat(json.loads(doc)["view"]["created_at"])
        now = time.time()
        for priority in self._pending:
            at = created.get(priority)
            age.add_metric([priority], max(0.0, now - at.timestamp()) if at else 0.0)
        yield age

    def _workers(self) -> Iterator[Metric]:
        """Worker processes whose heartbeat is current, by state (``loading``, ``ready``)."""
        names = list(self._redis.scan_iter(get_settings().key("worker", "*"), count=1000))
        states: dict[str, int] = {"loading": 0, "ready": 0}
        for value in self._redis.mget(names) if names else []:
            state = value.decode() if isinstance(value, bytes) else str(value)
            states[state] = states.get(state, 0) + 1
        gauge = GaugeMetricFamily(
            "inferq_worker_processes",
            "Worker processes with a current heartbeat, by state.",
            labels=["state"],
        )
        for state, n in states.items():
            gauge.add_metric([state], n)
        yield gauge


def drift_metrics(redis: Redis) -> Iterator[Metric]:
    """``inferq_feature_drift``, ``inferq_prediction_drift``, ``inferq_drift_rows``."""
    feature = GaugeMetricFamily(
        "inferq_feature_drift",
        "Latest drift of a feature against the version's reference: psi, ks or chi2.",
        labels=["model", "version", "feature", "statistic"],
    )
    prediction = GaugeMetricFamily(
        "inferq_prediction_drift",
        "Latest drift of the score distribution against the version's reference: psi, ks.",
        labels=["model", "version", "statistic"],
    )
    rows = GaugeMetricFamily(
        "inferq_drift_rows", "Rows in the latest drift window.", labels=["model", "version"]
    )
    for k, v in redis.hgetall(drift_key()).items():
        parts: Sequence[str] = (k.decode() if isinstance(k, bytes) else k).split(_SEP)
        value = float(v)
        if len(parts) == 3 and parts[2] == "rows":
            rows.add_metric(list(parts[:2]), value)
        elif len(parts) == 5 and parts[2] == "feature":
            feature.add_metric([parts[0], parts[1], parts[3], parts[4]], value)
        elif len(parts) == 4 and parts[2] == "prediction":
            prediction.add_metric([parts[0], parts[1], parts[3]], value)
    yield feature
    yield prediction
    yield rows
