"""The store of details: pending ones in arrival order, everything ever generated, and acknowledgement counts.

Each detail is serialised to JSON bytes once, when it is added; a page is the join of those bytes. Pending
details live in an :class:`~collections.OrderedDict` keyed by arrival number, so "the first N pending" and
"remove this id" both cost O(1) per detail however many were removed before (a plain dict would scan the holes
deletions leave at its front). Filter indexes are built on first use of a filter and kept up to date after.
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.simulator.generator import TASK_TYPES

__all__ = ["FILTER_FIELDS", "Backlog", "Entry"]

# PollTaskResult filter parameter -> the detail field it matches (compared as strings).
FILTER_FIELDS: dict[str, str] = {
    "TaskResultStatus": "TaskStatusCode",
    "DomainName": "DomainName",
    "InstanceId": "InstanceId",
    "TaskNo": "TaskNo",
}
_FIELD_POSITION = {name: i for i, name in enumerate(FILTER_FIELDS)}
_DESCRIPTION_ZH = {
    task_type: (
        b'"TaskTypeDescription":' + json.dumps(en, ensure_ascii=False).encode(),
        b'"TaskTypeDescription":' + json.dumps(zh, ensure_ascii=False).encode(),
    )
    for task_type, (en, zh) in TASK_TYPES.items()
}


def _dumps(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def _filter_value(value: Any) -> str | None:
    # A filter parameter arrives as a string; compare ints and strings by their text, nothing else matches.
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass(slots=True)
class Entry:
    """One pending record: its id (if usable), its JSON bytes, and the values the filters look at."""

    detail_no: str | None
    body: bytes
    task_type: str | None
    keys: tuple[str | None, ...]  # one per FILTER_FIELDS entry

    def body_for(self, lang: str) -> bytes:
        """The JSON bytes, with the Chinese TaskTypeDescription when ``lang`` is ``zh``."""
        if lang == "zh" and self.task_type in _DESCRIPTION_ZH:
            en, zh = _DESCRIPTION_ZH[self.task_type]
            return self.body.replace(en, zh, 1)
        return self.body


class Backlog:
    """Pending details, every detail ever added (by id), and how often each id was acknowledged."""

    def __init__(self) -> None:
        self._pending: OrderedDict[int, Entry] = OrderedDict()
        self._seq = itertools.count()
        self._by_id: dict[str, list[int]] = {}
        self._indexes: dict[str, dict[str, OrderedDict[int, None]]] = {}  # filter parameter -> value -> seqs
        self.known: dict[str, bytes] = {}
        """Every id ever added -> its JSON bytes as added (the first record with that id)."""
        self.ack_counts: dict[str, int] = {}
        self.acknowledged = 0
        """How many pending records acknowledgements removed."""

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, record: Any) -> str | None:
        """Append one record (any JSON value); returns its TaskDetailNo when it has a usable one."""
        body = _dumps(record)
        fields = record if isinstance(record, dict) else {}
        detail_no = fields.get("TaskDetailNo")
        if not isinstance(detail_no, str) or not detail_no:
            detail_no = None
        task_type = fields.get("TaskType")
        entry = Entry(
            detail_no=detail_no,
            body=body,
            task_type=task_type if isinstance(task_type, str) else None,
            keys=tuple(_filter_value(fields.get(field)) for field in FILTER_FIELDS.values()),
        )
        seq = next(self._seq)
        self._pending[seq] = entry
        if detail_no is not None:
            self._by_id.setdefault(detail_no, []).append(seq)
            self.known.setdefault(detail_no, body)
        for param, index in self._indexes.items():
            value = entry.keys[_FIELD_POSITION[param]]
            if value is not None:
                index.setdefault(value, OrderedDict())[seq] = None
        return detail_no

    def acknowledge(self, detail_nos: Iterable[str]) -> int:
        """Remove the pending records with these ids; returns how many ids were pending.

        Every id ever added has its acknowledgement counted, pending or not; unknown ids are ignored.
        """
        removed = 0
        for detail_no in detail_nos:
            if detail_no not in self.known:
                continue
            self.ack_counts[detail_no] = self.ack_counts.get(detail_no, 0) + 1
            seqs = self._by_id.pop(detail_no, None)
            if not seqs:
                continue
            removed += 1
            for seq in seqs:
                entry = self._pending.pop(seq)
                self.acknowledged += 1
                for param, index in self._indexes.items():
                    value = entry.keys[_FIELD_POSITION[param]]
                    if value is not None:
                        bucket = index[value]
                        del bucket[seq]
                        if not bucket:
                            del index[value]
        return removed

    def _index(self, param: str) -> dict[str, OrderedDict[int, None]]:
        index = self._indexes.get(param)
        if index is None:
            index = {}
            position = _FIELD_POSITION[param]
            for seq, entry in self._pending.items():
                value = entry.keys[position]
                if value is not None:
                    index.setdefault(value, OrderedDict())[seq] = None
            self._indexes[param] = index
        return index

    def page(self, page_num: int, page_size: int, filters: Mapping[str, str]) -> tuple[int, list[Entry]]:
        """``(total matching, the entries of page page_num)``, oldest first; ``filters`` by parameter name."""
        start = (page_num - 1) * page_size
        if not filters:
            return len(self._pending), list(itertools.islice(self._pending.values(), start, start + page_size))
        # Walk the smallest index bucket, checking the other filters on each entry.
        buckets = sorted(
            ((param, self._index(param).get(value, OrderedDict())) for param, value in filters.items()),
            key=lambda item: len(item[1]),
        )
        first, rest = buckets[0][1], [(_FIELD_POSITION[p], filters[p]) for p, _ in buckets[1:]]
        matching: Iterator[Entry] = (
            entry
            for entry in map(self._pending.__getitem__, first)
            if all(entry.keys[pos] == value for pos, value in rest)
        )
        if not rest:
            return len(first), list(itertools.islice(matching, start, start + page_size))
        entries = list(matching)
        return len(entries), entries[start : start + page_size]
