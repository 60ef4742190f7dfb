"""The poll decision, as pure functions: counts, settings and the last page in; the next step out.

``docs/design.md`` (*Read-ahead* and *The poll decision*) explains the pacing and tabulates these functions;
the run loop only carries out what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from bridge import paging

__all__ = [
    "READ_AHEAD_PAGES",
    "After",
    "Counts",
    "Pacing",
    "PageShape",
    "after_page",
    "next_page",
    "read_ahead_page",
    "reading_ahead",
    "ready_to_poll",
]

# Read ahead only while the new page keeps at most this many pages on their way (publishing, confirmed, or in an
# acknowledgement call): what a crash can cause to be published twice. With 50 ms round trips the pipeline
# needs about four pages to keep the broker busy.
READ_AHEAD_PAGES = 4


@dataclass(frozen=True, slots=True)
class Pacing:
    """The settings the decision reads."""

    page_size: int
    read_ahead: bool = True


@dataclass(frozen=True, slots=True)
class Counts:
    """The ledger's counts at the moment of the decision."""

    held: int = 0  # in flight + confirmed, not yet in an acknowledgement call
    on_their_way: int = 0  # held + in an acknowledgement call
    unusable: int = 0  # distinct records without a usable TaskDetailNo (they stay at the head upstream)
    ack_failing: bool = False


@dataclass(frozen=True, slots=True)
class PageShape:
    """What the last page was and what it brought."""

    page_num: int
    page_size: int
    records: int
    new: int
    known: int
    page_one_blocked: bool = False  # the last page 1 was full of records without a usable TaskDetailNo

    @property
    def full(self) -> bool:
        return self.records >= self.page_size


class After(Enum):
    """What the loop does after a page."""

    POLL = "poll again at once"
    DRAINED = "the backlog is drained (--once ends here)"
    SLEEP = "sleep one poll interval"
    PAGE_ONE = "poll page 1 next, at once"
    SOME_SETTLED = "wait until fewer details are on their way"
    ALL_SETTLED = "wait until nothing is on its way"
    READ_AHEAD = "wait until reading ahead may go on"


def reading_ahead(counts: Counts, pacing: Pacing) -> bool:
    """Read ahead only while acknowledgements succeed and one more page keeps at most four on their way."""
    return (
        pacing.read_ahead
        and not counts.ack_failing
        and counts.on_their_way + pacing.page_size <= READ_AHEAD_PAGES * pacing.page_size
    )


def ready_to_poll(counts: Counts, pacing: Pacing) -> bool:
    """Poll when the next page would be mostly new: at most a page held (read-ahead) or half a page (page 1)."""
    return counts.held <= (pacing.page_size if reading_ahead(counts, pacing) else pacing.page_size // 2)


def read_ahead_page(counts: Counts, pacing: Pacing) -> tuple[int, int]:
    """``(PageNum, PageSize)`` of the page starting past what is seen at the head: held and unusable records."""
    return paging.plan(counts.held + counts.unusable, pacing.page_size)


def next_page(counts: Counts, pacing: Pacing, page_one_due: bool) -> tuple[int, int]:
    """``(PageNum, PageSize)``: page 1 when due (once per poll interval) or not reading ahead, else read ahead."""
    if page_one_due or not reading_ahead(counts, pacing):
        return 1, pacing.page_size
    return read_ahead_page(counts, pacing)


def after_page(counts: Counts, pacing: Pacing, page: PageShape, once: bool) -> After:
    """The step after ``page`` was taken in (``counts`` already include what it brought)."""
    if page.full and page.new:
        return After.POLL  # more backlog behind this page
    if page.new == 0 and page.known == 0:
        return _after_nothing(counts, pacing, page, once)
    if not counts.on_their_way:
        return After.POLL  # all the page brought was acknowledged while on its way: what comes after it?
    if page.full:
        return After.SOME_SETTLED  # everything on the page is on its way: poll again once some of it settled
    return After.ALL_SETTLED if once else After.SLEEP


def _after_nothing(counts: Counts, pacing: Pacing, page: PageShape, once: bool) -> After:
    """The step after a page with nothing this bridge can still process."""
    if page.full and pacing.read_ahead:
        start_num, start_size = read_ahead_page(counts, pacing)
        if (start_num - 1) * start_size > (page.page_num - 1) * page.page_size:
            # A full page of records without a usable TaskDetailNo: read ahead past them once it may go on.
            return After.READ_AHEAD
    if page.page_num == 1 or page.full or (page.page_one_blocked and not counts.on_their_way):
        return After.DRAINED if once else After.SLEEP  # and nothing this bridge can reach behind it
    if not counts.on_their_way:
        return After.PAGE_ONE  # past what was held, nothing, all settled: page 1 next, to see whether that is all
    return After.ALL_SETTLED if once else After.SLEEP
