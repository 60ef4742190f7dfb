"""One TaskDetail as the upstream sent it: the unit the upstream client hands to the event contract and the loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RawRecord"]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One TaskDetail exactly as the upstream sent it, next to its ``TaskDetailNo`` when that is usable.

    ``raw`` is whatever JSON value stood in the list (normally a dict); ``detail_no`` is the ``TaskDetailNo``
    exactly as received (looked up case-tolerantly), or ``None`` when the record has none usable. ``problem`` is
    set when the record holds a value that cannot be represented (a number too long to parse, say): one line
    naming the field and the value, and the record goes to the invalid route.
    """

    raw: Any
    detail_no: str | None
    problem: str | None = None
