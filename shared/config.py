"""One settings object for the API, the workers, beat, the command line and migrations.

Every setting is an environment variable prefixed ``INFERQ_`` (also read from ``.env``).
Each default is safe for local use; the README lists them all.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "Settings",
    "get_settings",
    "STACK_FILE",
    "ConfigurationError",
    "database_url",
    "redis_url",
]

#: Written by ``inferq up`` under the data directory: the URLs of the embedded servers, so
#: that ``inferq keys create`` or ``inferq submit`` in another shell find the running stack.
STACK_FILE = "stack.json"


class ConfigurationError(ValueError):
    """A setting inferq cannot use; the message names it and says what to write."""


#: Every way providers spell a PostgreSQL URL, as the driver inferq ships with.
_PG_SCHEMES = {
    "postgres": "postgresql+psycopg2",
    "postgresql": "postgresql+psycopg2",
    "postgresql+psycopg2": "postgresql+psycopg2",
}
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def database_url(url: str) -> str:
    """``url`` for SQLAlchemy with psycopg2: ``postgres://`` and ``postgresql://`` (what
    providers print; SQLAlchemy 2.1 maps the latter to psycopg 3, not installed) become
    ``postgresql+psycopg2://``. Anything else is a ``ConfigurationError``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _PG_SCHEMES:
        raise ConfigurationError(
            f"INFERQ_DATABASE_URL must be a PostgreSQL URL such as "
            f"postgresql://user:password@host:5432/inferq (got scheme {scheme.lower()!r})"
            if sep
            else "INFERQ_DATABASE_URL must be a URL such as "
            "postgresql://user:password@host:5432/inferq"
        )
    return f"{_PG_SCHEMES[scheme.lower()]}://{rest}"


