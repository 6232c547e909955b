"""CUDA only: the decode step captured in CUDA graphs gives PEFT's tokens, including adapters activated after
capture (slot copies into static buffers, no recapture), in fp32 and with an NF4 base; in bf16 (nf4_mma), the
grouped q/k/v and gate/up launches give what one launch a layer gives, and past 16 rows (nf4_wide) the projections
finished in its epilogue what their own launch after it gives."""

import copy
import dataclasses

import pytest
import torch
from enginekit import Collector, greedy, make_engine, reference_generate, request, run_to_end
from tiny import save_tiny
from transformers import AutoModelForCausalLM

from loraplex.basemodel import nf4_config
from server.engine import SamplingParams, kernels
from server.engine.kernels import FusedDecode, nf4
from server.engine.kernels.nf4 import FusedNf4Linear

pytestmark = pytest.mark.gpu


def run_mixed(engine, adapters, prompt, new_tokens):
    sink = Collector()
    rows = [*adapters, None, *adapters]
    for i, adapter in enumerate(rows):
        engine.submit(request([*prompt, 3 + i], greedy(new_tokens), adapter, f"r{i}"), sink)
    run_to_end(engine)
    return rows, sink


def test_cuda_graph_decode_matches_peft(family_setup, tokenizer) -> None:
    cpu_base, adapters = family_setup("llama")
    base = copy.deepcopy(cpu_base).cuda()
    engine = make_engine(base, tokenizer, max_batch_size=16, cuda_graphs=True)
    assert engine._graphs is not None
    prompt = tokenizer("graphs on the gpu")["input_ids"]
    rows, sink = run_mixed(engine, adapters, prompt, 8)
    for i, adapter in enumerate(rows):
        assert sink.tokens(f"r{i}") == reference_generate(base, adapter, [*prompt, 3 + i], 8)[0], f"row {i}"


def test_graph_steps_fed_on_the_device_end_and_reuse_rows_as_peft(family_setup, tokenizer) -> None:
    """Each step is launched before the host reads the last one's tokens: requests of many lengths ending by
    length or by EOS (a step in vain after it) in a few rows, later ones taking the rows freed, give PEFT's tokens."""
    cpu_base, adapters = family_setup("llama")
    base = copy.deepcopy(cpu_base).cuda()
    engine = make_engine(base, tokenizer, max_batch_size=4, cuda_graphs=True)
    prompts = [[4 + i, 9, 2 + i % 3] for i in range(10)]
    runs = [(prompt, adapters[i % len(adapters)] if i % 3 else None, 2 + i % 8) for i, prompt in enumerate(prompts)]
    references = [reference_generate(base, adapter, prompt, n)[0] for prompt, adapter, n in runs]
    eos = max(references, key=len)[2]  # the longest request ends by EOS at its third token
    engine.eos_ids = frozenset({eos})
    sink = Collector()
    for i, (prompt, adapter, n) in enumerate(runs):
        engine.submit(request(prompt, SamplingParams(max_new_tokens=n), adapter, f"r{i}"), sink)
    run_to_end(engine)
    ended_by_eos = 0
    for i, tokens in enumerate(references):
        expected = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        ended_by_eos += eos in tokens and len(expected) < len(tokens)
        assert sink.tokens(f"r{i}") == expected, f"request {i}"
        assert sink.finish(f"r{i}") == ("stop" if eos in tokens else "length")
    assert ended_by_eos, "no request ended by EOS before its length"


def test_a_row_paused_for_another_client_resumes_on_graphs_as_peft(family_setup, tokenizer) -> None:
    """Every row decoding one client's answers: another client's request pauses one (its keys and values to host
    memory, with the step launched before it taken first), and the paused row, resumed into a row of the device
    cache, goes on with PEFT's tokens."""
    cpu_base, adapters = family_setup("llama")
    base = copy.deepcopy(cpu_base).cuda()
    engine = make_engine(base, tokenizer, max_batch_size=2, cuda_graphs=True)
    sink = Collector()
    runs = {"h0": ([5, 6, 7, 8], adapters[0], 24), "h1": ([5, 6, 7, 9], adapters[1], 25), "g": ([9, 10], None, 5)}
    for rid in ("h0", "h1"):
        prompt, adapter, n = runs[rid]
        engine.submit(dataclasses.replace(request(prompt, greedy(n), adapter, rid), client="hog"), sink)
    while not all(len(sink.events.get(rid, ())) >= 3 for rid in ("h0", "h1")):
        engine.step()
    prompt, adapter, n = runs["g"]
    engine.submit(dataclasses.replace(request(prompt, greedy(n), adapter, "g"), client="guest"), sink)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1, "no row was paused for the other client"
    run_to_end(engine)
    for rid, (prompt, adapter, n) in runs.items():
        assert sink.tokens(rid) == reference_generate(base, adapter, prompt, n)[0], rid


