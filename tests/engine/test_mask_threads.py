"""A step's grammar masks filled on threads beside the engine's (MaskFiller): the same masks and failures as the engine
thread alone fills, on threads only where the rows' measured cost says it pays, serially where no thread can start,
and the same tokens out of the engine."""

import asyncio
import threading
import time

import pytest
import torch
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end

from loraplex.synthetic import BYTE_VOCAB
from server.engine import SamplingParams
from server.engine.constraints import MIN_SAVING_S, MaskFiller, TokenConstraint, mask_words, threads_for
from server.engine.errors import GrammarDeadEnd, GrammarFailed
from server.grammar import CompiledGrammar, Grammars, GrammarSpec

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}  # fmt: skip
PATTERN = r"(yes|no), [0-9]{1,3}\."
WAIT_S = 10.0  # for another thread's fill: far past any scheduling delay, and reached only where there is none


@pytest.fixture(scope="module")
def grammars(tokenizer) -> dict[str, CompiledGrammar]:
    compiler = Grammars(tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id])
    try:
        specs = {"schema": GrammarSpec.json_schema(SCHEMA), "regex": GrammarSpec.regex(PATTERN),
                 "ab": GrammarSpec.regex("ab")}  # fmt: skip
        return {name: asyncio.run(compiler.get(spec)) for name, spec in specs.items()}
    finally:
        compiler.close()


