"""Production latency with a shadow version on and off, side by side in one run.

``inferq up`` as a user starts it (its defaults, the dev key); a second churn version is
trained without promotion; after an untimed phase to warm up, the same load runs in
``--rounds`` rounds of three phases, shadow off, at ``--rate-a`` and at ``--rate-b``, their
order rotated each round (so drift over the run cancels out): each phase a
closed loop of ``--clients`` one-row jobs and an open loop at ``--offered`` jobs/s, both
as ``bench.load_bench`` runs them. Prints jobs/s and completion p50 / p99 of each phase,
the shadow's own report, the medians over the rounds with their ratio to shadow off, each
round's ratio to its own shadow-off phase (median, min and max over the rounds), and how
far the shadow-off phases spread.

    .venv/bin/python -m bench.shadow_bench --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load_bench import (
    THREAD_VARS,
    CpuMeter,
    PhaseResult,
    closed_loop,
    code_version,
    inferq_target,
    machine,
    open_loop,
    pct,
    warm,
)
from bench.own_model_bench import Stack, say, stack_env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.shadow_bench", description=__doc__)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per loop and phase")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    p.add_argument("--offered", type=float, default=200.0, help="open-loop jobs/s")
    p.add_argument("--rate-a", type=float, default=0.1, help="first shadow sample rate")
    p.add_argument("--rate-b", type=float, default=1.0, help="second shadow sample rate")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three phases")
    return p.parse_args(argv)


async def _phase(target: Any, args: argparse.Namespace) -> tuple[PhaseResult, PhaseResult]:
    meter = CpuMeter({})
    closed = await closed_loop(target, meter, args.clients, args.duration)
    opened = await open_loop(target, meter, args.clients, args.offered, args.duration)
    return closed, opened


def _line(name: str, closed: PhaseResult, opened: PhaseResult) -> dict[str, float]:
    fig = {
        "jobs_s": closed.jobs / closed.seconds if closed.seconds else 0.0,
        "closed_p50": pct(closed.complete, 50) * 1000,
        "closed_p99": pct(closed.complete, 99) * 1000,
        "open_p50": pct(opened.complete, 50) * 1000,
        "open_p99": pct(opened.complete, 99) * 1000,
        "errors": float(sum(closed.errors.values()) + sum(opened.errors.values())),
    }
    print(
        f"  {name:<14} closed: {fig['jobs_s']:7.1f} jobs/s, completion p50 "
        f"{fig['closed_p50']:6.1f} ms p99 {fig['closed_p99']:6.1f} ms | open at "
        f"{opened.offered:g}/s: p50 {fig['open_p50']:5.1f} ms p99 {fig['open_p99']:6.1f} ms"
        f" | errors {fig['errors']:.0f}",
        flush=True,
    )
    return fig


def measure(stack: Stack, args: argparse.Namespace) -> int:
    stack.wait_ready(600)
    say(f"ready after {stack.ready_s:.1f} s; training a second churn version (not promoted)")
    trained = json.loads(stack.cli("train", "churn", "--no-promote", "--json"))
    staging = int(trained["version"])
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    api = httpx.Client(base_url=stack.api, headers=headers, timeout=30)
    target = inferq_target(stack.api, stack.load_key())
    asyncio.run(warm(target, args.clients))
    say("warming up: one untimed phase")
    asyncio.run(_phase(target, args))
    print(
        f"phases: {args.duration:g} s closed loop ({args.clients} clients), then "
        f"{args.duration:g} s open loop at {args.offered:g} jobs/s, one-row churn jobs; "
        f"{args.rounds} rounds, the order of the phases rotated each round"
    )
    kinds: list[tuple[str, float | None]] = [
        ("off", None),
        (f"shadow {args.rate_a:g}", args.rate_a),
        (f"shadow {args.rate_b:g}", args.rate_b),
    ]
    figures: dict[str, list[dict[str, float]]] = {name: [] for name, _ in kinds}
    failed = False
    for round_no in range(args.rounds):
        order = kinds[round_no % len(kinds) :] + kinds[: round_no % len(kinds)]
        for name, rate in order:
            if rate is None:
                api.delete("/v1/models/churn/shadow")
            else:
                r = api.put(
                    "/v1/models/churn/shadow", json={"version": staging, "sample_rate": rate}
                )
                r.raise_for_status()
            time.sleep(6)  # workers re-read the shadows every INFERQ_MODEL_POLL_S (5 s)
            fig = _line(f"{round_no + 1}: {name}", *asyncio.run(_phase(target, args)))
            figures[name].append(fig)
            failed = failed or fig["errors"] > 0
            if rate is not None:
                report = api.get("/v1/models/churn/shadow").json()
                print(
                    f"  {'':<14} shadow v{staging}: {report['rows_compared']} rows compared, "
                    f"label agreement {report['label_agreement']}, mean |diff| "
                    f"{report['mean_abs_score_diff']}, p99 |diff| {report['p99_abs_score_diff']}"
                )
    api.delete("/v1/models/churn/shadow")
    keys = [k for k in figures["off"][0] if k != "errors"]
    median = {
        name: {k: statistics.median(f[k] for f in figs) for k in keys}
        for name, figs in figures.items()
    }
    print("medians over the rounds, and their ratio to shadow off (1.00 = no change):")
    for name, fig in median.items():
        cells = ", ".join(f"{k} {fig[k]:.1f}" for k in keys)
        ratio = ", ".join(f"{k} {fig[k] / max(1e-9, median['off'][k]):.2f}" for k in keys)
        print(f"  {name:<14} {cells}")
        if name != "off":
            print(f"  {'':<14} ratio: {ratio}")
    # Each round's ratio to its own shadow-off phase, minutes apart at most: slow drift
    # over the run (tables growing, the machine's neighbours) cancels out of these.
    print("each round's ratio to that round's shadow off, median over the rounds [min, max]:")
    for name, figs in figures.items():
        if name == "off":
            continue
        cells = []
        for k in keys:
            ratios = [f[k] / max(1e-9, o[k]) for f, o in zip(figs, figures["off"], strict=True)]
            cells.append(
                f"{k} {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"
            )
        print(f"  {name:<14} " + ", ".join(cells))
    spread = {
        k: (max(f[k] for f in figures["off"]) / max(1e-9, min(f[k] for f in figures["off"])))
        for k in keys
    }
    print(
        "  spread of shadow off over the rounds (max / min): "
        + ", ".join(f"{k} {v:.2f}" for k, v in spread.items())
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env, _ = stack_env()
    for var in THREAD_VARS:
        os.environ[var] = "1"
    from shared.devstack.embedded import free_port

    print("inferq shadow benchmark: production latency, shadow off and on")
    print(machine().rstrip())
    print(code_version())
    base = Path(tempfile.mkdtemp(prefix="inferq-shadow-"))
    try:
        stack = Stack.start(base / "var", env, free_port(), free_port())
        try:
            return measure(stack, args)
        finally:
            for note in stack.stop():
                say(f"inferq up: {note}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
