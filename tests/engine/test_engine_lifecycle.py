"""Admission limits, cancellation, seeded sampling, stop sequences and slot deactivation on the engine."""

import copy
import threading
from dataclasses import replace

import pytest
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end

from adapters.lora import LoraModule, LoraWeights
from server.engine import (
    AdapterTooLarge,
    Engine,
    EngineConfig,
    GenerationRequest,
    KVCacheTooLarge,
    PromptTooLong,
    SamplingParams,
)


def test_rank_above_max_lora_rank_is_refused(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_lora_rank=8)  # "ko-r16" has rank 16
    with pytest.raises(AdapterTooLarge, match="max_lora_rank 8"):
        engine.submit(request([5, 6], greedy(2), adapters[3]), Collector())
    assert engine.num_waiting == 0


def test_adapter_for_a_module_the_model_lacks_is_refused(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    module = next(iter(adapters[0].weights.modules.values()))
    stray = LoraWeights({"model.layers.9.self_attn.q_proj": module})
    engine = make_engine(base, tokenizer)
    with pytest.raises(AdapterTooLarge, match=r"layers\.9"):
        engine.submit(GenerationRequest([5], greedy(2), "stray@1", stray), Collector())
    weird = LoraWeights({"model.layers.0.self_attn.q_proj": LoraModule(module.a[:, :8], module.b, 1.0)})
    with pytest.raises(AdapterTooLarge, match="features"):
        engine.check_adapter(weird)


def test_prompt_longer_than_a_kv_row_is_refused(family_setup, tokenizer) -> None:
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer, max_seq_len=32)
    with pytest.raises(PromptTooLong, match="max_seq_len 32"):
        engine.submit(request([5] * 30, greedy(3)), Collector())


def test_cancel_frees_the_row_at_the_next_step(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_batch_size=1)
    sink = Collector()
    engine.submit(request([5, 6, 7], greedy(40), adapters[0], "long"), sink)
    engine.submit(request([8, 9], greedy(4), None, "next"), sink)
    for _ in range(3):
        engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1  # one row only: "next" waits
    engine.cancel("long")
    run_to_end(engine)
    assert sink.finish("long") == "cancelled"
    assert len(sink.tokens("long")) < 40
    assert sink.tokens("next") == reference_generate(base, None, [8, 9], 4)[0]  # it got the freed row
    assert engine.num_running == 0


def test_seeded_sampling_does_not_depend_on_the_batch(family_setup, tokenizer) -> None:
    base, adapters = family_setup("gemma")
    params = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=7, ignore_eos=True)
    alone = make_engine(base, tokenizer)
    sink = Collector()
    alone.submit(request([5, 6, 7], params, adapters[1], "x"), sink)
    run_to_end(alone)
    crowded = make_engine(base, tokenizer)
    sink2 = Collector()
    for i in range(5):
        other = SamplingParams(max_new_tokens=12, temperature=1.0, seed=i, ignore_eos=True)
        crowded.submit(request([9 + i], other, adapters[i % 4], f"o{i}"), sink2)
    crowded.submit(request([5, 6, 7], params, adapters[1], "x"), sink2)
    run_to_end(crowded)
    assert sink2.tokens("x") == sink.tokens("x")
    assert all(lp <= 0 for lp in sink.logprobs("x"))


def test_stop_sequence_ends_the_request_and_is_cut_from_the_text(family_setup, tokenizer) -> None:
    base, _ = family_setup("qwen3")
    prompt = tokenizer("stop here")["input_ids"]
    tokens, _ = reference_generate(base, None, prompt, 10)
    text = tokenizer.decode(tokens)
    stop = text[4:6]  # a piece of what greedy decoding will say
    engine = make_engine(base, tokenizer)
    sink = Collector()
    engine.submit(request(prompt, greedy(10, stop=(stop,)), None, "s"), sink)
    run_to_end(engine)
    out = "".join(e.text for e in sink.events["s"])
    assert sink.finish("s") == "stop" and sink.events["s"][-1].stop_reason == stop  # vLLM's: what ended it
    assert out == text[: text.index(stop)]


def test_eos_ends_the_request(family_setup, tokenizer) -> None:
    base, _ = family_setup("llama")
    prompt = [5, 6, 7]
    first = reference_generate(base, None, prompt, 1)[0][0]
    engine = make_engine(base, tokenizer)
    engine.eos_ids = frozenset({first})  # make the first greedy token the end of sequence
    sink = Collector()
    engine.submit(request(prompt, SamplingParams(max_new_tokens=5), None, "e"), sink)
    run_to_end(engine)
    assert sink.finish("e") == "stop" and sink.tokens("e") == [first]
    assert sink.events["e"][-1].stop_reason is None  # vLLM's: none names the end of sequence


