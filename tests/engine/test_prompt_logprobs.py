"""Prompt logprobs (vLLM's prompt_logprobs): every prompt token but the first is scored after the tokens before it
as PEFT scores it (log_softmax of the model's logits over the whole prompt, the adapter applied), with its rank and
the N most likely tokens there; the request's first token event carries them. Such a request takes no cached prefix,
leaves its own for others, and the requests beside it answer as they do without it."""

import copy
import functools
import time
from collections import Counter

import pytest
import torch
from enginekit import (
    Collector,
    SavedAdapter,
    greedy,
    make_engine,
    reference_generate,
    reference_model,
    request,
    run_to_end,
)
from tiny import tiny_model

from server.engine import Engine, PromptScores, PromptToken, SamplingParams, TokenEvent
from server.engine.batching import SCORED_TOKENS
from server.engine.graphs import StepGraphs
from server.engine.prefix_cache import BLOCK

NEW_TOKENS = 4
# long enough for several chunks at make_engine's 8 prompt tokens a step (a step scores positions of two requests)
PROMPT = list(range(30, 30 + 2 * BLOCK + 3))
TOL_CUDA = 1e-3  # fp32 on CUDA: the kernels sum in other orders than PEFT's cuBLAS calls


def reference_scores(base: torch.nn.Module, adapter: SavedAdapter | None, prompt: list[int]) -> torch.Tensor:
    """log_softmax [T, V] fp32 of the model's logits at every prompt position (PEFT for an adapter): row p scores
    prompt[p + 1]."""
    model = reference_model(base, adapter)
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=model.device)).logits[0]
    return logits.float().log_softmax(-1).cpu()


def first_token_event(sink: Collector, request_id: str) -> TokenEvent:
    events = [e for e in sink.events[request_id] if e.token_id is not None]
    assert all(e.prompt_logprobs is None for e in events[1:]), "only the first token's event carries the prompt"
    return events[0]


def assert_scored_as(
    scores: PromptScores | None, prompt: list[int], reference: torch.Tensor, n: int, tol: float = 1e-4
) -> None:
    """`scores` are the reference's scoring of `prompt` within `tol`: a token's rank counts the tokens more likely
    than it by more than tol, and at most those at least as likely less tol; the top tokens are the reference's
    top values, each id's own value (tokens closer than tol may swap places)."""
    assert scores is not None
    scored = scores.tokens()
    assert [t.token_id for t in scored] == prompt
    assert scored[0] == PromptToken(prompt[0], None, None, ())  # nothing before the first token scores it
    for p, token in enumerate(scored[1:]):
        row = reference[p]  # [V] the distribution after prompt[: p + 1]
        own = row[token.token_id].item()
        assert token.logprob == pytest.approx(own, abs=tol), p
        assert token.rank is not None and int((row > own + tol).sum()) < token.rank <= int((row >= own - tol).sum()), p
        assert len(token.top) == n, p
        assert [v for _, v in token.top] == pytest.approx(row.topk(n).values.tolist(), abs=tol), p
        assert [v for _, v in token.top] == pytest.approx([row[t].item() for t, _ in token.top], abs=tol), p


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prompt_logprobs_equal_pefts_beside_rows_that_ask_none(family, family_setup, tokenizer) -> None:
    """Rows scoring their prompt (each N, adapters and the base model) beside rows that do not: every scored
    prompt is PEFT's log-softmax over it, every answer PEFT's, and the rows that ask nothing carry nothing."""
    base, adapters = family_setup(family)
    plan = [(adapters[0], 3), (None, None), (adapters[1], 0), (adapters[3], 20), (None, 1), (adapters[2], None)]
    engine = make_engine(base, tokenizer)
    sink = Collector()
    prompts = [[*PROMPT[i:], 5 + i] for i in range(len(plan))]
    for i, ((adapter, n), prompt) in enumerate(zip(plan, prompts, strict=True)):
        engine.submit(request(prompt, greedy(NEW_TOKENS, prompt_logprobs=n), adapter, f"r{i}"), sink)
    run_to_end(engine)
    for i, ((adapter, n), prompt) in enumerate(zip(plan, prompts, strict=True)):
        assert sink.tokens(f"r{i}") == reference_generate(base, adapter, prompt, NEW_TOKENS)[0], i
        scored = first_token_event(sink, f"r{i}").prompt_logprobs
        if n is None:
            assert scored is None
        else:
            assert_scored_as(scored, prompt, reference_scores(base, adapter, prompt), n)