class Fake:
    """A matcher of `family` allowing `allowed` (ids below 31), whose fill first waits at `meet` for its other
    parties' fills, sleeps `seconds` (off the interpreter lock, as llguidance's fills run) and raises `error`; it
    records the threads that fill it."""

    def __init__(
        self,
        allowed: tuple[int, ...] = (3, 7),
        seconds: float = 0.0,
        error: Exception | None = None,
        meet: threading.Barrier | None = None,
        family: object | None = None,
    ) -> None:
        self.allowed, self.seconds, self.error, self.meet, self.family = allowed, seconds, error, meet, family
        self.threads: list[int] = []

    def fill_mask(self, row: torch.Tensor) -> None:
        self.threads.append(threading.get_ident())
        if self.meet is not None:
            self.meet.wait(WAIT_S)  # broken (it raises) unless other threads fill the other parties' rows meanwhile
        time.sleep(self.seconds)
        if self.error is not None:
            raise self.error
        row.zero_()
        row[0] = sum(1 << token for token in self.allowed)

    def advance(self, token: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


def step_rows(
    grammars: dict[str, CompiledGrammar], tokenizer, meet: threading.Barrier
) -> tuple[list[TokenConstraint | None], list[frozenset[int]]]:
    """A step's rows, each call alike: honest grammars part way through their answers (one with a stop token held
    back by min_tokens), a matcher that raises, one whose mask allows nothing, one whose grammar allows only the held
    back stop token, rows without a constraint, and the first two rows meeting at `meet`."""
    schema, regex, held = grammars["schema"].matcher(), grammars["regex"].matcher(), grammars["regex"].matcher()
    for matcher, text in ((schema, '{"name":"x'), (regex, "yes, 4"), (held, "no, 1")):
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            matcher.advance(token)
    (a,) = tokenizer("a", add_special_tokens=False)["input_ids"]
    (dot,) = tokenizer(".", add_special_tokens=False)["input_ids"]
    rows: list[TokenConstraint | None] = [
        Fake(meet=meet), Fake(allowed=(9,), meet=meet), None, Fake(error=RuntimeError("matcher broke")), schema,
        Fake(allowed=()), grammars["ab"].matcher(), None, held, regex, Fake(seconds=0.002),
    ]  # fmt: skip
    banned = [frozenset()] * len(rows)
    banned[6], banned[8] = frozenset({a}), frozenset({dot})
    return rows, banned


def threads_of(rows: list[Fake]) -> set[int]:
    return {thread for row in rows for thread in row.threads}


def test_threads_fill_the_masks_and_failures_the_engine_thread_alone_fills(grammars, tokenizer) -> None:
    """Honest rows' masks, banned tokens, a matcher that raises (GrammarFailed), a mask allowing nothing and one
    allowing only a held back token (GrammarDeadEnd): the same rows, words and failures either way. The first two
    rows' fills meet, so two threads did fill at once."""
    alone, banned = step_rows(grammars, tokenizer, threading.Barrier(1))  # the engine thread alone: none to meet
    serial = MaskFiller(1).fill(alone, BYTE_VOCAB, banned)
    rows, banned = step_rows(grammars, tokenizer, threading.Barrier(2))
    filler = MaskFiller(2, min_saving_s=0.0)
    together = filler.fill(rows, BYTE_VOCAB, banned)
    filler.close()
    assert serial is not None and together is not None
    assert together.rows == serial.rows == [0, 1, 3, 4, 5, 6, 8, 9, 10]
    assert torch.equal(together.bits, serial.bits)
    assert list(together.failed) == list(serial.failed) == [3, 5, 6]
    for i, error in serial.failed.items():
        assert type(together.failed[i]) is type(error) and str(together.failed[i]) == str(error)
    assert type(serial.failed[3]) is GrammarFailed and type(serial.failed[5]) is GrammarDeadEnd
    assert "min_tokens" in str(serial.failed[6])
    assert torch.equal(together.bits[[2, 4, 5]], torch.full((3, mask_words(BYTE_VOCAB)), -1, dtype=torch.int32))
    assert together.bits[:2, 0].tolist() == [1 << 3 | 1 << 7, 1 << 9]  # the meeting rows' own masks
    assert len(threads_of([row for row in rows[:2] if isinstance(row, Fake)])) == 2  # the meeting rows' threads


def test_rows_go_to_threads_only_once_their_fills_are_measured_costly() -> None:
    """Cheap rows stay on the engine thread step after step; costly ones (50 ms a mask, by their sleep) do too at
    their first step, unmeasured, then go to the threads. The threads must save 20 ms a step here, not the default
    0.5 ms, with costs scaled to match: on a loaded machine a cheap fill preempted for a few ms measures as costly,
    and two of them in one step sent the cheap rows to the threads."""
    filler = MaskFiller(2, min_saving_s=0.02)
    cheap = [Fake() for _ in range(4)]
    for _ in range(4):
        filler.fill(cheap, 64)
    assert threads_of(cheap) == {threading.get_ident()}
    costly = [Fake(seconds=0.05) for _ in range(4)]
    filler.fill(costly, 64)
    assert threads_of(costly) == {threading.get_ident()}
    for _ in range(3):
        masks = filler.fill(costly, 64)
        assert masks is not None and not masks.failed
    assert len(threads_of(costly)) == 2
    filler.close()


@pytest.mark.parametrize(
    ("costs_ms", "threads"),
    [
        ([0.04] * 16, 1),  # JSON mode's masks on 128k tokens: waking a thread costs more than they do
        ([0.2] * 8, 4),  # 1.6 ms: four shares of 0.4 ms, not eight of 0.2 (each thread woken costs 0.1-0.15 ms)
        ([3.0] * 16, 8),  # a costly regex's: every thread
        ([5.0], 1),  # one row: nothing to share
        ([5.0, 0.1], 1),  # the costliest bounds the step: a thread would save 0.1 ms
    ],
)
def test_a_step_takes_as_many_threads_as_its_work_fills(costs_ms: list[float], threads: int) -> None:
    assert threads_for([cost / 1000 for cost in costs_ms], 8, MIN_SAVING_S) == threads


def test_a_family_of_costly_rows_is_filled_by_one_thread() -> None:
    """A request's choices (copies of one llguidance matcher) take turns at their shared lexer: alone, costly as they
    are, they stay on the engine thread; two such families go to two threads (their first rows meet), each family's
    rows filled by one."""
    filler = MaskFiller(2)
    choices = [Fake(seconds=0.002, family="one request") for _ in range(4)]
    for _ in range(3):
        filler.fill(choices, 64)
    assert threads_of(choices) == {threading.get_ident()}
    first, second = ([Fake(seconds=0.002, family=name) for _ in range(2)] for name in ("one", "another"))
    step = [first[0], second[0], None, second[1], first[1]]
    filler.fill(step, 64)  # measured, on the engine thread
    first[0].meet = second[0].meet = threading.Barrier(2)
    for _ in range(2):
        masks = filler.fill(step, 64)
        assert masks is not None and not masks.failed
    for n in (1, 2):
        assert first[0].threads[n] == first[1].threads[n] != second[0].threads[n] == second[1].threads[n]
    filler.close()


def test_a_pool_that_cannot_start_a_thread_leaves_the_masks_to_the_engine_thread(
    grammars, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool whose threads cannot start (the system's limit): the step's masks are the engine thread's alone, the
    same as ever, and so are every later step's."""
    filler = MaskFiller(2, min_saving_s=0.0)

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("can't start new thread")

    assert filler._pool is not None
    monkeypatch.setattr(filler._pool, "submit", refuse)
    rows, banned = step_rows(grammars, tokenizer, threading.Barrier(1))
    masks = filler.fill(rows, BYTE_VOCAB, banned)
    reference = MaskFiller(1).fill(step_rows(grammars, tokenizer, threading.Barrier(1))[0], BYTE_VOCAB, banned)
    assert masks is not None and reference is not None
    assert torch.equal(masks.bits, reference.bits) and list(masks.failed) == list(reference.failed)
    assert filler.threads == 1  # and every later step is filled alone
    later = [Fake(seconds=0.001) for _ in range(3)]
    for _ in range(3):
        filler.fill(later, 64)
    assert threads_of(later) == {threading.get_ident()}


class Costly:
    """A grammar matcher whose masks take a millisecond more: the step's rows go to the threads."""

    def __init__(self, matcher: TokenConstraint) -> None:
        self.matcher = matcher
        self.threads: set[int] = set()

    @property
    def family(self) -> object | None:
        return self.matcher.family

    def fill_mask(self, row: torch.Tensor) -> None:
        self.threads.add(threading.get_ident())
        time.sleep(0.001)
        self.matcher.fill_mask(row)

    def advance(self, token: int) -> None:
        self.matcher.advance(token)

    def is_finished(self) -> bool:
        return self.matcher.is_finished()


def test_a_requests_choices_are_one_family(grammars) -> None:
    """Copies of one compiled grammar (a request's choices), costly as they are, stay on the engine thread; another
    request's matcher is not of their family."""
    filler = MaskFiller(2)
    choices = [Costly(grammars["schema"].matcher()) for _ in range(4)]
    for _ in range(4):
        masks = filler.fill(choices, BYTE_VOCAB)
        assert masks is not None and not masks.failed
    assert {thread for row in choices for thread in row.threads} == {threading.get_ident()}
    assert grammars["regex"].matcher().family is not choices[0].family
    filler.close()


def test_constrained_rows_on_threads_answer_as_on_the_engine_thread_beside_free_rows(family_setup, tokenizer,
                                                                                   grammars) -> None:  # fmt: skip
    """Four choices of a schema and two of a regex (copies of one matcher each), greedy and sampled, beside free rows:
    every row's tokens are the same whether the engine thread fills the masks alone or the threads do, and the free
    rows' are PEFT's."""
    base, adapters = family_setup("llama")
    prompt = tokenizer("answer in the format asked")["input_ids"]
    plan = [("schema", greedy(48)), ("schema", SamplingParams(max_new_tokens=48, temperature=1.0, seed=7)),
            ("schema", greedy(48)), ("schema", SamplingParams(max_new_tokens=48, temperature=0.8, seed=3)),
            ("regex", greedy(16)), ("regex", SamplingParams(max_new_tokens=16, temperature=1.0, seed=5))]  # fmt: skip
    answers: dict[int, dict[str, list[int]]] = {}
    rows: list[Costly] = []
    for threads in (1, 2):
        engine = make_engine(base, tokenizer, max_seq_len=96)
        engine._masks = MaskFiller(threads)
        sink = Collector()
        for i, (name, sampling) in enumerate(plan):
            constrained = request(prompt, sampling, adapters[i % 2] if i < 4 else None, f"c{i}")
            rows.append(Costly(grammars[name].matcher()))
            constrained.grammar = rows[-1]
            engine.submit(constrained, sink)
        for i, adapter in enumerate([None, adapters[0]]):
            engine.submit(request(prompt, greedy(8), adapter, f"r{i}"), sink)
        run_to_end(engine)
        answers[threads] = {rid: sink.tokens(rid) for rid in sink.events}
        for i, adapter in enumerate([None, adapters[0]]):
            assert sink.tokens(f"r{i}") == reference_generate(base, adapter, prompt, 8)[0]
        assert all(sink.finish(f"c{i}") in ("stop", "length") for i in range(len(plan)))
    assert answers[2] == answers[1]
    assert all(len(answers[1][f"c{i}"]) > 1 for i in range(len(plan)))
    assert {thread for row in rows[: len(plan)] for thread in row.threads} == {threading.get_ident()}
    assert len({thread for row in rows[len(plan) :] for thread in row.threads}) == 2
