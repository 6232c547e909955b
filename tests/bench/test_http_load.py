"""The load generator's parts: workloads and prompts in tokens, statistics, the goodput search and verdicts,
metrics parsing, SSE handling; and one goodput sweep end to end against an in-process fake server."""

import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import http_load
import httpx
import pytest
from e2e.server import serve_app
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from http_load import (
    GOODPUT_IN_FLIGHT,
    SHARD_STREAMS,
    UNNAMED,
    WORKLOADS,
    BytePrompts,
    Planned,
    PointJob,
    Result,
    Shape,
    Slo,
    TokenizerPrompts,
    Workload,
    bench,
    build_parser,
    counter_deltas,
    cpu_per_s,
    failures,
    goodput,
    markdown,
    meets_slo,
    next_rate,
    open_clients,
    parse_metrics,
    parse_range,
    percentile,
    process_cpu_s,
    resolve_shape,
    run_point,
    run_point_in,
    send,
    serve_base_model,
    share,
    summarize,
    tokenizer_source,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from loraplex.synthetic import byte_tokenizer

# ---- statistics -------------------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def test_percentile_edges() -> None:
    assert percentile([7.0], 0) == percentile([7.0], 50) == percentile([7.0], 99) == 7.0
    assert percentile([5.0, 1.0, 3.0], 0) == 1.0 and percentile([5.0, 1.0, 3.0], 100) == 5.0
    assert percentile([2.0] * 10, 90) == 2.0
    # p90 of 1..10: position 8.1 between 9 and 10, so one slow value in ten moves it little
    assert percentile([float(i) for i in range(1, 11)], 90) == pytest.approx(9.1)


# ---- workloads and prompts --------------------------------------------------------------------------------


def test_named_workloads_are_the_issue_s() -> None:
    assert WORKLOADS["mixed"] == Shape((128, 512), (64, 128), 32)
    assert WORKLOADS["decode"] == Shape((128, 128), (128, 128), 32)
    assert WORKLOADS["prefill"] == Shape((512, 512), (1, 1), 32)
    assert WORKLOADS["single"] == Shape((128, 128), (128, 128), 1)


def test_explicit_flags_override_the_workload() -> None:
    assert resolve_shape("mixed", None, None, None) == WORKLOADS["mixed"]
    assert resolve_shape("mixed", (100, 200), None, 8) == Shape((100, 200), (64, 128), 8)
    assert resolve_shape("single", None, (4, 4), None) == Shape((128, 128), (4, 4), 1)
    assert resolve_shape(None, None, None, None) == UNNAMED
    # a goodput sweep is open loop: the workload's client count does not cap it, an explicit one does
    assert resolve_shape("mixed", None, None, None, goodput=True).concurrency == GOODPUT_IN_FLIGHT
    assert resolve_shape("mixed", None, None, 64, goodput=True).concurrency == 64


def test_the_parser_takes_workload_lists_and_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["--url", "http://x", "--workload", "mixed,prefill", "--rate", "1,2.5"])
    assert (args.workload, args.rate, args.prompt_len, args.concurrency) == (
        ["mixed", "prefill"],
        [1.0, 2.5],
        None,
        None,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--url", "http://x", "--workload", "chat"])
    assert "unknown workload 'chat'" in capsys.readouterr().err


def test_byte_prompts_are_one_token_per_byte_of_the_random_models_tokenizer() -> None:
    rng, tokenizer = random.Random(0), byte_tokenizer()
    for n in (1, 128, 512):
        prompt = BytePrompts().make(rng, n)
        assert len(prompt.encode()) == len(tokenizer(prompt)["input_ids"]) == n


def _bpe_with_bos() -> PreTrainedTokenizerFast:
    """A small BPE that merges letters and adds BOS, as real models' tokenizers do; trained here, offline."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rng = random.Random(1)
    corpus = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz    ", k=2000)) for _ in range(20)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


@pytest.mark.parametrize("tokenizer", [byte_tokenizer(), _bpe_with_bos()], ids=["bytes", "bpe+bos"])
def test_tokenizer_prompts_have_exactly_the_length_the_server_counts(tokenizer: PreTrainedTokenizerFast) -> None:
    prompts, rng = TokenizerPrompts(tokenizer), random.Random(2)
    for n in [2, 3, 17, 128, *(rng.randint(128, 512) for _ in range(20)), 512]:
        prompt = prompts.make(rng, n)
        assert len(tokenizer(prompt)["input_ids"]) == n  # as server/inference.py encodes: special tokens added


def test_bpe_prompts_merge_letters_and_count_the_bos() -> None:
    tokenizer = _bpe_with_bos()
    prompts = TokenizerPrompts(tokenizer)
    assert prompts.added == 1
    prompt = prompts.make(random.Random(3), 100)
    assert len(prompt) > 120  # several characters a token: a byte-count prompt would be far too long here
    with pytest.raises(ValueError, match="exactly 1 tokens"):
        prompts.make(random.Random(3), 1)  # BOS alone: no room for text


def test_the_tokenizer_follows_the_served_model() -> None:
    assert tokenizer_source(None, "--base-model random:llama3-8b --device cuda") == "bytes"
    assert tokenizer_source(None, "--device cpu --base-model=/models/llama") == "/models/llama"
    assert tokenizer_source("/tok", "--base-model random:tiny") == "/tok"
    assert tokenizer_source(None, None) == "bytes"
    assert serve_base_model("--base-model 'a b' --port 1") == "a b"


def test_workload_draws_lengths_in_range_and_follows_zipf() -> None:
    workload = Workload(random.Random(0), ["a", "b", "c"], zipf=1.5, prompt_len=(5, 9), output_len=parse_range("4"))
    items = [workload.next() for _ in range(3000)]
    assert all(5 <= len(i.prompt) == i.prompt_tokens <= 9 and i.max_new_tokens == 4 for i in items)
    counts = [sum(i.adapter == name for i in items) for name in "abc"]
    assert counts[0] > counts[1] > counts[2]  # 1 : 0.35 : 0.19


def test_a_shared_prefix_begins_every_prompt_of_an_adapter_at_the_planned_length() -> None:
    tokenizer = _bpe_with_bos()
    for prompts, ids_of in ((BytePrompts(), str.encode), (TokenizerPrompts(tokenizer), prompts_ids(tokenizer))):
        workload = Workload(random.Random(0), ["a", "b"], 0.0, (40, 60), (1, 1), prompts, shared_prefix=24)
        items = [workload.next() for _ in range(40)]
        assert all(len(ids_of(i.prompt)) == i.prompt_tokens for i in items)
        heads = []
        for name in "ab":
            mine = [i.prompt for i in items if i.adapter == name]
            assert len(mine) > 5 and len(set(mine)) == len(mine)  # the rest of each prompt is its own
            (head,) = {tuple(ids_of(prompt)[:24]) for prompt in mine}  # the first 24 tokens (BOS, 23 of its own)
            heads.append(head)
        assert heads[0] != heads[1]
    with pytest.raises(ValueError, match="--shared-prefix 40"):
        Workload(random.Random(0), [None], 0.0, (40, 60), (1, 1), shared_prefix=40)


def prompts_ids(tokenizer) -> Callable[[str], list[int]]:
    return lambda text: tokenizer(text)["input_ids"]


def test_poisson_arrivals_match_the_rate() -> None:
    workload = Workload(random.Random(1), [None], 0.0, (1, 1), (1, 1))
    arrivals = workload.poisson(rate=50.0, duration=20.0)
    assert 900 < len(arrivals) < 1100
    assert all(a.at < b.at for a, b in itertools.pairwise(arrivals)) and arrivals[-1].at < 20.0


# ---- goodput ----------------------------------------------------------------------------------------------

SLO = Slo(ttft=1.0, itl=0.05)


def _point(ttft: float | None, itl: float | None, errors: dict | None = None, ok: int = 10) -> dict:
    return {"ok": ok, "errors": errors or {}, "ttft_s": {"p90": ttft}, "itl_s": {"p90": itl}}


def test_meets_slo() -> None:
    assert meets_slo(_point(1.0, 0.05), SLO)  # the bounds themselves pass
    assert not meets_slo(_point(1.01, 0.01), SLO)
    assert not meets_slo(_point(0.1, 0.051), SLO)
    assert not meets_slo(_point(0.1, 0.01, errors={"503": 1}), SLO)  # any failed request
    assert meets_slo(_point(0.1, None), SLO)  # 1-token outputs have no inter-token gap to miss
    assert not meets_slo(_point(None, None, ok=0), SLO)  # nothing answered proves nothing


def test_goodput_is_the_highest_pass_below_every_miss() -> None:
    assert goodput([]) is None
    assert goodput([(1.0, True), (2.0, True), (4.0, True)]) == 4.0
    assert goodput([(1.0, True), (2.0, True), (4.0, False), (3.0, True)]) == 3.0
    assert goodput([(1.0, False), (0.5, True)]) == 0.5
    assert goodput([(1.0, False), (0.5, False)]) is None
    # a lucky pass above a miss is noise, not capacity
    assert goodput([(1.0, True), (2.0, False), (4.0, True)]) == 1.0


def _search(capacity: float, start: float = 1.0, bisect: int = 3, rate_max: float = 256.0) -> list[float]:
    verdicts: list[tuple[float, bool]] = []
    while (rate := next_rate(verdicts, start, bisect, rate_max)) is not None:
        verdicts.append((rate, rate <= capacity))
    return [rate for rate, _ in verdicts]


def test_the_search_doubles_then_bisects() -> None:
    assert _search(5.3) == [1, 2, 4, 8, 6, 5, 5.5]
    assert _search(0.3) == [1, 0.5, 0.25, 0.375]  # the start already misses: bisect down from it
    assert _search(1000.0, rate_max=16) == [1, 2, 4, 8, 16]  # never misses: stops at the cap
    assert _search(5.3, bisect=0) == [1, 2, 4, 8]


# ---- metrics and requests ---------------------------------------------------------------------------------


def test_metrics_deltas_of_adapter_counters_only() -> None:
    before = parse_metrics("# HELP x\nloraplex_adapter_loads_total 2\nloraplex_adapter_active 3\nother_total 9\n")
    after = parse_metrics(
        'loraplex_adapter_loads_total 7\nloraplex_adapter_active 5\nloraplex_adapter_evictions_total{tier="gpu"} 4\n'
        'loraplex_adapter_load_seconds_sum{tier="cpu_to_slot"} 0.5\nloraplex_adapter_loads_created 1.7e9\n'
        "loraplex_prompt_tokens_cached_total 96\nloraplex_prompt_tokens_total 300\n"
    )
    assert counter_deltas(before, after) == {
        "loraplex_prompt_tokens_cached_total": 96.0,
        "loraplex_adapter_loads_total": 5.0,
        'loraplex_adapter_evictions_total{tier="gpu"}': 4.0,
        'loraplex_adapter_load_seconds_sum{tier="cpu_to_slot"}': 0.5,
    }


def _fake_server() -> FastAPI:
    """/generate_stream as the TGI route streams it: a token event each, the last with details. Adapter
    `eos` stops after one token; `off-by-one` reports one prompt token more than the prompt's bytes."""
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse("loraplex_adapter_loads_total 1\n")

    @app.post("/generate_stream")
    async def stream(request: Request):
        body = await request.json()
        adapter = body["parameters"]["adapter_id"]
        if adapter == "missing":
            return JSONResponse({"error": "no such adapter"}, 404)
        n = 1 if adapter == "eos" else body["parameters"]["max_new_tokens"]
        events: list[dict] = [{"token": {"id": i, "text": "x"}} for i in range(n)]
        if adapter != "truncated":
            prompt_tokens = len(body["inputs"].encode()) + (adapter == "off-by-one")
            events[-1]["generated_text"] = "x" * n
            events[-1]["details"] = {
                "finish_reason": "eos_token" if adapter == "eos" else "length",
                "prompt_tokens": prompt_tokens,
                "generated_tokens": n,
                "seed": None,
            }
        return StreamingResponse((f"data: {json.dumps(e)}\n\n" for e in events), media_type="text/event-stream")

    return app


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=_fake_server()), base_url="http://test")


