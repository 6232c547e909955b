"""Engine speed on Llama-3-8B shapes (NF4 + bf16, random weights) against the transformers + PEFT baseline.

python bench/engine.py --out results.json          # CUDA: 8B shapes
python bench/engine.py --tiny --out tiny.json      # CPU smoke test of the same code path
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from adapters.lora import LoraModule, LoraWeights
from loraplex.synthetic import load_synthetic
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    prompt: int
    new_tokens: int
    baseline_tokens: int  # the baseline is ~50x slower: fewer tokens give the same per-token rate
    requests: int  # each request with its own adapter
    wide_requests: int  # a second batch size
    baseline_adapters: int
    rank: int


SHAPE_8B = Shape(128, 128, 32, requests=32, wide_requests=64, baseline_adapters=8, rank=16)
SHAPE_TINY = Shape(16, 8, 4, requests=4, wide_requests=8, baseline_adapters=2, rank=4)


def engine_config(shape: Shape, store_rank: int | None, cuda_graphs: bool = True) -> EngineConfig:
    """Rows and slots for the wide batch, each request with its own adapter; slots padded to `store_rank` (the
    server's max_lora_rank) or, when None, to the adapters' own rank."""
    return EngineConfig(
        max_batch_size=shape.wide_requests,
        max_active_adapters=shape.wide_requests,
        max_lora_rank=store_rank or shape.rank,
        max_seq_len=shape.prompt + shape.new_tokens,
        cuda_graphs=cuda_graphs,
    )


def random_loras(model: nn.Module, count: int, distinct: int, rank: int, dtype: torch.dtype) -> list[LoraWeights]:
    """`count` adapters over `distinct` random weight sets (speed does not depend on values), pinned on CPU."""
    pin = torch.cuda.is_available()
    sets = []
    for _ in range(distinct):
        modules = {}
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS and hasattr(m, "in_features"):
                a = torch.randn(rank, m.in_features, dtype=dtype) * 0.01
                b = torch.randn(m.out_features, rank, dtype=dtype) * 0.01
                modules[name] = LoraModule(a.pin_memory() if pin else a, b.pin_memory() if pin else b, 2.0)
        sets.append(LoraWeights(modules))
    return [sets[i % distinct] for i in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline(model: nn.Module, loras: int, batch: int, shape: Shape, device: torch.device) -> float:
    """tokens/s of transformers generate() + PEFT, `batch` rows spread over `loras` adapters."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=list(TARGETS))
    peft_model = get_peft_model(model, config, adapter_name="a0").eval()
    for i in range(1, loras):
        peft_model.add_adapter(f"a{i}", config)
    ids = torch.randint(10, model.config.vocab_size, (batch, shape.prompt), device=device)
    kwargs = dict(max_new_tokens=shape.baseline_tokens, min_new_tokens=shape.baseline_tokens, do_sample=False)
    if loras > 1:
        kwargs["adapter_names"] = [f"a{i % loras}" for i in range(batch)]
    with torch.no_grad():
        peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)  # warm-up
        sync(device)
        start = time.perf_counter()
        peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        sync(device)
        seconds = time.perf_counter() - start
    peft_model.unload()  # back to the plain base model for the engine
    return batch * shape.baseline_tokens / seconds


