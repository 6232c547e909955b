"""Prompt prefixes found in the KV cache: a request that starts past them answers as PEFT does for its whole prompt,
and a prefix is found only in its own scope (adapter, salt) and only where its keys and values can be trusted."""

import copy

import pytest
import torch
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end

from server.engine import GenerationRequest
from server.engine.prefix_cache import BLOCK, KVRows

NEW_TOKENS = 6
SHARED = list(range(40, 40 + 2 * BLOCK + 5))  # a "system prompt" of two blocks and a bit


# ---- the rows and their prefixes, alone ----------------------------------------------------------------------


def test_the_longest_prefix_is_found_past_its_last_whole_block() -> None:
    rows = KVRows(4, enabled=True)
    first = rows.take("s", [*SHARED, 1])
    assert first.reused == 0
    rows.wrote(first.row, "s", [*SHARED, 1], len(SHARED) + 1)
    rows.give_back(first.row, keep=True)
    again = rows.take("s", [*SHARED, 2, 3])
    assert again == type(again)(first.row, len(SHARED))  # in place: the free row that holds it, nothing to copy


def test_a_prompt_keeps_its_last_token_to_compute() -> None:
    rows = KVRows(2, enabled=True)
    place = rows.take("s", SHARED)
    rows.wrote(place.row, "s", SHARED, len(SHARED))
    rows.give_back(place.row, keep=True)
    assert rows.take("s", SHARED).reused == len(SHARED) - 1  # its logits are the first token


def test_a_running_rows_prefix_is_copied_into_a_free_row() -> None:
    rows = KVRows(3, enabled=True)
    running = rows.take("s", [*SHARED, 9])
    rows.wrote(running.row, "s", [*SHARED, 9], 2 * BLOCK)  # prefilled two blocks so far
    place = rows.take("s", [*SHARED, 8])
    assert place.source == running.row and place.row != running.row and place.reused == 2 * BLOCK


def test_scopes_share_nothing() -> None:
    rows = KVRows(3, enabled=True)
    place = rows.take(("a@1", None), [*SHARED, 1])
    rows.wrote(place.row, ("a@1", None), [*SHARED, 1], len(SHARED) + 1)
    rows.give_back(place.row, keep=True)
    for scope in (("b@1", None), ("a@1", "salt"), (None, None)):
        assert rows.take(scope, [*SHARED, 2]).reused == 0


def test_tokens_whose_hashes_collide_are_no_prefix() -> None:
    """Python hashes an int modulo 2**61 - 1, so 0 and 2**61 - 1 make the same block hash: a client choosing tokens
    to collide with another's prompt must find nothing."""
    assert hash(2**61 - 1) == hash(0)
    colliding = [2**61 - 1] * BLOCK + [7]
    rows = KVRows(3, enabled=True)
    place = rows.take("s", colliding)
    rows.wrote(place.row, "s", colliding, len(colliding))
    rows.give_back(place.row, keep=True)
    assert rows.take("s", [0] * BLOCK + [7, 8]).reused == 0


def test_a_row_given_back_untrusted_holds_nothing_and_blank_rows_go_first() -> None:
    rows = KVRows(3, enabled=True)
    kept, dropped = rows.take("s", [*SHARED, 1]), rows.take("s", [5] * 40)
    rows.wrote(kept.row, "s", [*SHARED, 1], len(SHARED))
    rows.wrote(dropped.row, "s", [5] * 40, 40)
    rows.give_back(kept.row, keep=True)
    rows.give_back(dropped.row, keep=False)
    assert rows.take("s", [5] * 40).reused == 0
    assert rows.take("s", [6] * 40).row != kept.row  # the last blank row, before the one holding a prefix
    assert rows.take("s", [*SHARED, 2]).reused == len(SHARED)


