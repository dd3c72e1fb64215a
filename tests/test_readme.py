"""The README's shell blocks run as printed, in order, against a fresh ``inferq up``.

Each ```sh block is run, one after another in one bash session (``set -euo pipefail``),
from a directory laid out as a checkout is after ``make up``: ``var/`` the stack's data
directory and ``.venv`` the environment. Only the port differs: ``localhost:8000`` is
rewritten to the port of this test's stack. A block preceded by ``<!-- not run: why -->``
is skipped, and must say why.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from shared.devstack.embedded import free_port
from tests.conftest import ROOT

BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```sh\n(?P<code>.*?)```", re.S)


def readme_blocks() -> list[tuple[str | None, str]]:
    text = (ROOT / "README.md").read_text()
    return [(m["why"], m["code"]) for m in BLOCK.finditer(text)]


def test_every_skipped_block_says_why() -> None:
    blocks = readme_blocks()
    assert len(blocks) > 10
    assert all(why is None or why.strip() for why, _ in blocks)
    assert sum(why is None for why, _ in blocks) >= 10


def _start_stack(base: Path, port: int, flower: int) -> tuple[subprocess.Popen, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.devstack.cli", "up", "--port", str(port)]
        + ["--flower-port", str(flower), "--data-dir", str(base / "var")],
        cwd=base,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = ""
    while not line.startswith("inferq ready"):
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line and proc.poll() is not None:
            raise AssertionError("inferq up exited before it was ready")
    return proc, {**env, "INFERQ_API_PORT": str(port)}


def test_readme_shell_blocks_run_in_order_against_inferq_up(tmp_path: Path) -> None:
    port, flower = free_port(), free_port()
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    script = ["set -euo pipefail"]
    for i, (why, code) in enumerate(readme_blocks()):
        if why is None:
            code = code.replace("localhost:8000", f"localhost:{port}")
            script += [f"echo '::block {i}::'", code]
    script.append("echo '::all blocks ran::'")
    proc, env = _start_stack(tmp_path, port, flower)
    try:
        out = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    shown = f"stdout:\n{out.stdout[-6000:]}\nstderr:\n{out.stderr[-4000:]}"
    assert out.returncode == 0 and "::all blocks ran::" in out.stdout, shown
    # Every answer is the one the README shows, not an error it does not mention.
    for wrong in ("job not found", "internal error", "Traceback", "null?wait", "Error:"):
        assert wrong not in out.stdout + out.stderr, shown
    assert out.stdout.count('"status":"succeeded"') >= 2, shown
    assert '"loc":["body","inputs",0,"support_tickets"]' in out.stdout, shown
    assert '{"detail":"job already succeeded"}' in out.stdout, shown
    assert "registered accounts-gbt v1 (production)" in out.stdout, shown
    assert re.search(r"job \S+ succeeded in [\d.]+ s \(score, churn v\d+\)", out.stdout), shown
    assert re.search(r"churn v\d+ trained: .*(promoted to production|not promoted)", out.stdout)
