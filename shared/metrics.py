"""Prometheus metrics that span processes and machines.

Workers add their counts to one Redis hash (a few HINCRBYs in the pipeline that already
writes the job's hot copy); the API's ``/metrics`` turns the hash, queue lengths and its own
request histogram into Prometheus text. No per-process exporter, no multiprocess files.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
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

log = logging.getLogger(__name__)

__all__ = ["record_ended", "count", "StatsCollector", "RUNTIME_BUCKETS", "SCORE_BUCKETS"]

RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_SEP = "|"


def _stats_key() -> str:
    return get_settings().key("stats")


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
        add("jobs", job.type, job.status)
        if job.started_at and job.finished_at:
            secs = (job.finished_at - job.started_at).total_seconds()
            add("runtime_bucket", job.type, _bucket(secs, RUNTIME_BUCKETS))
            add("runtime_sum", job.type, by=secs)
        preds = (job.result or {}).get("predictions") if job.status == "succeeded" else None
        if preds:
            add("predictions", job.model, job.model_version, by=len(preds))
            for p in preds:
                if p.get("label") is not None and 0.0 <= p["score"] <= 1.0:
                    add("score_bucket", job.model, _bucket(p["score"], SCORE_BUCKETS))
    key = _stats_key()
    for field, value in totals.items():
        pipe.hincrbyfloat(key, field, value)


def _cumulative(
    name: str,
    doc: str,
    label: str,
    buckets: dict[str, dict[str, float]],
    sums: dict[str, float],
    bounds: tuple[float, ...],
) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=[label])
    for value, counts in sorted(buckets.items()):
        running, out = 0.0, []
        for b in [*map(str, bounds), "+Inf"]:
            running += counts.get(b, 0.0)
            out.append((b, running))
        h.add_metric([value], out, sums.get(value, 0.0))
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
            "inferq_jobs", "Jobs ended, by type and status.", labels=["type", "status"]
        )
        preds = CounterMetricFamily(
            "inferq_predictions",
            "Online predictions, by model version.",
            labels=["model", "version"],
        )
        cache = CounterMetricFamily(
            "inferq_cache_requests",
            "Cache lookups, by cache and outcome.",
            labels=["cache", "outcome"],
        )
        rt_buckets: dict[str, dict[str, float]] = defaultdict(dict)
        rt_sums: dict[str, float] = {}
        score_buckets: dict[str, dict[str, float]] = defaultdict(dict)
        for field, value in raw.items():
            name, *labels = field.split(_SEP)
            if name == "jobs":
                jobs.add_metric(labels, value)
            elif name == "predictions":
                preds.add_metric(labels, value)
            elif name == "cache":
                cache.add_metric(labels, value)
            elif name == "runtime_bucket":
                rt_buckets[labels[0]][labels[1]] = value
            elif name == "runtime_sum":
                rt_sums[labels[0]] = value
            elif name == "score_bucket":
                score_buckets[labels[0]][labels[1]] = value
        yield jobs
        yield preds
        yield cache
        yield _cumulative(
            "inferq_job_run_seconds",
            "Job run time, start to end.",
            "type",
            rt_buckets,
            rt_sums,
            RUNTIME_BUCKETS,
        )
        yield _cumulative(
            "inferq_prediction_score",
            "Classifier scores served.",
            "model",
            score_buckets,
            {},
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
