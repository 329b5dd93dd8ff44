"""The multiple-choice knapsack shared by weight and KV bit allocation."""

from __future__ import annotations

import itertools
import random

import pytest
from optiq.core.knapsack import solve


def brute_force(costs, losses, capacity):
    best = None
    for combo in itertools.product(*(range(len(r)) for r in costs)):
        cost = sum(costs[i][j] for i, j in enumerate(combo))
        if cost > capacity:
            continue
        loss = sum(losses[i][j] for i, j in enumerate(combo))
        if best is None or loss < best:
            best = loss
    return best


def test_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 5)
        costs = [[rng.randint(0, 12) for _ in range(rng.randint(1, 4))] for _ in range(n)]
        losses = [[rng.random() for _ in row] for row in costs]
        capacity = rng.randint(0, 30)
        want = brute_force(costs, losses, capacity)
        got = solve(costs, losses, capacity)
        if want is None:
            assert got is None
            continue
        assert got is not None
        assert sum(costs[i][j] for i, j in enumerate(got.picks)) <= capacity
        assert got.loss == pytest.approx(want, rel=1e-12)
        assert got.loss == pytest.approx(sum(losses[i][j] for i, j in enumerate(got.picks)), rel=1e-12)


def test_ties_go_to_the_cheapest_then_the_earliest_option():
    # both items lose the same whatever they take: spend nothing
    assert solve([[0, 3], [0, 3]], [[1.0, 1.0], [1.0, 1.0]], 10).picks == [0, 0]
    # two options of equal cost and loss: the first one
    assert solve([[2, 2]], [[0.5, 0.5]], 5).picks == [0]
    # room for one upgrade: it goes where it saves the most
    choice = solve([[0, 4], [0, 4]], [[1.0, 0.1], [1.0, 0.5]], 4)
    assert choice.picks == [1, 0] and choice.loss == pytest.approx(1.1)


def test_nothing_fits():
    assert solve([[3, 5]], [[1.0, 0.0]], 2) is None
    assert solve([[0]], [[0.0]], -1) is None
    assert solve([], [], 0).picks == []
