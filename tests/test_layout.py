"""The layout's promises: rooms by concern, each module small and saying what it owns,
the API apart from the workers, and one definition of a job behind every view of it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "workers", "shared")
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_module_is_over_400_lines_and_each_says_what_it_owns() -> None:
    too_long, undocumented = [], []
    for path in _modules():
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        if not ast.get_docstring(ast.parse(text)):
            undocumented.append(str(path.relative_to(ROOT)))
    assert not too_long, too_long
    assert not undocumented, undocumented


def test_the_api_imports_nothing_from_workers() -> None:
    importers = []
    for path in sorted((ROOT / "api").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "workers" or n.startswith("workers.") for n in names):
                importers.append(str(path.relative_to(ROOT)))
    assert not importers, importers
    # Nor at run time: the API process never builds the workers' tasks or beat schedule.
    loaded = subprocess.run(
        [sys.executable, "-c", "import api.main, sys; print(sorted(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'workers" not in loaded
    assert "'celery.beat'" not in loaded


def test_the_readme_tree_names_every_module_and_only_modules_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    tree = readme.split("## Development", 1)[1].split("```", 2)[1]
    sections: dict[str, list[str]] = {}
    for line in tree.splitlines():
        if line and not line.startswith(" "):
            sections[line.split()[0]] = []
        elif line.strip():
            sections[list(sections)[-1]].append(line)
    for package in PACKAGES:
        lines = sections[f"{package}/"]
        words = {w.strip(",;:()") for line in lines for w in line.split()}
        named = {w for w in words if w.endswith(".py")}
        present = {
            str(p.relative_to(ROOT / package))
            for p in (ROOT / package).rglob("*.py")
            if p.name != "__init__.py"
        }
        assert named - present == set(), f"{package}/: listed but missing {named - present}"
        assert present - named == set(), f"{package}/: not in the tree {present - named}"


def test_the_openapi_job_schemas_show_the_fields_of_the_one_job_definition() -> None:
    from api.schemas import JobAccepted, JobPublic, JobSummary
    from shared.jobs.fields import ACCEPTED_FIELDS, SUMMARY_FIELDS, VIEW_FIELDS

    assert tuple(JobPublic.model_fields) == (*VIEW_FIELDS, "links")
    assert tuple(JobAccepted.model_fields) == (*ACCEPTED_FIELDS, "links")
    assert tuple(JobSummary.model_fields) == (*SUMMARY_FIELDS, "links")


def test_a_queued_job_is_shown_the_same_way_by_the_hot_copy_and_the_ledger() -> None:
    import json
    import uuid
    from datetime import UTC, datetime

    from shared.jobs.fields import JobRow, JobStatus, done_message, hot_copy, read_done_message
    from shared.jobs.fields import public_view as view_of
    from shared.orm import Job

    now = datetime.now(UTC)
    row = JobRow(uuid.uuid4(), "t1", "predict", "churn", 3, meta={"a": 1}, created_at=now)
    orm = Job(
        id=row.id,
        tenant="t1",
        type="predict",
        model="churn",
        model_version=3,
        status=JobStatus.QUEUED,
        request={},
        meta={"a": 1},
        attempts=0,
        created_at=now,
    )
    assert view_of(row) == view_of(orm)
    assert json.loads(hot_copy(row)) == {"tenant": "t1", "view": view_of(row)}
    doc = hot_copy(row)
    assert read_done_message(done_message(row.id, doc).encode()) == (str(row.id), doc.encode())
    assert read_done_message(done_message(row.id, "x" * 20_000).encode()) == (str(row.id), None)


def test_jobs_that_end_together_share_done_messages_and_each_is_read_back() -> None:
    import uuid

    from shared.jobs.fields import (
        DONE_BATCH_MAX,
        JobRow,
        done_messages,
        hot_copy,
        read_done_messages,
    )

    rows = [JobRow(uuid.uuid4(), "t1", "predict", "churn", 1) for _ in range(40)]
    rows[3].result = {"text": "two\nlines"}  # a newline inside a result stays escaped
    docs = [hot_copy(r) for r in rows]
    docs[5] = "x" * 20_000  # too big to ride along: the id alone
    docs[7:] = [d + " " * 3000 for d in docs[7:]]  # enough to need several messages
    messages = done_messages(zip((r.id for r in rows), docs, strict=True))
    assert 1 < len(messages) < len(rows)
    assert all(len(m) <= DONE_BATCH_MAX for m in messages)
    read = [entry for m in messages for entry in read_done_messages(m.encode())]
    assert read == [
        (str(r.id), None if i == 5 else d.encode())
        for i, (r, d) in enumerate(zip(rows, docs, strict=True))
    ]


def test_every_task_the_broker_names_or_beat_schedules_is_registered_by_the_workers() -> None:
    from shared.broker import CALLBACK_TASK, TASK_FOR_TYPE
    from shared.config import get_settings
    from workers.app import celery_app
    from workers.beat import schedule

    celery_app.loader.import_default_modules()
    registered = set(celery_app.tasks)
    named = {name for name, _ in TASK_FOR_TYPE.values()} | {CALLBACK_TASK[0]}
    scheduled = {entry["task"] for entry in schedule(get_settings()).values()}
    assert named | scheduled <= registered, sorted((named | scheduled) - registered)