def test_rows_beside_scored_prompts_answer_as_without_them(family_setup, tokenizer) -> None:
    """The same ordinary requests, alone and with requests scoring their prompts joining mid-flight: their tokens
    and logprobs do not change."""
    base, adapters = family_setup("llama")
    ordinary = [(f"o{i}", [*PROMPT[2 * i :], 9], adapters[i % 2] if i % 3 else None) for i in range(4)]
    scoring = [(f"s{i}", [*PROMPT[i:], 11 + i], adapters[2 + i % 2]) for i in range(3)]
    runs = []
    for extra in ([], scoring):
        engine = make_engine(base, tokenizer)
        sink = Collector()
        for request_id, prompt, adapter in ordinary:
            engine.submit(request(prompt, greedy(NEW_TOKENS + 2, top_logprobs=2), adapter, request_id), sink)
            engine.step()
        for request_id, prompt, adapter in extra:
            engine.submit(request(prompt, greedy(NEW_TOKENS, prompt_logprobs=2), adapter, request_id), sink)
            engine.step()
        run_to_end(engine)
        runs.append(sink)
        for request_id, prompt, adapter in extra:
            assert_scored_as(first_token_event(sink, request_id).prompt_logprobs, prompt,
                             reference_scores(base, adapter, prompt), 2)  # fmt: skip
    alone, beside = runs
    for request_id, _, _ in ordinary:
        assert beside.tokens(request_id) == alone.tokens(request_id), request_id
        assert beside.logprobs(request_id) == pytest.approx(alone.logprobs(request_id), abs=1e-5), request_id
        assert all(e.prompt_logprobs is None for e in beside.events[request_id])


