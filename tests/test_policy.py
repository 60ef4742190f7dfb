"""The poll decision over its whole input space: tables for the rules, exhaustive sweeps for the invariants."""

from __future__ import annotations

import itertools

import pytest

from bridge import paging
from bridge.policy import (
    READ_AHEAD_PAGES,
    After,
    Counts,
    Pacing,
    PageShape,
    after_page,
    next_page,
    reading_ahead,
    ready_to_poll,
)

P = Pacing(page_size=10)
OFF = Pacing(page_size=10, read_ahead=False)


@pytest.mark.parametrize(
    ("counts", "pacing", "expected"),
    [
        (Counts(), P, True),
        (Counts(held=10, on_their_way=10), P, True),  # read-ahead: a whole page held is fine
        (Counts(held=11, on_their_way=11), P, False),
        (Counts(held=10, on_their_way=31), P, False),  # a fifth page would be on its way: page 1 rule
        (Counts(held=5, on_their_way=31), P, True),
        (Counts(held=6, on_their_way=6, ack_failing=True), P, False),  # acknowledgements fail: half a page
        (Counts(held=5, on_their_way=5, ack_failing=True), P, True),
        (Counts(held=6, on_their_way=6), OFF, False),
        (Counts(held=5, on_their_way=5), OFF, True),
    ],
)
def test_ready_to_poll(counts: Counts, pacing: Pacing, expected: bool) -> None:
    assert ready_to_poll(counts, pacing) is expected


@pytest.mark.parametrize(
    ("counts", "pacing", "due", "expected"),
    [
        (Counts(), P, True, (1, 10)),
        (Counts(), P, False, (1, 10)),
        (Counts(held=10, on_their_way=10), P, False, (2, 10)),
        (Counts(held=10, on_their_way=10), P, True, (1, 10)),  # page 1 at least once per poll interval
        (Counts(held=10, on_their_way=10, unusable=5), P, False, (3, 7)),  # starts at 14, past 15 seen: 7 new
        (Counts(held=10, on_their_way=10, unusable=10), P, False, (3, 10)),  # past the unusable ones too
        (Counts(held=10, on_their_way=10, ack_failing=True), P, False, (1, 10)),
        (Counts(held=10, on_their_way=10), OFF, False, (1, 10)),
        (Counts(held=10, on_their_way=40), P, False, (1, 10)),  # four pages on their way: no read-ahead
    ],
)
def test_next_page(counts: Counts, pacing: Pacing, due: bool, expected: tuple[int, int]) -> None:
    assert next_page(counts, pacing, due) == expected


def shape(num: int = 1, records: int = 0, new: int = 0, known: int = 0, blocked: bool = False) -> PageShape:
    return PageShape(num, 10, records, new, known, blocked)


@pytest.mark.parametrize(
    ("counts", "page", "once", "expected"),
    [
        # a full page that brought new details: more behind it
        (Counts(held=10, on_their_way=10), shape(records=10, new=10), False, After.POLL),
        # page 1 not full, nothing new or known: drained / sleep
        (Counts(), shape(records=0), True, After.DRAINED),
        (Counts(), shape(records=0), False, After.SLEEP),
        (Counts(unusable=3), shape(records=3), True, After.DRAINED),
        # page 1 full of unusable records: read ahead past them
        (Counts(unusable=10), shape(records=10), True, After.READ_AHEAD),
        # ... unless read-ahead cannot start past them (memory of them lost): drained
        (Counts(unusable=0), shape(records=10), True, After.DRAINED),
        # a read-ahead page past unusable records that brings nothing, all settled: drained
        (Counts(unusable=10), shape(num=2, records=0, blocked=True), True, After.DRAINED),
        # a read-ahead page with nothing, everything settled: page 1 next
        (Counts(), shape(num=2, records=0), True, After.PAGE_ONE),
        (Counts(), shape(num=2, records=3, known=3), True, After.POLL),  # all acknowledged meanwhile
        # things on their way
        (Counts(held=4, on_their_way=4), shape(records=10, known=10), False, After.SOME_SETTLED),
        (Counts(held=4, on_their_way=4), shape(records=4, new=4), True, After.ALL_SETTLED),
        (Counts(held=4, on_their_way=4), shape(records=4, new=4), False, After.SLEEP),
        (Counts(held=4, on_their_way=4), shape(num=2, records=0), False, After.SLEEP),
        (Counts(held=4, on_their_way=4), shape(num=2, records=0), True, After.ALL_SETTLED),
    ],
)
def test_after_page(counts: Counts, page: PageShape, once: bool, expected: After) -> None:
    assert after_page(counts, P, page, once) is expected


def _all_counts(page_size: int) -> list[Counts]:
    sizes = range(0, (READ_AHEAD_PAGES + 1) * page_size + 2)
    return [
        Counts(held=held, on_their_way=held + sending, unusable=unusable, ack_failing=failing)
        for held in sizes
        for sending in (0, 1, page_size)
        for unusable in (0, 1, page_size, 2 * page_size)
        for failing in (False, True)
    ]


@pytest.mark.parametrize("page_size", [1, 2, 3, 4])
def test_the_whole_input_space(page_size: int) -> None:
    """Sweep every combination of counts, settings and page shapes (for small pages): the invariants hold."""
    for read_ahead in (False, True):
        pacing = Pacing(page_size=page_size, read_ahead=read_ahead)
        for counts in _all_counts(page_size):
            for due in (False, True):
                num, size = next_page(counts, pacing, due)
                assert 1 <= size <= page_size
                if num != 1:
                    # Read ahead only when allowed, never when page 1 is due, and never past what is seen.
                    assert reading_ahead(counts, pacing) and not due
                    assert (num - 1) * size <= counts.held + counts.unusable
                    assert counts.on_their_way + page_size <= READ_AHEAD_PAGES * page_size
                if not read_ahead:
                    assert (num, size) == (1, page_size)
            for page_num, records, once, blocked in itertools.product(
                (1, 2, 3), range(page_size + 1), (False, True), (False, True)
            ):
                for new in range(records + 1):
                    for known in range(records - new + 1):
                        page = PageShape(page_num, page_size, records, new, known, blocked)
                        step = after_page(counts, pacing, page, once)
                        _check_step(counts, pacing, page, once, step)


def _check_step(counts: Counts, pacing: Pacing, page: PageShape, once: bool, step: After) -> None:
    if step is After.DRAINED:
        # Drained only with --once, after a page that brought nothing this bridge can still process, and either
        # page 1 or a page that reaches past everything seen.
        assert once and page.new == 0 and page.known == 0
        assert page.page_num == 1 or page.full or (page.page_one_blocked and not counts.on_their_way)
    if not once:
        assert step is not After.DRAINED and step is not After.ALL_SETTLED
    if step is After.READ_AHEAD:
        num, size = paging.plan(counts.held + counts.unusable, pacing.page_size)
        assert pacing.read_ahead and (num - 1) * size > (page.page_num - 1) * page.page_size
    if step in (After.SOME_SETTLED, After.ALL_SETTLED):
        assert counts.on_their_way > 0, "waiting for something to settle with nothing on its way would hang"
    if page.full and page.new:
        assert step is After.POLL
