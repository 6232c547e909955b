"""The load generator's parts: workload draws, statistics, metrics parsing, SSE handling and verdicts."""

import asyncio
import itertools
import json
import random

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from http_load import (
    Planned,
    Result,
    Workload,
    counter_deltas,
    failures,
    markdown,
    parse_metrics,
    parse_range,
    percentile,
    send,
    summarize,
)


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def test_workload_draws_lengths_in_range_and_follows_zipf() -> None:
    workload = Workload(random.Random(0), ["a", "b", "c"], zipf=1.5, prompt_len=(5, 9), output_len=parse_range("4"))
    items = [workload.next() for _ in range(3000)]
    assert all(5 <= len(i.prompt) <= 9 and i.max_new_tokens == 4 for i in items)
    counts = [sum(i.adapter == name for i in items) for name in "abc"]
    assert counts[0] > counts[1] > counts[2]  # 1 : 0.35 : 0.19


def test_poisson_arrivals_match_the_rate() -> None:
    workload = Workload(random.Random(1), [None], 0.0, (1, 1), (1, 1))
    arrivals = workload.poisson(rate=50.0, duration=20.0)
    assert 900 < len(arrivals) < 1100
    assert all(a.at < b.at for a, b in itertools.pairwise(arrivals)) and arrivals[-1].at < 20.0


def test_metrics_deltas_of_adapter_counters_only() -> None:
    before = parse_metrics("# HELP x\nloraplex_adapter_loads_total 2\nloraplex_adapter_active 3\nother_total 9\n")
    after = parse_metrics(
        'loraplex_adapter_loads_total 7\nloraplex_adapter_active 5\nloraplex_adapter_evictions_total{tier="gpu"} 4\n'
        'loraplex_adapter_load_seconds_sum{tier="cpu_to_slot"} 0.5\nloraplex_adapter_loads_created 1.7e9\n'
    )
    assert counter_deltas(before, after) == {
        "loraplex_adapter_loads_total": 5.0, 'loraplex_adapter_evictions_total{tier="gpu"}': 4.0,
        'loraplex_adapter_load_seconds_sum{tier="cpu_to_slot"}': 0.5,
    }


def _fake_server() -> FastAPI:
    app = FastAPI()

    @app.post("/generate_stream")
    async def stream(request: Request):
        body = await request.json()
        adapter = body["parameters"]["adapter_id"]
        if adapter == "missing":
            return JSONResponse({"error": "no such adapter"}, 404)
        n = body["parameters"]["max_new_tokens"]
        events = [{"token": {"id": i, "text": "x"}} for i in range(n)]
        if adapter != "truncated":
            events[-1]["generated_text"] = "x" * n
        return StreamingResponse((f"data: {json.dumps(e)}\n\n" for e in events), media_type="text/event-stream")

    return app


async def _send(adapter: str | None, tokens: int = 3) -> Result:
    transport = httpx.ASGITransport(app=_fake_server())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await send(client, Planned(0.0, adapter, "hi", tokens))


async def _results() -> list[Result]:
    return [await _send(None), await _send("a", 5), await _send("missing"), await _send("truncated")]


def test_send_times_tokens_and_reports_failures() -> None:
    ok, ok5, missing, truncated = asyncio.run(_results())
    assert (ok.status, ok.tokens, len(ok.itl), ok.error) == (200, 3, 2, None)
    assert ok.ttft is not None and ok5.tokens == 5
    assert missing.status == 404 and "no such adapter" in missing.error
    assert truncated.status == 299 and "final event" in truncated.error
    report = {"points": [{"adapters_in_use": 1, "rate": 0.0, **summarize([ok, ok5, missing, truncated], 2.0),
                          "adapter_counters": {"loraplex_adapter_loads_total": 1.0}}]}
    point = report["points"][0]
    assert (point["ok"], point["output_tokens"], point["errors"]) == (2, 8, {"404": 1, "299": 1})
    assert "loads_total +1" in markdown(report)
    assert len(failures(report)) == 1  # the smoke run fails on the errors


def test_a_point_without_tokens_fails_the_smoke_run() -> None:
    report = {"points": [{"adapters_in_use": 0, "rate": 0.0, **summarize([], 1.0), "adapter_counters": {}}]}
    assert failures(report) == ["adapters=0: no tokens came back"]
