"""Which page to poll: page 1, or a page that starts past the details the bridge already holds (read-ahead).

PollTaskResult lists pending details oldest first, and a detail leaves the list only once acknowledged (the
reference's warning that ``PageNum=2`` after acknowledging page 1 skips records rests on exactly that). So
while the bridge holds ``held`` details that it has seen and not yet asked the upstream to acknowledge
(publishes in flight, confirmed ids waiting for a call), those are the first ``held`` pending details and
everything new starts at offset ``held``. Page 1 then brings at most ``page_size - held`` new details, and a
page-1 poller waits a poll round trip plus an acknowledgement round trip for each page's worth.

Page ``k`` of size ``s`` covers offsets ``(k-1)·s`` to ``k·s - 1``, so :func:`plan` picks the ``k`` and the
``s ≤ page_size`` that bring the most details past ``held`` while starting at or before it.

Nothing here decides what is delivered, only how soon. Every detail a page brings is checked against what the
bridge holds, so a page that overlaps held details costs their parsing, never a second event. A page that
starts past a new detail (the upstream orders differently, or an acknowledgement sent after the poll overtook
it) leaves that detail for a later poll of page 1, which the run loop makes whenever less than half a page is
held, at least once per poll interval, and always before ``run --once`` calls the backlog drained.
"""

from __future__ import annotations

__all__ = ["plan"]


def plan(held: int, page_size: int) -> tuple[int, int]:
    """``(PageNum, PageSize)`` for the next poll while ``held`` details sit at the head of the upstream's list.

    >>> plan(0, 1000), plan(400, 1000), plan(1000, 1000), plan(1500, 1000)
    ((1, 1000), (1, 1000), (2, 1000), (3, 750))
    """
    best_num, best_size = 1, page_size
    best_new = page_size - held
    pages_before = 1  # k - 1: whole pages of size s that fit in front of offset ``held``
    while True:
        size = min(page_size, held // pages_before)
        if size * 2 <= best_new or size == 0:
            # Smaller pages from here on: none can bring more than half of what the best one brings.
            break
        new = (pages_before + 1) * size - held
        if new > best_new:
            best_num, best_size, best_new = pages_before + 1, size, new
        pages_before += 1
    return best_num, best_size
