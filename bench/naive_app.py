"""The naive design's API, for ``bench.load_bench``: FastAPI in front of ``.delay()``.

POST /jobs validates the row with a pydantic model and enqueues one Celery task; GET
/jobs/{id} reads the task's state from Celery's Redis result backend. No ledger, no
batching, no long-poll: clients poll.

    python -m uvicorn bench.naive_app:app --port 8001
"""

from __future__ import annotations

from typing import Any, Literal

from celery.result import AsyncResult
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from bench.naive_tasks import app as celery_app
from bench.naive_tasks import predict_row


class ChurnRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenure_months: int = Field(ge=1, le=120)
    monthly_spend: float = Field(ge=0, le=100_000)
    support_tickets: int = Field(ge=0, le=50)
    feature_usage_pct: float = Field(ge=0, le=1)
    last_login_days_ago: int = Field(ge=0, le=365)
    num_integrations: int = Field(ge=0, le=50)
    contract_type: Literal["monthly", "annual", "multi-year"]
    plan_tier: Literal["starter", "growth", "enterprise"]
    is_enterprise: int = Field(ge=0, le=1)


app = FastAPI(title="naive")


@app.post("/jobs", status_code=202)
def submit(row: ChurnRow) -> dict[str, str]:
    task = predict_row.delay(row.model_dump())
    return {"id": task.id}


@app.get("/jobs/{task_id}")
def read(task_id: str) -> dict[str, Any]:
    res = AsyncResult(task_id, app=celery_app)
    state = res.state
    return {
        "id": task_id,
        "state": state,
        "result": res.result if state == "SUCCESS" else None,
        "error": str(res.result) if state == "FAILURE" else None,
    }


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
