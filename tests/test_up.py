"""`inferq up`: the whole stack from nothing, ready line, a job through it, clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx

from shared.devstack.embedded import free_port
from tests.conftest import ROOT, ROW


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_runs_the_stack_and_ctrl_c_stops_every_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("INFERQ_")  # embedded servers of its own, as on a fresh machine
    }
    api_port, flower_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.devstack.cli",
            "up",
            "--data-dir",
            str(tmp_path / "var"),
            "--port",
            str(api_port),
            "--flower-port",
            str(flower_port),
            "--customers",
            "3000",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        line = ""
        while time.monotonic() < deadline and not line.startswith("inferq ready"):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, "inferq up exited before it was ready"
        assert line.startswith("inferq ready"), line
        key = re.search(r"api_key=(\S+)", line).group(1)  # type: ignore[union-attr]
        password = re.search(r"flower_password=(\S+)", line).group(1)  # type: ignore[union-attr]
        assert f"api=http://127.0.0.1:{api_port}" in line
        pids = _descendants(proc.pid)
        postmaster = int((tmp_path / "var" / "pg" / "postmaster.pid").read_text().split()[0])

        with httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ) as c:
            job = c.post("/v1/jobs", json={"model": "churn", "inputs": [ROW]}).json()
            job = c.get(f"/v1/jobs/{job['id']}", params={"wait": 20}).json()
            assert job["status"] == "succeeded"
            assert 0 < job["result"]["predictions"][0]["score"] < 1
        flower = f"http://127.0.0.1:{flower_port}/"
        assert httpx.get(flower, timeout=10).status_code == 401
        assert httpx.get(flower, auth=("admin", password), timeout=10).status_code == 200

        # Crash the API: the supervisor restarts it.
        api_pid = int(
            subprocess.run(
                ["pgrep", "-f", f"shared.devstack.cli api --port {api_port}"],
                capture_output=True,
                text=True,
            ).stdout.split()[0]
        )
        os.kill(api_pid, signal.SIGKILL)

        def api_back() -> bool:
            try:
                return (
                    httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=1).status_code == 200
                )
            except httpx.HTTPError:
                return False

        time.sleep(0.5)
        deadline = time.monotonic() + 30
        while not api_back():
            assert time.monotonic() < deadline, "the API was not restarted"
            time.sleep(0.2)
        pids |= _descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    deadline = time.monotonic() + 10  # the last exits may still be being reaped
    while (left := [p for p in pids | {postmaster} if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], subprocess.run(
        ["ps", "-o", "pid,stat,cmd", "-p", ",".join(map(str, left))], capture_output=True, text=True
    ).stdout
    assert not (tmp_path / "var" / "stack.json").exists()
    # Every process's log is one format: JSON objects, one a line (no banners, no
    # warnings printed around the logger), each naming its service.
    for log_file in sorted((tmp_path / "var" / "logs").glob("*.log")):
        lines = [ln for ln in log_file.read_text().splitlines() if ln.strip()]
        assert lines, log_file.name
        for ln in lines:
            try:
                record = json.loads(ln)
            except ValueError:
                raise AssertionError(f"{log_file.name}: not a JSON line: {ln[:200]}") from None
            assert record["service"] and record["level"], ln
