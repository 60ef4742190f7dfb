"""Which page to poll for read-ahead: the page that starts past the details the bridge holds.

See ``docs/design.md`` (*Read-ahead*) for why this is safe and how the run loop uses it.
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
