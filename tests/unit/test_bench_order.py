"""The bench's case order: a Williams design, so no case always runs after the same neighbour."""

import itertools
from collections import Counter

import pytest


@pytest.fixture(scope="module")
def balanced_order(bench):
    return bench.balanced_order


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_every_case_runs_everywhere_and_after_every_other_equally_often(balanced_order, n):
    items = list("ABCDEF"[:n])
    period = n if n % 2 == 0 else 2 * n
    orders = [balanced_order(items, rep) for rep in range(period)]
    assert all(sorted(order) == items for order in orders)
    positions = Counter((pos, item) for order in orders for pos, item in enumerate(order))
    assert set(positions.values()) == {period // n}, positions
    follows = Counter(pair for order in orders for pair in zip(order, order[1:]))
    assert set(follows) == set(itertools.permutations(items, 2))
    assert len(set(follows.values())) == 1, follows
    assert balanced_order(items, period) == orders[0]


def test_a_single_case_is_its_own_order(balanced_order):
    assert balanced_order(["A"], 0) == balanced_order(["A"], 1) == ["A"]