def test_a_scored_prompt_takes_no_cached_prefix_and_leaves_its_own(family_setup, tokenizer) -> None:
    """A prompt whose prefix is cached is computed whole when scored (every position's logits are needed), and
    does not wait for a prefill of that prefix either; what it writes serves the next request's prefix."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    long = list(range(30, 30 + 56))  # a first step prefills 32 tokens of it (no row decodes): 24 more to come
    engine.submit(request([*long, 1], greedy(NEW_TOKENS), adapters[0], "warm"), sink)
    engine.step()  # its prefill under way: the next request would wait for it unless scoring
    engine.submit(request([*long, 2], greedy(NEW_TOKENS, prompt_logprobs=1), adapters[0], "scored"), sink)
    engine.step()
    assert "scored" in {r.request.request_id for r in engine._rows.values()}, "it waited for the other prefill"
    run_to_end(engine)
    engine.submit(request([*long, 2], greedy(NEW_TOKENS, prompt_logprobs=1), adapters[0], "again"), sink)
    run_to_end(engine)
    engine.submit(request([*long, 2, 3], greedy(NEW_TOKENS), adapters[0], "reuses"), sink)
    run_to_end(engine)
    for request_id in ("scored", "again"):
        assert sink.events[request_id][-1].cached_tokens == 0, request_id
        assert_scored_as(first_token_event(sink, request_id).prompt_logprobs, [*long, 2],
                         reference_scores(base, adapters[0], [*long, 2]), 1)  # fmt: skip
    assert sink.events["reuses"][-1].cached_tokens == len(long) + 1  # only the scored rows hold its long, 2
    assert sink.tokens("reuses") == reference_generate(base, adapters[0], [*long, 2, 3], NEW_TOKENS)[0]


def test_a_one_token_prompt_scores_nothing_and_the_bound_holds(family_setup, tokenizer) -> None:
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    engine.submit(request([7], greedy(2, prompt_logprobs=5), None, "one"), sink)
    run_to_end(engine)
    scores = first_token_event(sink, "one").prompt_logprobs
    assert scores is not None and scores.tokens() == (PromptToken(7, None, None, ()),)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_the_engine_thread_hands_the_scores_over_unbuilt(tokenizer) -> None:
    """The step that sends a request's first token with its prompt's scores (2,045 tokens, 20 alternatives each)
    holds the engine's thread about as long as that step of the same request unscored: the scores' objects, tens a
    token, are built where the event is consumed. Built in the step, they took ~7 times its CPU time, and every
    other request's next token waited that long."""
    engine = make_engine(tiny_model(max_position_embeddings=2048), tokenizer, max_seq_len=2048, max_prefill_tokens=512)
    prompt = [3 + (7 * i) % 250 for i in range(2045)]
    events: list[TokenEvent] = []

    def first_token_step(prompt_logprobs: int | None) -> float:
        """The CPU seconds of this thread (the engine's, here) in the step that sends the request's first token."""
        sink = Collector()
        engine.submit(request(prompt, greedy(3, prompt_logprobs=prompt_logprobs)), sink)
        while not sink.events:
            before = time.thread_time()
            engine.step()
            spent = time.thread_time() - before
        run_to_end(engine)
        events.append(next(iter(sink.events.values()))[0])
        return spent

    first_token_step(20)  # each kind's first steps are slower
    first_token_step(None)
    scored = min(first_token_step(20) for _ in range(3))
    plain = min(first_token_step(None) for _ in range(3))
    assert scored < 2 * plain, (scored, plain)
    scores = events[-4].prompt_logprobs
    assert scores is not None and [t.token_id for t in scores.tokens()] == prompt
    assert all(len(t.top) == 20 for t in scores.tokens()[1:])


class ReplayedGraphs(StepGraphs):
    """StepGraphs as the engine runs it, on the CPU: each replay runs the forward its graph would have captured (no
    adapter segments, every sample index kept, the static scored-index buffer read) on the static step buffer at
    the bucket's width; counts the replays of each kind."""

    def _capture(self, forward):  # type: ignore[no-untyped-def]
        self.replays: Counter[bool] = Counter()

        def replay(width: int, scoring: bool) -> torch.Tensor:
            self.replays[scoring] += 1
            return forward(self._buffer, width, self._scored if scoring else None)

        return {(w, scoring): functools.partial(replay, w, scoring) for w in self.buckets for scoring in (False, True)}


def recorded_forwards(engine) -> list[tuple[int, torch.Tensor | None]]:
    """Each forward's width and scored positions from now on (None: none scored), the replays' included."""
    forwards: list[tuple[int, torch.Tensor | None]] = []
    forward = engine._forward

    def recorded(tensors, segments, scored=None):
        forwards.append((tensors.ids.shape[1], scored))
        return forward(tensors, segments, scored)

    engine._forward = recorded
    return forwards


Plan = list[tuple[str, list[int], SavedAdapter | None]]


def run_beside(engine: Engine, ordinary: Plan, scoring: Plan, steps: int) -> Collector:
    """The ordinary requests, a step after each, then the scoring ones (`steps` steps after each), run to the end."""
    sink = Collector()
    for request_id, prompt, adapter in ordinary:
        engine.submit(request(prompt, greedy(NEW_TOKENS + 4), adapter, request_id), sink)
        engine.step()
    for request_id, prompt, adapter in scoring:
        engine.submit(request(prompt, greedy(NEW_TOKENS, prompt_logprobs=3), adapter, request_id), sink)
        for _ in range(steps):
            engine.step()
    run_to_end(engine)
    return sink


