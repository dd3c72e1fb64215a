"""The API process's memory of recent jobs stays within its budget."""

from __future__ import annotations

from api.waiter import _Recent


def test_recent_keeps_between_one_and_two_budgets_of_the_newest() -> None:
    recent: _Recent[str] = _Recent(100)
    for i in range(250):
        recent[f"job-{i}"] = f"tenant-{i}"
    remembered = [i for i in range(250) if recent.get(f"job-{i}") is not None]
    assert remembered == list(range(100, 250))  # the last full generation and the current one
    assert recent.get("job-249") == "tenant-249"


def test_recent_bounds_bytes_not_entries_when_given_a_cost() -> None:
    recent: _Recent[bytes] = _Recent(1000, cost=len)
    for i in range(10):
        recent[f"small-{i}"] = b"x" * 10
    recent["big"] = b"y" * 900  # fills the generation: the next one starts a new one
    recent["next"] = b"z" * 200
    assert recent.get("big") == b"y" * 900
    assert recent.get("small-0") == b"x" * 10  # still in the older generation
    for i in range(3):
        recent[f"more-{i}"] = b"w" * 400  # a third generation: the first one is forgotten
    assert recent.get("small-0") is None and recent.get("big") is None
    assert recent.get("more-2") == b"w" * 400