def test_a_prompt_waits_for_a_prefill_that_will_hold_more_of_it() -> None:
    rows = KVRows(3, enabled=True)
    first = rows.take("s", [*SHARED, 1])
    assert rows.worth_waiting("s", [*SHARED, 2])  # nothing written yet: two blocks and more are coming
    assert not rows.worth_waiting("other", [*SHARED, 2]) and not rows.worth_waiting("s", [7, *SHARED])
    rows.wrote(first.row, "s", [*SHARED, 1], BLOCK + 3)
    assert rows.worth_waiting("s", [*SHARED, 2])  # a block written, a block and more to come
    rows.wrote(first.row, "s", [*SHARED, 1], 2 * BLOCK + 1)
    assert not rows.worth_waiting("s", [*SHARED, 2])  # less than a block to come: taken now, the rest computed
    assert rows.take("s", [*SHARED, 2]).reused == 2 * BLOCK + 1
    cancelled = rows.take("t", [*SHARED, 3])
    rows.give_back(cancelled.row, keep=False)
    assert not rows.worth_waiting("t", [*SHARED, 4])


def test_a_client_sending_prompt_after_prompt_writes_over_its_own_rows_first() -> None:
    """Three rows: one holds another client's prefix; a client sending one new prompt after another recycles the
    rows it left while it holds more free rows than that client, so the prefix survives. Plain LRU wrote over it
    at the flood's third prompt."""
    rows = KVRows(3, enabled=True)
    mine = rows.take("s", [*SHARED, 1])
    rows.wrote(mine.row, "s", [*SHARED, 1], len(SHARED))
    rows.give_back(mine.row, keep=True, client="honest")
    for i in range(10):
        prompt = [100 + i] * 40
        place = rows.take("s", prompt)
        assert place.reused == 0 and place.row != mine.row, i
        rows.wrote(place.row, "s", prompt, 40)
        rows.give_back(place.row, keep=True, client="flood")
    assert rows.take("s", [*SHARED, 2]) == type(mine)(mine.row, len(SHARED))
    rows.wrote(mine.row, "s", [*SHARED, 2], len(SHARED) + 1)
    rows.give_back(mine.row, keep=True, client="honest")  # the flood holds 2 free rows, the honest client 1
    assert rows.take("t", [7] * 40).row != mine.row


def test_disabled_keeps_nothing() -> None:
    rows = KVRows(2, enabled=False)
    place = rows.take("s", [*SHARED, 1])
    rows.wrote(place.row, "s", [*SHARED, 1], len(SHARED))
    rows.give_back(place.row, keep=True)
    assert rows.take("s", [*SHARED, 1]) == type(place)(0)


# ---- the engine, against PEFT --------------------------------------------------------------------------------


def cached(sink: Collector, request_id: str) -> int:
    return sink.events[request_id][-1].cached_tokens


