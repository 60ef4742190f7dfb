"""Read-ahead paging: which (PageNum, PageSize) brings the most new details past what the bridge holds."""

from __future__ import annotations

import pytest

from bridge.paging import plan


@pytest.mark.parametrize(
    ("held", "expected"),
    [
        (0, (1, 1000)),
        (500, (1, 1000)),  # page 1 brings 500 new ones, as many as a page starting at 500 would
        (501, (2, 501)),
        (1000, (2, 1000)),
        (1200, (2, 1000)),  # 200 held ones again, 800 new: more than (3, 600) would bring
        (1500, (3, 750)),
        (2000, (3, 1000)),
    ],
)
def test_plan_examples(held: int, expected: tuple[int, int]) -> None:
    assert plan(held, 1000) == expected


@pytest.mark.parametrize("page_size", [1, 2, 3, 7, 10, 100])
def test_plan_starts_at_or_before_what_is_held_and_brings_the_most_new_details(page_size: int) -> None:
    for held in range(0, 5 * page_size + 3):
        page_num, size = plan(held, page_size)
        assert 1 <= size <= page_size
        assert (page_num - 1) * size <= held, "a page starting past the held details could skip new ones"
        # Compared with every page that starts at or before the held details: none brings more new ones.
        best = max(
            k * s - held for s in range(1, page_size + 1) for k in range(1, held // s + 2) if (k - 1) * s <= held
        )
        assert page_num * size - held == best, (held, page_num, size)
        assert best >= 1


def test_plan_is_page_one_while_at_most_half_a_page_is_held() -> None:
    assert {plan(held, 1000) for held in range(0, 501)} == {(1, 1000)}


def test_plan_brings_at_least_half_a_page_while_up_to_two_pages_are_held() -> None:
    # The run loop reads ahead only while at most a page is held and two are on their way.
    for page_size in (250, 1000):
        assert min(k * s - held for held in range(3 * page_size) for k, s in [plan(held, page_size)]) == page_size // 2
