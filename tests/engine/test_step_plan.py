"""The step policy: decode tokens first, then prompt chunks in admission order within the budget."""

import pytest

from server.engine.batching import SCORED_TOKENS, plan_step


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


@pytest.mark.parametrize(
    ("prefilling", "budget", "expected"),
    [
        ([("s", 300)], 2048, [("s", SCORED_TOKENS)]),  # a scored prompt's chunk is capped, whatever the budget
        ([("s", 200), ("t", 200), ("p", 100)], 2048, [("s", 200), ("t", SCORED_TOKENS - 200), ("p", 100)]),
        # the scored prompts have their share: a later one waits, the next unscored one still fits
        ([("s", 300), ("t", 5), ("p", 10)], 2048, [("s", SCORED_TOKENS), ("p", 10)]),
        ([("s", 300)], 8, [("s", 8)]),  # within the budget as any prompt
    ],
)
def test_scored_prompts_share_a_bounded_chunk(prefilling, budget, expected) -> None:
    assert plan_step(["a"], prefilling, budget, lambda key: key in {"s", "t"}) == [("a", 1), *expected]
