"""The step policy: decode tokens first, then prompt chunks within the budget, shared max-min fair between clients
and in admission order within each client."""

import random

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


OWNER = {"x1": "x", "x2": "x", "x3": "x", "y1": "y", "y2": "y", "z1": "z", "s": "x"}


@pytest.mark.parametrize(
    ("prefilling", "budget", "expected"),
    [
        # one client's long prompts admitted first do not hold the step: the other's short prompt is filled whole
        ([("x1", 4000), ("x2", 4000), ("y1", 100)], 512, [("x1", 412), ("y1", 100)]),
        # both want more than half: an equal part each
        ([("x1", 4000), ("y1", 4000)], 512, [("x1", 256), ("y1", 256)]),
        # within a client, its part goes to its prompts in admission order
        ([("x1", 100), ("x2", 4000), ("y1", 4000)], 512, [("x1", 100), ("x2", 156), ("y1", 256)]),
        # what one client leaves goes to the others, max-min fair
        ([("x1", 4000), ("y1", 50), ("z1", 4000)], 512, [("x1", 231), ("y1", 50), ("z1", 231)]),
        ([("x1", 4000), ("y1", 4000), ("z1", 4000)], 512, [("x1", 171), ("y1", 171), ("z1", 170)]),
        # fewer tokens than clients: one each while they last
        ([("x1", 10), ("y1", 10), ("z1", 10)], 2, [("x1", 1), ("y1", 1)]),
        # everything fits: every prompt whole, in admission order
        ([("y1", 30), ("x1", 20), ("y2", 10)], 512, [("y1", 30), ("x1", 20), ("y2", 10)]),
    ],
)
def test_the_prompt_budget_is_shared_between_clients(prefilling, budget, expected) -> None:
    assert plan_step(["a"], prefilling, budget, client=OWNER.__getitem__) == [("a", 1), *expected]


def test_a_client_alone_keeps_admission_order() -> None:
    prefilling = [("x1", 300), ("x2", 300), ("x3", 5)]
    assert plan_step([], prefilling, 512, client=OWNER.__getitem__) == plan_step([], prefilling, 512)
    assert plan_step([], prefilling, 512) == [("x1", 300), ("x2", 212)]


def test_a_scored_prompt_past_its_bound_leaves_its_clients_part_to_its_next_prompt() -> None:
    """The scored prompts' bound holds across clients; a client whose scored prompt has its share this step gives
    its part to its next prompt, and what none can take goes to the others."""
    plan = plan_step([], [("s", 4000), ("x2", 4000), ("y1", 4000)], 1024, lambda key: key == "s", OWNER.__getitem__)
    assert plan == [("s", SCORED_TOKENS), ("x2", 512 - SCORED_TOKENS), ("y1", 512)]


def test_every_plan_fills_the_budget_or_every_prompt() -> None:
    """Whatever the clients, the step takes min(budget, every prompt's tokens): sharing moves tokens, never
    loses them, and no prompt gets more than it wants."""
    rng = random.Random(0)
    for _ in range(500):
        prefilling = [(f"p{i}", rng.randint(1, 700)) for i in range(rng.randint(1, 8))]
        owners = {key: rng.choice("xyz") for key, _ in prefilling}
        budget = rng.randint(1, 2048)
        plan = plan_step([], prefilling, budget, client=owners.__getitem__)
        wanted = dict(prefilling)
        assert all(0 < n <= wanted[key] for key, n in plan)
        assert sum(n for _, n in plan) == min(budget, sum(wanted.values()))
        assert [key for key, _ in plan] == [key for key, _ in prefilling if key in dict(plan)]