def test_a_stop_token_ends_the_request_at_its_first_draw_without_its_text(family_setup, tokenizer) -> None:
    """vLLM's stop_token_ids: the answer ends at the first of them drawn, as at the end of sequence (its text left
    out, unless include_stop_str_in_output), whatever ignore_eos says; a seeded sample draws the same tokens up to
    there."""
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    sink = Collector()
    sampled = {"max_new_tokens": 12, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    engine.submit(request([5, 6, 7], SamplingParams(**sampled), adapters[1], "free"), sink)
    run_to_end(engine)
    tokens = sink.tokens("free")
    # a token drawn first past the first, a whole character after whole characters (the stream holds back a part)
    whole = [i for i in range(1, len(tokens)) if not tokenizer.decode(tokens[:i]).endswith("\ufffd")]
    cut = next(i for i in whole if tokens[i] not in tokens[:i] and "\ufffd" not in tokenizer.decode(tokens[i : i + 1]))
    params = SamplingParams(**sampled, stop_token_ids=frozenset({tokens[cut], 0}) - set(tokens[:cut]))
    engine.submit(request([5, 6, 7], params, adapters[1], "stopped"), sink)
    run_to_end(engine)
    engine.submit(request([5, 6, 7], replace(params, include_stop_str_in_output=True), adapters[1], "kept"), sink)
    run_to_end(engine)
    for name in ("stopped", "kept"):
        assert sink.tokens(name) == tokens[: cut + 1] and sink.finish(name) == "stop"
        assert sink.events[name][-1].stop_reason == tokens[cut]  # vLLM's: the stop token's id
    assert sink.events["free"][-1].stop_reason is None  # ended by length
    assert "".join(e.text for e in sink.events["stopped"]) == tokenizer.decode(tokens[:cut])
    assert "".join(e.text for e in sink.events["kept"]) == tokenizer.decode(tokens[: cut + 1])


def test_deactivate_frees_the_slot(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer, max_active_adapters=1)
    sink = Collector()
    engine.submit(request([5], greedy(2), adapters[0], "a"), sink)
    run_to_end(engine)
    assert engine.active_adapters() == {adapters[0].key: 0}
    engine.deactivate(adapters[0].key)
    engine.step()
    assert engine.active_adapters() == {}


def test_a_fault_admitting_one_request_ends_it_alone(family_setup, tokenizer) -> None:
    """A failure outside a forward (here: the activation hook raises while the adapter is admitted) ends that
    request with an error; the request beside it finishes as if alone, and the engine serves later ones."""
    base, adapters = family_setup("llama")

    def broken_hook(key: str, slot: int, seconds: float) -> None:
        raise RuntimeError("metrics sink broke")

    engine = Engine(
        copy.deepcopy(base),
        tokenizer,
        EngineConfig(max_batch_size=2, max_active_adapters=2, max_lora_rank=16, max_seq_len=64),
        on_activation=broken_hook,
    )
    sink, finished = Collector(), threading.Semaphore(0)

    def record(event) -> None:
        sink(event)
        if event.finish_reason is not None:
            finished.release()

    engine.submit(request([5, 6, 7], greedy(4), None, "base"), record)
    engine.submit(request([5, 6, 7], greedy(4), adapters[0], "lora"), record)
    engine.start()
    try:
        assert finished.acquire(timeout=30) and finished.acquire(timeout=30), "requests were left hanging"
        assert sink.finish("lora") == "error" and isinstance(sink.events["lora"][-1].error, RuntimeError)
        assert sink.finish("base") == "length"
        assert sink.tokens("base") == reference_generate(base, None, [5, 6, 7], 4)[0]
        assert engine.alive and engine.active_adapters() == {}  # the half-activated slot was given back
        engine.submit(request([1, 2], greedy(2), None, "late"), record)
        assert finished.acquire(timeout=30) and sink.finish("late") == "length"
    finally:
        engine.stop()


def test_a_kv_cache_that_cannot_fit_is_refused_at_start(family_setup, tokenizer) -> None:
    base, _ = family_setup("llama")
    with pytest.raises(KVCacheTooLarge, match="lower --max-batch-size or --max-seq-len"):
        make_engine(base, tokenizer, max_batch_size=1024, max_seq_len=10**8)  # petabytes: never allocated