def engine_run(
    engine: Engine,
    loras: list[LoraWeights | None],
    shape: Shape,
    tag: str,
    sampled: bool = False,
    scoring: bool = False,
    penalized: int = 0,
) -> dict[str, float]:
    """Submit one request per entry of `loras` at once (greedy, or seeded top-p sampling); aggregate and
    decode-only tokens/s (from the moment every request has its first token: pure decode steps). `penalized`: that
    many of them with a repetition penalty, whose draws read their tokens so far on the host. `scoring`: from
    that moment on, one more request scoring its prompt (prompt_logprobs, as lm-evaluation-harness's loglikelihood
    requests; prompt tokens, one new token) is always in the engine beside them, another sent as one ends; its
    tokens are not counted, its prompts scored a second are."""
    first: dict[str, float] = {}
    times: list[float] = []
    scored: list[float] = []  # when each scoring request ended

    def sink(event) -> None:
        now = time.perf_counter()
        if event.request_id.startswith("score"):
            if event.finish_reason is not None:
                scored.append(now)
            return
        first.setdefault(event.request_id, now)
        times.append(now)

    params = SamplingParams(max_new_tokens=shape.new_tokens, ignore_eos=True)
    if sampled:
        params = SamplingParams(max_new_tokens=shape.new_tokens, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True)
    penalty = replace(params, repetition_penalty=1.1)
    start = time.perf_counter()
    for i, lora in enumerate(loras):
        prompt = torch.randint(10, engine.model.config.vocab_size, (shape.prompt,)).tolist()
        key = None if lora is None else f"{tag}-{i}"
        request = GenerationRequest(prompt, penalty if i < penalized else params, key, lora, request_id=f"{tag}{i}")
        engine.submit(request, sink)
    score = SamplingParams(max_new_tokens=1, prompt_logprobs=1)
    sent = 0
    while engine.step():
        decoding = len(first) == len(loras) and len(times) < len(loras) * shape.new_tokens
        if scoring and decoding and sent == len(scored):
            prompt = torch.randint(10, engine.model.config.vocab_size, (shape.prompt,)).tolist()
            engine.submit(GenerationRequest(prompt, score, None, None, request_id=f"score-{tag}{sent}"), sink)
            sent += 1
    wall = time.perf_counter() - start
    all_decoding = max(first.values())
    decode_tokens = sum(t > all_decoding for t in times)
    window = max(times) - all_decoding
    return {
        "tok_s": len(loras) * shape.new_tokens / wall,
        "decode_tok_s": decode_tokens / window,
        "ttft_ms": 1000 * statistics.median(first[k] - start for k in first),
        "scored_prompts_s": sum(t <= max(times) for t in scored) / window,
    }


