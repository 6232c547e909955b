"""One request's values never reach another's: stale or poisoned KV cache positions, a slot holding NaN,
a seed or top_k the engine cannot execute. Every honest row still equals PEFT's answer."""

import copy

import pytest
import torch
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end, sample_batch

from adapters.lora import LoraModule, LoraWeights
from server.engine import GenerationRequest, SamplingParams, multilora
from server.engine.errors import AdapterNotFinite, InvalidSampling
from server.engine.multilora import LoraContext, MultiLoraLinear, ShrinkGroup
from server.engine.step import StepBuffer


def test_nan_everywhere_in_the_kv_cache_outside_the_prefixes_changes_nothing(family_setup, tokenizer) -> None:
    """What earlier (or faulty) requests left in the cache is never read: fill it with NaN first."""
    base, adapters = family_setup("mistral")
    engine = make_engine(base, tokenizer)
    for layer in engine.cache.k + engine.cache.v:
        layer.fill_(float("nan"))
    sink = Collector()
    plan = [(adapters[0], [5, 6, 7, 8]), (None, [9, 10]), (adapters[1], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20])]
    for i, (adapter, prompt) in enumerate(plan):
        engine.submit(request(prompt, greedy(6), adapter, f"r{i}"), sink)
    run_to_end(engine)
    for i, (adapter, prompt) in enumerate(plan):
        assert sink.tokens(f"r{i}") == reference_generate(base, adapter, prompt, 6)[0], f"row {i}"


@pytest.mark.parametrize("path", ["segments", "dense", "kernels"])
def test_a_slot_holding_nan_reaches_no_other_token(path, monkeypatch) -> None:
    """Every LoRA path of a step past the per-row kernels: runs of tokens per slot (eager), every slot at once
    (captured steps) and, where the kernels are installed, the segmented kernels (each tile of tokens times each
    slot among them)."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: Triton's CPU interpreter without CUDA
    slots, rank, d_in, d_out = 3, 4, 8, 6
    a = torch.randn(slots + 1, rank, d_in, device=device)
    b = torch.randn(slots + 1, rank, d_out, device=device)
    a[slots], b[slots] = 0, 0  # the no-adapter slot
    context = LoraContext(slots, rank)
    segments = path == "segments"
    if path == "kernels":
        from server.engine.kernels import FusedDecode

        monkeypatch.setattr(multilora, "KERNEL_TOKENS", 0)  # every step past the per-row kernels
        context.decode_kernels = FusedDecode()
        context.slot_ranks = torch.tensor([rank] * slots + [0], dtype=torch.int32, device=device)
    base = torch.nn.Linear(d_in, d_out, device=device)
    layer = MultiLoraLinear(base, d_in, d_out, a, b, context, ShrinkGroup(a, b, [base]), 0)
    token_slots = torch.tensor([0, 0, 1, 2, 3, 3], device=device)  # a run per slot; slot 3 is the base model
    x = torch.randn(1, len(token_slots), d_in, device=device)
    runs = [(0, 0, 2), (1, 2, 3), (2, 3, 4)]
    context.set(token_slots, runs if segments else None)
    clean = layer(x)
    # A is what every token's shrink meets in the dense path; B only ever holds finite values (packs are checked)
    a[1, 0, 0], a[1, 1, 3] = float("nan"), float("inf")
    context.set(token_slots, runs if segments else None)
    poisoned = layer(x)
    others = token_slots != 1
    assert torch.equal(poisoned[0, others], clean[0, others])
    assert not torch.isfinite(poisoned[0, ~others]).all()


def test_an_adapter_not_finite_in_the_serving_dtype_is_refused(family_setup, tokenizer) -> None:
    base, adapters = family_setup("llama")
    engine = make_engine(base, tokenizer)
    name, module = next(iter(adapters[0].weights.modules.items()))
    huge = LoraWeights({name: LoraModule(module.a, module.b * 3e38, module.scaling)})  # finite in fp32, not scaled
    with pytest.raises(AdapterNotFinite):
        engine.submit(GenerationRequest([5, 6], greedy(2), "huge@1", huge), Collector())


def test_a_seed_beyond_the_generator_is_refused_and_the_engine_serves_on(family_setup, tokenizer) -> None:
    base, _ = family_setup("llama")
    engine = make_engine(base, tokenizer)
    with pytest.raises(InvalidSampling, match="seed"):
        engine.submit(request([5, 6], SamplingParams(max_new_tokens=2, temperature=1.0, seed=2**64)), Collector())
    with pytest.raises(InvalidSampling, match="token ids"):
        engine.submit(request([5, 10**9], greedy(2)), Collector())
    sink = Collector()
    engine.submit(request([5, 6], greedy(3), None, "after"), sink)
    run_to_end(engine)
    assert sink.tokens("after") == reference_generate(base, None, [5, 6], 3)[0]


def test_top_k_beyond_the_vocabulary_means_all_of_it() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    params = [SamplingParams(temperature=1.0, top_k=100_000, seed=1), SamplingParams(temperature=1.0, seed=1)]
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    tokens, logprobs = sample_batch(logits[[0, 0]], params, [None, None], generators)
    assert tokens[0] == tokens[1] and logprobs[0] == logprobs[1]


def test_non_finite_sampling_values_are_refused() -> None:
    for bad in ({"temperature": float("nan")}, {"top_p": float("nan")}, {"repetition_penalty": float("inf")}):
        with pytest.raises(ValueError, match="finite"):
            SamplingParams(**bad)


def test_step_layout_groups_tokens_by_slot_and_pads_to_the_dummy_row() -> None:
    from server.engine.step import Sequence

    buffer = StepBuffer(max_tokens=8, max_seqs=3, dummy_row=9, no_adapter=4, pin=False)
    seqs = [Sequence(0, 1, [7], 3, True), Sequence(2, 1, [5, 6, 7], 0, False), Sequence(1, 4, [8], 5, True)]
    segments = buffer.fill(seqs, width=6)
    t = buffer.views(buffer.host, 6, sampled=2)
    assert segments == [(1, 0, 4)]  # the two slot-1 sequences form one run; base tokens none
    assert t.ids[0].tolist() == [7, 5, 6, 7, 8, 0]
    assert t.positions[0].tolist() == [3, 0, 1, 2, 5, 0]
    assert t.write_rows.tolist() == [0, 2, 2, 2, 1, 9]  # the padding token writes to the dummy row
    assert t.slots.tolist() == [1, 1, 1, 1, 4, 4]
    assert t.query_start.tolist() == [0, 1, 4, 5]
    assert t.seq_rows.tolist() == [0, 2, 1] and t.seq_lens.tolist() == [4, 3, 6]
    assert t.sample_index.tolist() == [0, 4]
    assert t.feed.tolist() == [-1] * 6  # every id on the host
    copy.deepcopy(t)  # views of one buffer: plain tensors
    first, contents = buffer.host, buffer.host.clone()
    # a narrower step sees as many sequences as it has tokens at most: the attention is sized by them; its decode
    # token is the previous step's second draw, fed on the device
    buffer.fill([Sequence(2, 1, [0], 4, True, feed=1)], width=2)
    t = buffer.views(buffer.host, 2)
    assert t.query_start.tolist() == [0, 1, 1] and t.seq_rows.tolist() == [2, 9] and t.seq_lens.tolist() == [5, 0]
    assert t.feed.tolist() == [1, -1]
    # written in the other host buffer: the first step's may still be on its way to the device
    assert buffer.host is not first and torch.equal(first, contents)