def assert_beside_as_alone_and_peft(
    base: torch.nn.Module, runs: list[Collector], ordinary: Plan, scoring: Plan, tol: float = 1e-4
) -> None:
    """The ordinary requests answer beside the scoring ones as alone, and as PEFT does; the scoring ones' answers
    and scored prompts are PEFT's."""
    alone, beside = runs
    for request_id, prompt, adapter in ordinary:
        assert beside.tokens(request_id) == alone.tokens(request_id), request_id
        assert beside.tokens(request_id) == reference_generate(base, adapter, prompt, NEW_TOKENS + 4)[0], request_id
    for request_id, prompt, adapter in scoring:
        assert beside.tokens(request_id) == reference_generate(base, adapter, prompt, NEW_TOKENS)[0], request_id
        assert_scored_as(first_token_event(beside, request_id).prompt_logprobs, prompt,
                         reference_scores(base, adapter, prompt), 3, tol)  # fmt: skip


def test_graph_steps_and_scoring_graph_steps_interleave_on_the_cpu(family_setup, tokenizer) -> None:
    """The engine's graph path without CUDA: every step replays (a graph's layout: its bucket's width, every sample
    index's logits), those scoring a prompt their bucket's scoring graph, which keeps the logits of a static buffer
    of SCORED_TOKENS positions; both follow each other while rows decode on tokens fed from the last step. Every
    answer and scored prompt is PEFT's, and the ordinary requests answer as they do alone."""
    base, adapters = family_setup("llama")
    ordinary = [(f"o{i}", [*PROMPT[i:], 9], adapters[i % 4] if i % 3 else None) for i in range(4)]
    scoring = [(f"s{i}", [*PROMPT[2 * i :], 11 + i], adapters[(i + 1) % 4] if i % 2 else None) for i in range(3)]
    runs = []
    for extra in ([], scoring):
        engine = make_engine(base, tokenizer)
        graphs = ReplayedGraphs(engine._graph_forward, engine.config.graph_buckets(), engine._step.host,
                                engine.device, SCORED_TOKENS)  # fmt: skip
        engine._graphs = graphs
        forwards = recorded_forwards(engine)
        runs.append(run_beside(engine, ordinary, extra, steps=1))
        assert len(forwards) == graphs.replays.total() and graphs.replays[False]  # every step a replay
        assert graphs.replays[True] == sum(scored is not None for _, scored in forwards)
        assert bool(graphs.replays[True]) == bool(extra)
        assert all(width in graphs.buckets for width, _ in forwards)
        assert all(len(scored) == SCORED_TOKENS for _, scored in forwards if scored is not None)
    assert_beside_as_alone_and_peft(base, runs, ordinary, scoring)


@pytest.mark.gpu
def test_cuda_graph_steps_and_scoring_steps_interleave_as_peft(family_setup, tokenizer) -> None:
    """On CUDA with graphs: ordinary requests decode through graph replays fed on the device while requests scoring
    their prompts join, whose steps replay their buckets' scoring graphs over the same step buffers and fed tokens;
    every answer is PEFT's, every scored prompt PEFT's, and the ordinary requests answer as they do alone."""
    cpu_base, adapters = family_setup("llama")
    base = copy.deepcopy(cpu_base).cuda()
    ordinary = [(f"o{i}", [*PROMPT[i:], 9], adapters[i % 4] if i % 3 else None) for i in range(6)]
    scoring = [(f"s{i}", [*PROMPT[2 * i :], 11 + i], adapters[(i + 1) % 4] if i % 2 else None) for i in range(4)]
    runs = []
    for extra in ([], scoring):
        engine = make_engine(base, tokenizer, max_batch_size=16, cuda_graphs=True)
        assert engine._graphs is not None
        runs.append(run_beside(engine, ordinary, extra, steps=2))
    assert_beside_as_alone_and_peft(base, runs, ordinary, scoring, TOL_CUDA)
