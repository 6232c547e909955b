"""The step policy: decode tokens first, then prompt chunks within the budget, in a rotation between clients (each
client's first prompt in its turn, then the later prompts in admission order)."""

import random
from collections.abc import Callable

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


def numbering() -> Callable[[str], int]:
    """A rotation's turns as the engine gives them: a prompt is numbered when it is first asked."""
    turns: dict[str, int] = {}
    return lambda key: turns.setdefault(key, len(turns))


@pytest.mark.parametrize(
    ("prefilling", "budget", "expected"),
    [
        # each client's first prompt before the later ones: another client's short prompt is filled in this step
        ([("x1", 100), ("x2", 4000), ("y1", 100)], 512, [("x1", 100), ("x2", 312), ("y1", 100)]),
        # the first prompts in their turns' order, then the later ones in admission order
        (
            [("x1", 300), ("x2", 300), ("y1", 300), ("z1", 300)],
            1024,
            [("x1", 300), ("x2", 124), ("y1", 300), ("z1", 300)],
        ),
        # everything fits: every prompt whole, in admission order
        ([("y1", 30), ("x1", 20), ("y2", 10)], 512, [("y1", 30), ("x1", 20), ("y2", 10)]),
    ],
)
def test_each_clients_first_prompt_goes_first(prefilling, budget, expected) -> None:
    assert plan_step(["a"], prefilling, budget, client=OWNER.__getitem__, turn=numbering()) == [("a", 1), *expected]


def test_a_client_whose_prompt_is_filled_goes_behind_the_others() -> None:
    """One client's burst of long prompts, admitted first, and another client's prompt: the burst's first prompt is
    filled, then the other client's, then the burst's next; the other client's second prompt, admitted later, goes
    behind that one."""
    prefilling = {"x1": 1024, "x2": 1024, "x3": 1024, "y1": 600}
    turn, order = numbering(), []
    while prefilling:
        for key, n in plan_step([], list(prefilling.items()), 512, client=OWNER.__getitem__, turn=turn):
            prefilling[key] -= n
            if not prefilling[key]:
                del prefilling[key]
                order.append(key)
                if key == "y1":
                    prefilling["y2"] = 600
    assert order == ["x1", "y1", "x2", "y2", "x3"]


def test_a_client_alone_keeps_admission_order() -> None:
    prefilling = [("x1", 300), ("x2", 300), ("x3", 5)]
    alone = plan_step([], prefilling, 512, client=OWNER.__getitem__, turn=numbering())
    assert alone == plan_step([], prefilling, 512) == [("x1", 300), ("x2", 212)]


def test_one_prompt_a_client_is_admission_order() -> None:
    """Many clients of one prompt each (the usual traffic): the rotation is admission order."""
    prefilling = [(f"p{i}", 200 + 37 * i) for i in range(8)]
    owners = {key: f"client{i}" for i, (key, _) in enumerate(prefilling)}
    assert plan_step([], prefilling, 1024, client=owners.__getitem__, turn=numbering()) == plan_step(
        [], prefilling, 1024
    )


def test_a_scored_prompt_past_its_bound_leaves_the_budget_to_the_next_prompt() -> None:
    plan = plan_step(
        [], [("s", 4000), ("x2", 4000), ("y1", 4000)], 1024, lambda key: key == "s", OWNER.__getitem__, numbering()
    )
    assert plan == [("s", SCORED_TOKENS), ("y1", 1024 - SCORED_TOKENS)]


def test_every_plan_fills_the_budget_or_every_prompt() -> None:
    """Whatever the clients, the step takes min(budget, every prompt's tokens), no prompt more than it wants, and
    lists them in admission order."""
    rng = random.Random(0)
    for _ in range(500):
        prefilling = [(f"p{i}", rng.randint(1, 700)) for i in range(rng.randint(1, 8))]
        owners = {key: rng.choice("xyz") for key, _ in prefilling}
        turns = {key: rng.randrange(100) for key, _ in prefilling}
        budget = rng.randint(1, 2048)
        plan = plan_step([], prefilling, budget, client=owners.__getitem__, turn=turns.__getitem__)
        wanted = dict(prefilling)
        assert all(0 < n <= wanted[key] for key, n in plan)
        assert sum(n for _, n in plan) == min(budget, sum(wanted.values()))
        assert [key for key, _ in plan] == [key for key, _ in prefilling if key in dict(plan)]
