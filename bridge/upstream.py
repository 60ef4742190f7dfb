"""The upstream client: PollTaskResult and AcknowledgeTaskResult of Alibaba Cloud's Domain API.

TODO(upstream helper): implementation. The interface below is what the rest of the package codes against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bridge.settings import Settings

__all__ = ["AckResult", "Page", "RawRecord", "UpstreamClient"]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One TaskDetail exactly as the upstream sent it, next to its ``TaskDetailNo`` when that is usable.

    ``raw`` is whatever JSON value stood in the list (normally a dict); ``detail_no`` is a non-empty string
    ``TaskDetailNo`` (looked up case-tolerantly), or ``None`` when the record has none usable.
    """

    raw: Any
    detail_no: str | None


@dataclass(frozen=True, slots=True)
class Page:
    """One PollTaskResult page."""

    request_id: str | None
    page_num: int
    page_size: int
    total_items: int | None
    total_pages: int | None
    records: list[RawRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AckResult:
    """The outcome of acknowledging a list of ids: how many were sent and how many the upstream confirmed."""

    sent: int
    confirmed: int
    request_ids: list[str] = field(default_factory=list)


class UpstreamClient:
    """Signed calls to the Domain API over an injected :class:`httpx.AsyncClient`."""

    def __init__(self, http: httpx.AsyncClient, settings: Settings) -> None:
        raise NotImplementedError

    async def poll(self, page_num: int = 1, page_size: int | None = None) -> Page:
        raise NotImplementedError

    async def acknowledge(self, detail_nos: Sequence[str]) -> AckResult:
        raise NotImplementedError
