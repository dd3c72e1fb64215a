"""``inferq submit``: a job sent through the API, its progress shown, its answer printed."""

from __future__ import annotations

import json
import sys
import time

import click

from shared.devstack.cli_common import JSON_OPTION, PROGRESS_POLL_S, _settings
from shared.jobs.fields import JobStatus


@click.command()
@click.argument("model")
@click.option("--input", "input_path", type=click.File("r"), help="JSON rows ('-' = stdin).")
@click.option("--entity-ids", default=None, help="Comma-separated ids instead of --input.")
@click.option("--score", "score", is_flag=True, help="Score the whole customer base.")
@click.option("--segment", default=None, help="With --score: JSON filters on columns.")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--url", default=None, help="API base URL (default http://API_HOST:API_PORT).")
@click.option("--api-key", envvar="INFERQ_API_KEY", required=True, help="Or INFERQ_API_KEY.")
@JSON_OPTION
def submit(
    model: str,
    input_path,
    entity_ids: str | None,
    score: bool,
    segment: str | None,
    wait: bool,
    url: str | None,
    api_key: str,
    as_json: bool,
) -> None:  # type: ignore[no-untyped-def]
    """Submit a predict (or --score) job and, by default, wait for it with a progress bar."""
    import httpx
    from tqdm import tqdm

    s = _settings()
    base = url or f"http://{s.api_host}:{s.api_port}"
    body: dict = {"type": "predict", "model": model}
    if score:
        body["type"] = "score"
        body["segment"] = json.loads(segment) if segment else {}
    elif entity_ids:
        body["entity_ids"] = [int(x) for x in entity_ids.split(",")]
    elif input_path is not None:
        body["inputs"] = json.load(input_path)
    else:
        raise click.UsageError("give --input ROWS.json, --entity-ids or --score")
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=40) as client:
        r = client.post("/v1/jobs", json=body)
        if r.status_code >= 400:
            raise click.ClickException(f"{r.status_code}: {r.text}")
        job = r.json()
        if not as_json:
            click.echo(f"job {job['id']} {job['status']}", err=True)
        bar = None
        while wait and job["status"] in (JobStatus.QUEUED, JobStatus.RUNNING):
            if job["type"] != "predict" and not as_json:
                time.sleep(PROGRESS_POLL_S)  # a bar to move: look again shortly
                job = client.get(f"/v1/jobs/{job['id']}").json()
            else:  # nothing to show meanwhile: wait for the end (up to a second a call)
                job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 1}).json()
            progress = job.get("progress")
            if progress and progress.get("total") and not as_json:
                if bar is None:  # counting from here, so the rate is the real one
                    bar = tqdm(
                        total=progress["total"],
                        initial=progress["done"],
                        unit="rows",
                        desc=job["type"],
                        file=sys.stderr,
                    )
                bar.update(progress["done"] - bar.n)
        if bar is not None:
            bar.close()
        click.echo(json.dumps(job, indent=2) if as_json else _job_text(job))
        if job["status"] == JobStatus.FAILED:
            sys.exit(1)


def _job_text(job: dict) -> str:
    """A job as a person reads it: one line, then its rows or its result's parts."""
    took = ""
    if job.get("started_at") and job.get("finished_at"):
        from datetime import datetime

        secs = (
            datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
        ).total_seconds()
        took = f" in {secs:.2f} s"
    version = f" v{job['model_version']}" if job.get("model_version") else ""
    lines = [f"job {job['id']} {job['status']}{took} ({job['type']}, {job['model']}{version})"]
    error, result = job.get("error"), job.get("result") or {}
    if error:
        lines.append(f"error {error.get('code')}: {error.get('message')}")
    predictions = result.get("predictions")
    if predictions:
        keys = [k for k in predictions[0] if k != "row"]
        lines.append("  ".join(["row", *keys]))
        for i, p in enumerate(predictions[:50]):
            cells = [f"{p[k]:.4f}" if isinstance(p[k], float) else str(p[k]) for k in keys]
            lines.append("  ".join([str(p.get("row", i)), *cells]))
        if len(predictions) > 50:
            lines.append(f"... {len(predictions) - 50} more rows (--json prints them all)")
    elif result:
        for k, v in result.items():
            shown = json.dumps(v) if isinstance(v, dict | list) else v
            lines.append(f"{k}: {shown}")
    return "\n".join(lines)