def redis_url(url: str, setting: str) -> str:
    """``url`` unchanged if it is a ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _REDIS_SCHEMES:
        raise ConfigurationError(
            f"{setting} must be a Redis URL such as redis://host:6379/0 "
            f"(rediss:// for TLS, unix:///path/redis.sock); got {url.split('@')[-1]!r}"
        )
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQ_", env_file=".env", extra="ignore")

    env: str = Field("development", description="development | production")
    data_dir: Path = Field(Path("var"), description="Embedded servers, artifacts, beat state.")

    # Servers. Empty means: the embedded servers of a running `inferq up`, else localhost.
    database_url: str = ""
    redis_url: str = ""
    broker_url: str = Field("", description="Celery broker; defaults to redis_url.")
    cache_redis_url: str = Field(
        "",
        description="Redis for the feature and prediction caches (may evict: allkeys-lru); "
        "defaults to redis_url.",
    )

    model_dir: Path | None = Field(None, description="Model artifacts; default data_dir/models.")

    db_prepare: bool = Field(
        True,
        description="Prepare hot statements once per connection; false behind a "
        "transaction-pooling PgBouncer.",
    )

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    public_url: str = Field("", description="Base URL used in links; default relative.")
    bootstrap_api_key: str = Field("", description="Ensures an admin key with this value exists.")
    max_rows: int = Field(10_000, description="Rows per predict job.")
    max_body_bytes: int = Field(8 * 1024 * 1024, description="Request body limit (413 past it).")
    max_artifact_bytes: int = Field(
        200 * 1024 * 1024, description="Body limit of an artifact upload (413 past it)."
    )
    rate_limit_per_s: float = Field(2000.0, description="Token refill per key per second; 0 = off.")
    rate_limit_burst: int = Field(4000, description="Token bucket size per key.")
    registry_cache_s: float = Field(2.0, description="API cache of production versions, seconds.")
    fast_path: bool = Field(
        True, description="Serve POST /v1/jobs and GET /v1/jobs/{id} without FastAPI routing."
    )

    # Redis data
    redis_prefix: str = "inferq"
    result_ttl_s: int = Field(24 * 3600, description="Hot job state and results in Redis.")
    feature_cache_ttl_s: int = Field(300, description="Feature rows read for entity_ids.")

    # Workers and reliability. soft < hard < visibility timeout, checked below.
    predict_soft_time_limit_s: int = 60
    predict_time_limit_s: int = 90
    long_soft_time_limit_s: int = 1800
    long_time_limit_s: int = 2100
    visibility_timeout_s: int = 3600
    max_attempts: int = Field(3, description="Deliveries of one job before it fails for good.")
    worker_concurrency: int = Field(2, description="Prefork processes per worker.")
    model_poll_s: float = Field(5.0, description="How often workers look for promotions.")
    worker_heartbeat_s: float = Field(
        5.0,
        description="How often each worker process renews its heartbeat key (TTL three "
        "periods): a process whose key lapsed is dead, and its predict jobs are retaken.",
    )
    batch_max_jobs: int = Field(
        512, description="Queued predict jobs one delivery takes into its batch, at most."
    )
    batch_max_rows: int = Field(20_000, description="Rows per model call, at most.")
    predict_idle_s: float = Field(
        0.5,
        description="A draining predict worker waits this long for more jobs, then stops "
        "(a job after a shorter pause is taken at once, with no Celery message).",
    )
    predict_drain_s: float = Field(
        1.0, description="A predict task drains this long at most, then hands over."
    )
    onnx: bool = Field(True, description="Run pipelines on onnxruntime where they convert exactly.")
    compiled_trees: bool = Field(
        True,
        description="Walk gradient-boosted trees in a loop compiled by numba where it gives "
        "scikit-learn's bits (1.7x its predict on a Xeon; about 100 MB more per worker process).",
    )
    prediction_cache_ttl_s: int = Field(
        3600, description="Content-addressed prediction cache in Redis; 0 turns it off."
    )

    score_chunk_rows: int = Field(
        100_000, description="Rows per scoring chunk: the unit of work, memory and retry."
    )

    # MLflow (the [mlflow] extra)
    mlflow_tracking_uri: str = Field(
        "", description="MLflow tracking server that models:/ and runs:/ URIs resolve against."
    )
    mlflow_poll_s: float = Field(
        30.0, description="How often beat checks followed MLflow aliases, seconds."
    )

    # Beat
    sweep_every_s: float = Field(5.0, description="Sweeper period.")
    requeue_after_s: float = Field(30.0, description="A queued job older than this is re-sent.")
    score_stall_s: float = Field(
        60.0,
        description="A running score run none of whose chunks ended for this long has its "
        "undone chunks sent again (their messages were lost).",
    )
    running_lease_s: float = Field(
        600.0, description="A running job with no heartbeat for this long is re-sent."
    )
    prediction_log_retention_days: int = Field(
        30, ge=1, description="Prediction logs older than this are deleted."
    )
    job_retention_days: int = Field(
        30, ge=1, description="Jobs that ended longer ago than this are deleted."
    )
    scoring_run_retention_days: int = Field(
        30,
        ge=1,
        description="Score runs (and their predictions) that ended longer ago than this are "
        "dropped; each model's latest succeeded run is kept.",
    )
    drift_every_s: float = Field(600.0, gt=0, description="ops.drift period (beat).")
    drift_window_s: float = Field(
        3600.0, gt=0, description="Online drift compares the prediction logs of this window."
    )
    drift_psi_threshold: float = Field(0.2, gt=0, description="PSI at which a feature drifts.")
    drift_p_value: float = Field(
        0.01, gt=0, lt=1, description="Test p-value below which a feature drifts (Bonferroni)."
    )
    drift_min_rows: int = Field(
        200, ge=1, description="A drift window with fewer rows flags nothing."
    )
    drift_max_rows: int = Field(
        50_000, ge=100, description="Rows a drift window reads at most (the newest, sampled)."
    )
    nightly_score_cron: str = Field("0 2 * * *", description="Nightly churn scoring, UTC.")
    nightly_tenant: str = Field("default", description="Tenant that owns scheduled runs.")
    nightly_catch_up: bool = Field(
        True, description="At beat start, record the last nightly run if its trigger was lost."
    )

    # Flower
    flower_user: str = "admin"
    flower_password: str = Field("", description="Required: Flower never runs without auth.")

    callback_secret: str = Field(
        "", description="HMAC key for X-Inferq-Signature on callbacks; empty = unsigned."
    )
    callback_allow_private: bool = Field(
        False, description="Allow callbacks to loopback/private addresses (development)."
    )

    log_level: str = "INFO"
    log_json: bool = True

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        stack = self.stack_urls()
        if not self.database_url:
            self.database_url = stack.get(
                "database_url", "postgresql+psycopg2://postgres@127.0.0.1:5432/inferq"
            )
        if not self.redis_url:
            self.redis_url = stack.get("redis_url", "redis://127.0.0.1:6379/0")
        self.database_url = database_url(self.database_url)
        for name in ("redis_url", "broker_url", "cache_redis_url"):
            if getattr(self, name):
                setattr(self, name, redis_url(getattr(self, name), f"INFERQ_{name.upper()}"))
        if not self.broker_url:
            self.broker_url = self.redis_url
        if not self.cache_redis_url:
            self.cache_redis_url = self.redis_url
        if self.model_dir is None:
            self.model_dir = self.data_dir / "models"
        if not (
            self.predict_soft_time_limit_s < self.predict_time_limit_s < self.visibility_timeout_s
            and self.long_soft_time_limit_s < self.long_time_limit_s < self.visibility_timeout_s
        ):
            raise ValueError(
                "time limits must satisfy soft < hard < INFERQ_VISIBILITY_TIMEOUT_S "
                "or a redelivered task could run while the first is still alive"
            )
        if not (0 < self.predict_idle_s <= 1.0 and self.predict_idle_s <= self.predict_drain_s):
            # The doorbell lives 2 s unless a pop renews it; a longer wait would let it lapse.
            raise ValueError(
                "INFERQ_PREDICT_IDLE_S must be above 0, at most 1 s and at most "
                "INFERQ_PREDICT_DRAIN_S"
            )
        if not self.predict_drain_s < self.predict_soft_time_limit_s:
            raise ValueError(
                "INFERQ_PREDICT_DRAIN_S must be below INFERQ_PREDICT_SOFT_TIME_LIMIT_S"
            )
        if self.env == "production" and self.flower_password in ("", "changeme", "admin"):
            # Placeholder credentials are refused outside development.
            raise ValueError("INFERQ_FLOWER_PASSWORD must be set to a real secret in production")
        if self.env == "production" and 0 < len(self.bootstrap_api_key) < 32:
            raise ValueError(
                "INFERQ_BOOTSTRAP_API_KEY must be at least 32 characters in production "
                "(inferq keys create makes keys of 43)"
            )
        return self

    def stack_urls(self) -> dict[str, str]:
        """URLs a running `inferq up` wrote for its embedded servers, if any."""
        path = self.data_dir / STACK_FILE
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def key(self, *parts: object) -> str:
        """A Redis key under this deployment's prefix."""
        return ":".join([self.redis_prefix, *map(str, parts)])


@lru_cache
def get_settings() -> Settings:
    return Settings()