def test_a_later_request_starts_past_a_finished_ones_prompt_and_answer(family_setup, tokenizer) -> None:
    """The second turn of a chat: the first prompt, its answer and a new question. Its prefill starts past the
    first request's prompt and answer (all but the answer's last token, whose KV no step wrote), and it answers as
    PEFT does for the whole prompt."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    engine.submit(request(SHARED, greedy(NEW_TOKENS), adapters[1], "turn1"), sink)
    run_to_end(engine)
    second = SHARED + sink.tokens("turn1") + [3, 4]
    engine.submit(request(second, greedy(NEW_TOKENS), adapters[1], "turn2"), sink)
    run_to_end(engine)
    assert cached(sink, "turn1") == 0
    assert cached(sink, "turn2") == len(SHARED) + NEW_TOKENS - 1
    assert sink.tokens("turn2") == reference_generate(base, adapters[1], second, NEW_TOKENS)[0]


@pytest.mark.parametrize(
    ("family", "device", "kernels"),
    [
        ("llama", "cpu", False),
        ("qwen2", "cpu", False),
        # Triton's interpreter runs the kernels on CPU tensors only where CUDA is absent; the cuda case runs them
        pytest.param("llama", "cpu", True, marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")),
        pytest.param("llama", "cuda", None, marks=pytest.mark.gpu),
    ],
    ids=["llama", "qwen2", "kernels", "cuda"],
)
def test_requests_sharing_a_running_ones_prefix_match_peft(family, device, kernels, family_setup, tokenizer) -> None:
    """Requests arriving while another with their prefix decodes (or still prefills) copy its rows' keys and
    values; each answer, theirs and the source's, is PEFT's for its whole prompt. With the decode kernels (Triton's
    interpreter on the CPU) a prompt's first computed token sits past its copied prefix in their steps; on CUDA the
    copies are queued behind steps in flight, and every step replays a graph."""
    base, adapters = family_setup(family)
    base = copy.deepcopy(base).to(device)
    engine = make_engine(base, tokenizer, max_prefill_tokens=16, fused_kernels=kernels)
    sink = Collector()
    plan = [(f"r{i}", SHARED + [60 + i] * (i + 1)) for i in range(4)]
    for request_id, prompt in plan:
        engine.submit(request(prompt, greedy(NEW_TOKENS), adapters[0], request_id), sink)
        for _ in range(2):
            engine.step()
    run_to_end(engine)
    assert cached(sink, "r0") == 0 and all(cached(sink, rid) > BLOCK for rid, _ in plan[1:])
    for request_id, prompt in plan:
        assert sink.tokens(request_id) == reference_generate(base, adapters[0], prompt, NEW_TOKENS)[0], request_id


def test_one_clients_stream_of_new_prompts_leaves_anothers_prefix_cached(family_setup, tokenizer) -> None:
    """Three rows; a client's prefix stays cached while another client sends six new prompts one after another
    (each request's client reaches the rows as they are given back), and its next request starts past it and
    answers as PEFT does."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=3)
    sink = Collector()
    for request_id, prompt, client in [
        ("h0", [*SHARED, 1], "honest"),
        *((f"f{i}", [70 + i] * 40, "flood") for i in range(6)),
        ("h1", [*SHARED, 2], "honest"),
    ]:
        mine = request(prompt, greedy(NEW_TOKENS), adapters[0], request_id)
        mine.client = client
        engine.submit(mine, sink)
        run_to_end(engine)
    assert cached(sink, "h1") == len(SHARED)
    assert sink.tokens("h1") == reference_generate(base, adapters[0], [*SHARED, 2], NEW_TOKENS)[0]


def test_a_burst_sharing_a_prompt_computes_it_once(family_setup, tokenizer) -> None:
    """Requests sent at once with one long prompt prefix: the first computes it, the others wait for its prefill and
    copy it (each would otherwise compute it beside the first, taking a share of every step's prompt budget)."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    plan = [(f"b{i}", [*SHARED, 60 + i, 61]) for i in range(4)]
    for request_id, prompt in plan:
        engine.submit(request(prompt, greedy(NEW_TOKENS), adapters[1], request_id), sink)
    run_to_end(engine)
    counts = sorted(cached(sink, rid) for rid, _ in plan)
    assert counts[0] == 0 and all(c >= 2 * BLOCK for c in counts[1:]), counts  # the whole blocks of SHARED
    for request_id, prompt in plan:
        assert sink.tokens(request_id) == reference_generate(base, adapters[1], prompt, NEW_TOKENS)[0], request_id


def test_a_request_waiting_for_a_prefill_that_is_cancelled_computes_its_prompt(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_prefill_tokens=4)
    sink = Collector()
    engine.submit(request([*SHARED, 1], greedy(NEW_TOKENS), adapters[1], "source"), sink)
    engine.submit(request([*SHARED, 2], greedy(NEW_TOKENS), adapters[1], "waiting"), sink)
    engine.step()  # the source writes its first 16 tokens; the other waits
    assert engine.num_waiting == 1
    engine.cancel("source")
    run_to_end(engine)
    assert sink.finish("source") == "cancelled" and cached(sink, "waiting") == BLOCK
    assert sink.tokens("waiting") == reference_generate(base, adapters[1], [*SHARED, 2], NEW_TOKENS)[0]


def test_a_request_failing_at_admission_leaves_its_adapter_slot_to_others(family_setup, tokenizer) -> None:
    """A fault after the request's slot was taken (here: copying the prefix it found) ends that request alone, and
    its hold on the slot with it: with one slot, another adapter's request then runs (it waited forever before)."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_active_adapters=1)
    sink = Collector()
    engine.submit(request([*SHARED, 1], greedy(12), adapters[0], "source"), sink)
    engine.step()  # the source's prompt is written; it decodes

    def broken(*args: object) -> None:
        raise RuntimeError("copy failed")

    engine.cache.copy_prefix = broken
    engine.submit(request([*SHARED, 2], greedy(NEW_TOKENS), adapters[0], "copies"), sink)
    engine.step()
    engine.step()
    assert sink.finish("copies") == "error" and "copy failed" in str(sink.events["copies"][-1].error)
    engine.submit(request([5, 6, 7], greedy(NEW_TOKENS), adapters[2], "other-adapter"), sink)
    run_to_end(engine)
    assert sink.tokens("source") == reference_generate(base, adapters[0], [*SHARED, 1], 12)[0]
    assert sink.tokens("other-adapter") == reference_generate(base, adapters[2], [5, 6, 7], NEW_TOKENS)[0]


def test_a_row_holding_less_than_a_block_is_written_over_first() -> None:
    rows = KVRows(2, enabled=True)
    kept, short = rows.take("s", [*SHARED, 1]), rows.take("s", [4, 5, 6])
    rows.wrote(kept.row, "s", [*SHARED, 1], len(SHARED))
    rows.wrote(short.row, "s", [4, 5, 6], 2)
    rows.give_back(kept.row, keep=True)
    rows.give_back(short.row, keep=True)  # it holds no whole block: blank again, not before `kept` in the LRU
    assert rows.take("s", [9] * 20).row == short.row
    assert rows.take("s", [*SHARED, 2]).reused == len(SHARED)


def test_a_prefix_is_found_only_under_its_adapter_and_salt(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    engine.submit(request([*SHARED, 1], greedy(NEW_TOKENS), adapters[0], "first"), sink)
    run_to_end(engine)
    others = {
        "other-adapter": request([*SHARED, 2], greedy(NEW_TOKENS), adapters[2], "other-adapter"),
        "base": request([*SHARED, 2], greedy(NEW_TOKENS), None, "base"),
        "salted": GenerationRequest(
            [*SHARED, 2],
            greedy(NEW_TOKENS),
            adapters[0].key,
            adapters[0].weights,
            request_id="salted",
            cache_salt="client-b",
        ),
    }
    for r in others.values():
        engine.submit(r, sink)
    run_to_end(engine)
    for request_id, r in others.items():
        assert cached(sink, request_id) == 0, request_id
        adapter = next((a for a in adapters if a.key == r.adapter_key), None)
        assert sink.tokens(request_id) == reference_generate(base, adapter, r.prompt_ids, NEW_TOKENS)[0]


def test_the_rows_of_a_failed_step_serve_no_later_prompt(family_setup, tokenizer) -> None:
    """A step that fails may have written part of its rows' keys and values: those rows hold no prefix after it."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_prefill_tokens=BLOCK)
    forward, calls = engine._forward, []

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # a step after the one that wrote the prompt
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    engine._forward = third_fails
    sink = Collector()
    engine.submit(request(SHARED, greedy(NEW_TOKENS), adapters[0], "failed"), sink)
    run_to_end(engine)
    assert sink.finish("failed") == "error"
    engine._forward = forward
    engine.submit(request([*SHARED, 1], greedy(NEW_TOKENS), adapters[0], "after"), sink)
    run_to_end(engine)
    assert cached(sink, "after") == 0
    assert sink.tokens("after") == reference_generate(base, adapters[0], [*SHARED, 1], NEW_TOKENS)[0]


def test_without_the_cache_nothing_is_reused(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, prefix_cache=False)
    sink = Collector()
    for request_id in ("a", "b"):
        engine.submit(request([*SHARED, 1], greedy(NEW_TOKENS), adapters[0], request_id), sink)
        run_to_end(engine)
    assert cached(sink, "b") == 0 and sink.tokens("a") == sink.tokens("b")