async def _send(adapter: str | None, tokens: int = 3) -> Result:
    async with _client() as client:
        return await send(client, Planned(0.0, adapter, "hi", tokens, 2))


async def _results() -> list[Result]:
    return [
        await _send(None),
        await _send("a", 5),
        await _send("missing"),
        await _send("truncated"),
        await _send("eos", 4),
        await _send("off-by-one"),
    ]


def test_send_times_tokens_and_reports_failures() -> None:
    ok, ok5, missing, truncated, eos, off = asyncio.run(_results())
    assert (ok.status, ok.tokens, len(ok.itl), ok.error, ok.prompt_tokens, ok.finish_reason) == (
        200,
        3,
        2,
        None,
        2,
        "length",
    )
    assert ok.ttft is not None and ok5.tokens == 5
    assert missing.status == 404 and "no such adapter" in missing.error
    assert truncated.status == 299 and "final event" in truncated.error
    assert (eos.tokens, eos.requested_tokens, eos.finish_reason) == (1, 4, "eos_token")
    report = {
        "points": [
            {
                "adapters_in_use": 1,
                "rate": 0.0,
                **summarize([ok, ok5, missing, truncated, eos, off], 2.0),
                "adapter_counters": {"loraplex_adapter_loads_total": 1.0},
            }
        ]
    }
    point = report["points"][0]
    # real tokens only: the early stop counts its one token, not the four it asked for
    assert (point["ok"], point["output_tokens"], point["errors"]) == (4, 12, {"404": 1, "299": 1})
    assert (point["requested_output_tokens"], point["stopped_early"]) == (15, 1)
    assert point["finish_reasons"] == {"length": 3, "eos_token": 1}
    assert (point["prompt_tokens"], point["prompt_tokens_per_s"], point["prompt_length_mismatches"]) == (9, 4.5, 1)
    assert "loads_total +1" in markdown(report)
    assert len(failures(report)) == 2  # the smoke run fails on the errors and on the prompt length


