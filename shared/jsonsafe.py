"""What a client's JSON must be before it is stored: text and numbers PostgreSQL's jsonb takes.

Python's JSON parser accepts what jsonb refuses: NUL characters (``\\u0000``), lone UTF-16
surrogates, ``NaN`` and ``Infinity``. A value like that reaching a group commit fails the
whole batch's INSERT, so it is refused at validation instead, with the field named.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_DEPTH", "text_problem", "problem"]

#: Nesting allowed in free-form values (``metadata``): deep enough for any real use,
#: shallow enough that no recursive walk or encoder runs out of stack.
MAX_DEPTH = 32


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None."""
    if "\x00" in value:
        return "Text must not contain NUL characters (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "Text must be valid Unicode (it holds a lone surrogate)"
    return None


def problem(value: Any, depth: int = 0) -> tuple[list[Any], str] | None:
    """(path inside ``value``, message) of the first part jsonb would refuse, or None."""
    if depth > MAX_DEPTH:
        return [], f"Nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, str):
        msg = text_problem(value)
        return ([], msg) if msg else None
    if isinstance(value, float):
        return (
            None if math.isfinite(value) else ([], "Must be a finite number, not NaN or Infinity")
        )
    if isinstance(value, dict):
        for k, v in value.items():
            msg = text_problem(k) if isinstance(k, str) else None
            if msg:
                return [k], f"Key: {msg}"
            found = problem(v, depth + 1)
            if found is not None:
                return [k, *found[0]], found[1]
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = problem(v, depth + 1)
            if found is not None:
                return [i, *found[0]], found[1]
    return None