def profile_decode(engine: Engine, loras: list[LoraWeights], shape: Shape) -> str:
    """Kernel table of 10 decode steps over len(loras) rows, and those steps' wall time."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_new_tokens=shape.new_tokens, ignore_eos=True)
    for i, lora in enumerate(loras):
        prompt = torch.randint(10, engine.model.config.vocab_size, (shape.prompt,)).tolist()
        engine.submit(GenerationRequest(prompt, params, f"prof-{i}", lora), lambda e: None)
    for _ in range(len(loras) + 1):  # one prefill per step: afterwards every row is decoding
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
    # from an idle device to an idle device: a step returns once the next one is launched, so a window that
    # starts on an empty queue (as right after the profiler, which synchronizes) read ~9% fast at 1 request
    sync(engine.device)
    start = time.perf_counter()
    for _ in range(10):
        engine.step()
    sync(engine.device)
    step_ms = 100 * (time.perf_counter() - start)
    while engine.step():
        pass
    averages = prof.key_averages()
    # device time and kernels a step: what the gap to the wall time is made of (launches, host work)
    device_ms = sum(e.self_device_time_total for e in averages) / 10 / 1000
    kernels = sum(e.count for e in averages if e.self_device_time_total > 0) / 10
    table = averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    return (f"batch {len(loras)}: {step_ms:.2f} ms a decode step (unprofiled), {device_ms:.2f} ms of it on the "
            f"device in {kernels:.0f} kernels\n{table}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--tiny", action="store_true", help="tiny llama on CPU (smoke test)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--no-graphs", action="store_true", help="eager decode (no CUDA graphs)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of decode steps")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers + PEFT (the slow part)")
    parser.add_argument("--prompt", type=int, help="prompt tokens of every request (default: 128; decode attends "
                        "over the prompt and the tokens so far)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, help="tokens generated by every request (default: 128; with long "
                        "prompts, more keep the decode-only window at the full batch: it opens when the last "
                        "request has its first token)")  # fmt: skip
    parser.add_argument("--wide", type=int, help="requests of the second batch, each with its own adapter (default: "
                        "64)")  # fmt: skip
    parser.add_argument("--store-rank", type=int, help="slots padded to this rank (the server's max_lora_rank, 64 "
                        "by default there) instead of the adapters' own (16)")  # fmt: skip
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = SHAPE_TINY if args.tiny else SHAPE_8B
    if args.prompt:
        shape = replace(shape, prompt=args.prompt)
    if args.new_tokens:
        shape = replace(shape, new_tokens=args.new_tokens)
    if args.wide:
        shape = replace(shape, wide_requests=args.wide)
    torch.manual_seed(0)
    # the tiny smoke run keeps fp32 weights: NF4 is what the CUDA run measures
    model, tokenizer = load_synthetic(
        "random:tiny" if args.tiny else "random:llama3-8b", device, dtype, quantize=not args.tiny
    )
    results: dict[str, float] = {}
    if not args.no_baseline:
        results["baseline_1_lora_tok_s"] = baseline(model, 1, 1, shape, device)
        results["baseline_mixed_tok_s"] = baseline(model, shape.baseline_adapters, shape.requests, shape, device)

    loras = random_loras(model, shape.wide_requests, 4, shape.rank, dtype)
    config = engine_config(shape, args.store_rank, cuda_graphs=not args.no_graphs)
    start = time.perf_counter()
    engine = Engine(model, tokenizer, config)  # its step graphs captured
    sync(device)
    results["engine_start_s"] = time.perf_counter() - start
    engine_run(engine, [loras[0]], shape, "warm")
    single = engine_run(engine, [loras[1]], shape, "one")
    single_base = engine_run(engine, [None], shape, "one-base")
    # First use: each adapter is packed (pinned) on submit, then copied into a slot. The server's registry packs
    # an adapter once, when it loads it into its CPU tier; the second run (new keys, so new slot copies) is that
    # steady state.
    many = engine_run(engine, loras[: shape.requests], shape, "many")
    many_resident = engine_run(engine, loras[: shape.requests], shape, "many-resident")
    many_base = engine_run(engine, [None] * shape.requests, shape, "many-base")
    many_sampled = engine_run(engine, loras[: shape.requests], shape, "many-sampled", sampled=True)
    wide = engine_run(engine, loras, shape, "wide")
    beside_scoring = engine_run(engine, loras[: shape.requests], shape, "beside-scoring", scoring=True)
    one_penalized = engine_run(engine, loras[: shape.requests], shape, "one-penalized", penalized=1)
    activation = sorted(engine.activation_seconds)
    results.update(
        {
            "engine_1_lora_decode_tok_s": single["decode_tok_s"],
            "engine_1_lora_ttft_ms": single["ttft_ms"],
            "engine_1_base_decode_tok_s": single_base["decode_tok_s"],
            "engine_32_lora_tok_s": many["tok_s"],
            "engine_32_lora_decode_tok_s": many["decode_tok_s"],
            "engine_32_lora_ttft_ms": many["ttft_ms"],
            "engine_32_lora_resident_tok_s": many_resident["tok_s"],
            "engine_32_lora_resident_decode_tok_s": many_resident["decode_tok_s"],
            "engine_32_lora_sampled_tok_s": many_sampled["tok_s"],
            "engine_32_base_tok_s": many_base["tok_s"],
            "engine_32_base_decode_tok_s": many_base["decode_tok_s"],
            f"engine_{shape.wide_requests}_lora_decode_tok_s": wide["decode_tok_s"],
            "engine_32_lora_beside_scoring_decode_tok_s": beside_scoring["decode_tok_s"],
            "engine_32_lora_beside_scoring_prompts_s": beside_scoring["scored_prompts_s"],
            "engine_32_lora_one_penalized_decode_tok_s": one_penalized["decode_tok_s"],
            "lora_overhead_1_pct": 100 * (single_base["decode_tok_s"] / single["decode_tok_s"] - 1),
            "lora_overhead_32_pct": 100 * (many_base["tok_s"] / many_resident["tok_s"] - 1),
            "lora_overhead_32_decode_pct": 100 * (many_base["decode_tok_s"] / many_resident["decode_tok_s"] - 1),
            "lora_overhead_32_first_use_pct": 100 * (many_base["tok_s"] / many["tok_s"] - 1),
            "activation_ms_median": 1000 * statistics.median(activation),
            "activation_ms_max": 1000 * activation[-1],
            "activations": len(activation),
        }
    )
    if not args.no_baseline:
        results["speedup_1_vs_baseline"] = results["engine_1_lora_decode_tok_s"] / results["baseline_1_lora_tok_s"]
        results["speedup_32_vs_baseline"] = results["engine_32_lora_tok_s"] / results["baseline_mixed_tok_s"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}, cuda graphs: {config.cuda_graphs and not args.tiny}")
    print("| metric | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.2f} |")
    args.out.write_text(json.dumps({"device": device_name, **results}, indent=2))
    if args.profile:
        for rows in (1, shape.requests, shape.wide_requests):
            print(profile_decode(engine, loras[:rows], shape))


if __name__ == "__main__":
    main()