def test_a_point_without_tokens_fails_the_smoke_run() -> None:
    report = {"points": [{"adapters_in_use": 0, "rate": 0.0, **summarize([], 1.0), "adapter_counters": {}}]}
    assert failures(report) == ["adapters=0: no tokens came back"]


async def _open_loop() -> list[Result]:
    workload = Workload(random.Random(4), [None], 0.0, (8, 16), (3, 3))
    async with _client() as client:
        results, wall = await run_point([client], workload, concurrency=4, rate=100.0, duration=0.2)
    assert wall >= 0.0
    return results


def test_an_open_loop_point_sends_poisson_arrivals_of_the_planned_lengths() -> None:
    results = asyncio.run(_open_loop())
    assert 5 < len(results) < 50
    assert all(r.status == 200 and r.tokens == 3 and r.prompt_tokens == r.planned_prompt_tokens for r in results)


# ---- a goodput sweep, end to end --------------------------------------------------------------------------


def test_a_goodput_sweep_searches_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake server's capacity is 5 req/s: TTFT turns to queueing above it. The search and the report
    are real; only the timing of a point is made up, so the test takes no wall time."""

    async def fake_point(client, workload, concurrency, rate, duration):
        assert concurrency == GOODPUT_IN_FLIGHT
        ttft = 0.2 if rate <= 5 else 3.0
        results = [
            Result(
                200,
                0.0,
                requested_tokens=4,
                planned_prompt_tokens=p.prompt_tokens,
                ttft=ttft,
                itl=[0.01, 0.02, 0.01],
                tokens=4,
            )
            for p in (workload.next() for _ in range(10))
        ]
        return results, 2.0

    monkeypatch.setattr(http_load, "run_point", fake_point)
    args = build_parser().parse_args(["--url", "http://test", "--workload", "mixed", "--goodput"])
    report = asyncio.run(bench(args, "http://test", BytePrompts(), httpx.ASGITransport(app=_fake_server())))
    assert [p["rate"] for p in report["points"]] == [1, 2, 4, 8, 6, 5, 5.5]
    assert [p["meets_slo"] for p in report["points"]] == [True, True, True, False, False, True, False]
    assert report["goodput"] == [{"workload": "mixed", "adapters_in_use": 0, "rate": 5}]
    assert report["slo"] == {"ttft": 1.0, "itl": 0.05}
    assert report["workloads"]["mixed"]["prompt_len"] == (128, 512)
    text = markdown(report)
    assert "goodput, workload mixed, 0 adapters: 5 req/s" in text and "| mixed | 0 | 8 |" in text


def test_a_process_cpu_time_is_read_from_proc() -> None:
    """The server's CPU a point records: this process's own, read as the server's is, grows with work done."""
    before = process_cpu_s(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    after = process_cpu_s(os.getpid())
    assert before is not None and after is not None and after - before >= 0.15
    assert process_cpu_s(None) is None
    assert cpu_per_s((1.0, 10.0), (1.5, 12.0), 2.0) == {"client_cpu_per_s": 0.25, "server_cpu_per_s": 1.0}
    assert cpu_per_s((1.0, None), (1.5, None), 2.0)["server_cpu_per_s"] is None


def test_the_warm_up_sends_to_every_adapter_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each adapter's first load stays out of the points, however few warm-up requests are asked for."""
    sent: list[str | None] = []

    async def record(client: httpx.AsyncClient, item: Planned) -> Result:
        sent.append(item.adapter)
        return Result(200, 0.0)

    monkeypatch.setattr(http_load, "send", record)
    adapters: list[str | None] = [f"a{i}" for i in range(32)]
    workload = Workload(random.Random(0), adapters, 1.2, (4, 8), (2, 2))  # Zipf: 2 draws rarely reach a31
    asyncio.run(http_load.warm_up(_client(), workload, 2, 8))
    assert len(sent) == 34 and set(sent) == set(adapters)


def test_a_sampled_workload_asks_the_server_to_sample() -> None:
    """--temperature reaches each request as TGI's do_sample and temperature; a greedy workload sends neither."""
    bodies: list[dict] = []

    def server(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        details = {"finish_reason": "length", "prompt_tokens": 2, "generated_tokens": 1, "seed": None}
        event = {"token": {"id": 1, "text": "x"}, "generated_text": "x", "details": details}
        return httpx.Response(200, content=f"data: {json.dumps(event)}\n\n".encode())

    async def one(temperature: float) -> Result:
        workload = Workload(random.Random(0), ["a"], 0.0, (2, 2), (1, 1), temperature=temperature)
        async with httpx.AsyncClient(transport=httpx.MockTransport(server), base_url="http://test") as client:
            return await send(client, workload.next())

    assert asyncio.run(one(0.7)).tokens == 1 and asyncio.run(one(0.0)).tokens == 1
    sampled, greedy = (body["parameters"] for body in bodies)
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7
    assert "do_sample" not in greedy and "temperature" not in greedy


def test_the_busy_load_generator_warning_is_per_process(capsys: pytest.CaptureFixture[str]) -> None:
    """1.2 cores over 2 processes is 0.6 each: no warning; over 1 it is past a core's worth of delays."""
    point = {"workload": "decode", "adapters_in_use": 8, "rate": 0.0, "ok": 1, "requests": 1,
             "output_tokens_per_s": 1.0, "client_cpu_per_s": 1.2, "prompt_length_mismatches": 0}  # fmt: skip
    http_load._progress({**point, "processes": 2})
    assert "WARNING" not in capsys.readouterr().err
    http_load._progress({**point, "processes": 1})
    assert "each load-generating process kept 120% of a core busy" in capsys.readouterr().err


def test_a_point_split_over_processes_gathers_every_processs_requests() -> None:
    """Three closed-loop clients over two load-generating processes (two and one), against a real local server:
    every request each process sent comes back in one list, and the CPU reported is the processes' own."""
    job = PointJob("", {}, 30.0, Workload(random.Random(0), ["a"], 0.0, (4, 4), (3, 3)), 3, 0.0, 0.5)
    with serve_app(_fake_server()) as url, ProcessPoolExecutor(2, multiprocessing.get_context("spawn")) as pool:
        results, wall, cpu = asyncio.run(run_point_in(pool, 2, replace(job, url=url)))
    assert len(results) >= 3 and all(r.status == 200 and r.tokens == 3 for r in results)  # each client sent one
    assert wall >= 0.5 and cpu > 0
    assert [share(3, 2, i) for i in range(2)] == [2, 1] and [share(4, 3, i) for i in range(3)] == [2, 1, 1]


def test_the_load_generator_spreads_its_streams_over_clients_of_a_few_each() -> None:
    """One connection pool scans all its connections at every request: a client per SHARD_STREAMS streams in flight,
    and a closed loop's clients take them in turn."""

    async def run() -> list[int]:
        async with contextlib.AsyncExitStack() as stack:
            transport = httpx.ASGITransport(app=_fake_server())
            clients = await open_clients(stack, "http://test", {}, 5.0, 2 * SHARD_STREAMS + 1, transport)
            sent = [0] * len(clients)
            for i, client in enumerate(clients):

                async def count(request: httpx.Request, i: int = i) -> None:
                    sent[i] += 1

                client.event_hooks["request"].append(count)
            workload = Workload(random.Random(0), [None], 0.0, (4, 4), (2, 2))
            results, _ = await run_point(clients, workload, concurrency=6, rate=0.0, duration=0.1)
            assert all(r.status == 200 for r in results)
            return sent

    sent = asyncio.run(run())
    assert len(sent) == 3 and all(n > 0 for n in sent)