def nf4_tiny_llama(tmp_path, dtype: torch.dtype) -> torch.nn.Module:
    """save_tiny's seed-0 llama (the family_setup adapters fit it) loaded in NF4 on CUDA, computing in `dtype`."""
    load = dict(quantization_config=nf4_config(dtype), dtype=dtype, device_map={"": "cuda"})
    return AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "llama", "llama"), **load).eval()


def test_nf4_graphs_match_eager(tmp_path, family_setup, tokenizer) -> None:
    _, adapters = family_setup("llama")  # same seed-0 tiny llama as save_tiny, so the adapters fit
    base = nf4_tiny_llama(tmp_path, torch.float32)
    prompt = tokenizer("nf4 base")["input_ids"]
    outputs = []
    for graphs in (True, False):
        engine = make_engine(base, tokenizer, max_batch_size=16, cuda_graphs=graphs)
        rows, sink = run_mixed(engine, adapters, prompt, 8)
        outputs.append([sink.tokens(f"r{i}") for i in range(len(rows))])
    assert outputs[0] == outputs[1]
    for i, adapter in enumerate(rows):
        assert outputs[0][i] == reference_generate(base, adapter, [*prompt, 3 + i], 8)[0], f"row {i}"


def test_bf16_grouped_launches_match_one_launch_a_layer(tmp_path, family_setup, tokenizer, monkeypatch) -> None:
    """A bf16 NF4 engine (nf4_mma serves its decode steps) with and without the grouped launches: the same tokens
    and logprobs, bit for bit (the tiny model's projections take one launch configuration either way)."""
    _, adapters = family_setup("llama")
    base = nf4_tiny_llama(tmp_path, torch.bfloat16)
    prompt = tokenizer("nf4 in bf16")["input_ids"]
    outputs = []
    for grouped in (True, False):
        with monkeypatch.context() as patch:
            if not grouped:  # every layer its own launch, as before the grouped launches
                patch.setattr(FusedDecode, "linears", lambda self, *args: None)
            engine = make_engine(base, tokenizer, max_batch_size=16, cuda_graphs=True)
            assert any(isinstance(m, FusedNf4Linear) for m in engine.model.modules())
            rows, sink = run_mixed(engine, adapters, prompt, 8)
            segments = engine._lora_context.decode_kernels._segments.values()  # the groups' launches, once built
            assert any(s is not None for s in segments) == grouped
        outputs.append([(sink.tokens(f"r{i}"), sink.logprobs(f"r{i}")) for i in range(len(rows))])
    assert outputs[0] == outputs[1]


def test_bf16_steps_past_nf4_mma_finish_in_nf4_wide_as_after_it(tmp_path, family_setup, tokenizer, monkeypatch) -> None:
    """24 rows a decode step (past nf4_mma's 16: nf4_wide), the projections finished in nf4_wide's epilogue (the
    rows' deltas and the residual; K is in one part for every weight of the tiny model) and by their own launch
    after nf4_wide's sums: the same tokens, logprobs within bf16 roundings."""
    _, adapters = family_setup("llama")
    base = nf4_tiny_llama(tmp_path, torch.bfloat16)
    prompt = tokenizer("wide steps")["input_ids"]
    outputs = []
    for finished in (True, False):
        with monkeypatch.context() as patch:
            if not finished:
                for module in (kernels, nf4):
                    patch.setattr(module, "nf4_wide_finished", lambda *args, **kwargs: None)
            engine = make_engine(base, tokenizer, max_batch_size=32, cuda_graphs=True)
            sink = Collector()
            for i in range(24):
                engine.submit(request([*prompt, 3 + i], greedy(6), adapters[i % len(adapters)], f"r{i}"), sink)
            run_to_end(engine)
        outputs.append([(sink.tokens(f"r{i}"), sink.logprobs(f"r{i}")) for i in range(24)])
    for i, ((tokens, logprobs), (expected, expected_logprobs)) in enumerate(zip(*outputs, strict=True)):
        assert tokens == expected, f"row {i}"
        assert logprobs == pytest.approx(expected_logprobs, abs=3e-2), f"row {i}"
