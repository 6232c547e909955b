"""The step policy: decode tokens first, then prompt chunks in admission order within the budget."""

import pytest

from server.engine.batching import plan_step


@pytest.mark.parametrize(
    ("decoding", "prefilling", "budget", "expected"),
    [
        ([], [], 8, []),
        (["a", "b"], [], 8, [("a", 1), ("b", 1)]),
        ([], [("p", 20)], 8, [("p", 8)]),  # a long prompt is cut into chunks of the budget
        (["a"], [("p", 3), ("q", 10)], 8, [("a", 1), ("p", 3), ("q", 5)]),  # the last prompt takes what is left
        (["a"], [("p", 8), ("q", 4)], 8, [("a", 1), ("p", 8)]),  # decode tokens are not counted in the budget
        (["a", "b", "c"], [("p", 4)], 0, [("a", 1), ("b", 1), ("c", 1)]),
    ],
)
def test_plan_step(decoding, prefilling, budget, expected) -> None:
    assert plan_step(decoding, prefilling, budget) == expected
