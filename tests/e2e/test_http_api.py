"""The HTTP API through a real server on a loopback port, with real clients: httpx, openai, and the
published TGI / LoRAX clients (from their own venv)."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from e2e.server import run_published_clients

pytestmark = pytest.mark.e2e
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of one Prometheus metric whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_health_ready_docs(server: str) -> None:
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/ready").json()["model"] == "SmolLM2-135M-Instruct"
    assert httpx.get(f"{server}/docs").status_code == 200
    schemas = httpx.get(f"{server}/openapi.json").json()["components"]["schemas"]
    assert {"TgiRequest", "TgiResponse", "ChatCompletionRequest", "CompletionResponse"} <= set(schemas)


def test_tgi_generate_stream_and_compat_route_agree(server: str) -> None:
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "details": True}}
    full_body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "return_full_text": True}}
    # the four routes are asked at once and decode in one batch: greedy rows must agree with each other
    with ThreadPoolExecutor(3) as pool:
        pending = [
            pool.submit(httpx.post, f"{server}{path}", json=b, timeout=60)
            for path, b in (("/generate", body), ("/", body), ("/generate", full_body))
        ]
        with httpx.stream("POST", f"{server}/generate_stream", json=body, timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        single, array, full = (p.result().json() for p in pending)
    details = single["details"]
    assert details["generated_tokens"] == len(details["tokens"]) == 8 and details["finish_reason"] == "length"
    assert details["prompt_tokens"] > 0 and isinstance(details["prefill"], list) and details["seed"] is None
    assert "".join(t["text"] for t in details["tokens"]) == single["generated_text"]
    assert all(t["logprob"] <= 0 for t in details["tokens"])

    assert isinstance(array, list) and array[0]["generated_text"] == single["generated_text"]

    assert [e["token"]["id"] for e in events] == [t["id"] for t in details["tokens"]]
    assert events[-1]["generated_text"] == single["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "length"

    assert full["generated_text"] == "The capital of France is" + single["generated_text"]


def test_stop_sequences_and_seeded_sampling(server: str) -> None:
    stop = {
        "inputs": "The capital of France is",
        "parameters": {"max_new_tokens": 12, "stop": [" Paris"], "details": True},
    }
    sampled = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.2, "top_k": 50, "top_p": 0.9, "seed": 7}

    def run_sampled() -> dict:
        body = {"inputs": "Once upon a time", "parameters": sampled}
        return httpx.post(f"{server}/generate", timeout=60, json=body).json()

    # the stop-sequence request shares its batch with the first seeded run; the second runs after both
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{server}/generate", timeout=60, json=stop)
        runs = [run_sampled()]
        out = pending.result().json()
    runs.append(run_sampled())
    if out["details"]["finish_reason"] == "stop_sequence":
        assert "Paris" not in out["generated_text"]
    assert runs[0] == runs[1]


def test_openai_package(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "SmolLM2-135M-Instruct"

    # the plain and the streamed chat in one batch: one decode run instead of two
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client.chat.completions.create, model=ids[0], messages=CAPITAL, max_tokens=12, temperature=0
        )
        stream = client.chat.completions.create(
            model=ids[0],
            messages=CAPITAL,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        chat = pending.result()
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    done = client.completions.create(
        model=ids[0], prompt="The capital of France is", max_tokens=6, temperature=0, stop=["\n"]
    )
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.total_tokens > 6

    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"


def test_published_tgi_and_lorax_clients(server: str) -> None:
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6}}
    # the reference is answered while the clients' venv starts up: independent requests, greedy either way
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{server}/generate", timeout=60, json=body)
        got = run_published_clients(server, "The capital of France is", 6)
        reference = pending.result().json()["generated_text"]
    for client in ("text-generation", "lorax-client"):
        assert got[client]["text"] == got[client]["stream_text"] == reference, client
        assert got[client]["stream_generated_text"] == reference and got[client]["finish_reason"] == "length"


def test_client_mistakes_are_4xx_with_a_message(server: str) -> None:
    too_long = httpx.post(
        f"{server}/generate", timeout=30, json={"inputs": "word " * 600, "parameters": {"max_new_tokens": 4}}
    )
    assert too_long.status_code == 422 and "max_seq_len 512" in too_long.json()["error"]["message"]
    bad = httpx.post(f"{server}/generate", json={"inputs": "hi", "parameters": {"top_p": 3}})
    assert bad.status_code == 422 and "top_p" in bad.json()["error"]["message"]
    missing = httpx.post(f"{server}/generate", json={"parameters": {}})
    assert missing.status_code == 422 and "inputs" in missing.json()["error"]["message"]
    unknown = httpx.post(f"{server}/generate", json={"inputs": "hi", "parameters": {"adapter_id": "nope"}})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "adapter_not_found"


def wait_for_cancel(url: str, cancelled_before: float) -> None:
    deadline = time.monotonic() + 10  # the engine drops the row at its next step
    while (
        metric(url, "loraplex_requests_total", status="499") == cancelled_before
        or metric(url, "loraplex_running_batch_size") > 0
    ):
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", {"inputs": "1, 2, 3, 4, 5, 6,", "parameters": {"max_new_tokens": 400}}),
        (
            "/v1/completions",
            {
                "model": "SmolLM2-135M-Instruct",
                "prompt": "1, 2, 3, 4, 5, 6,",
                "max_tokens": 400,
                "temperature": 0,
                "stream": True,
            },
        ),
    ],
)
def test_disconnect_cancels_a_stream(server: str, path: str, body: dict) -> None:
    cancelled = metric(server, "loraplex_requests_total", status="499")
    with httpx.stream("POST", f"{server}{path}", json=body, timeout=60) as r:
        next(r.iter_lines())  # one token arrived: the request is running; the prompt counts on, no EOS soon
    wait_for_cancel(server, cancelled)


def test_disconnect_cancels_a_plain_request(server: str) -> None:
    body = {"inputs": "1, 2, 3, 4, 5, 6,", "parameters": {"max_new_tokens": 400}}
    cancelled = metric(server, "loraplex_requests_total", status="499")
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{server}/generate", json=body, timeout=1.5)
    wait_for_cancel(server, cancelled)


def test_metrics_are_exported(server: str) -> None:
    httpx.post(f"{server}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=60)
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "loraplex_requests_total",
        "loraplex_prompt_tokens_total",
        "loraplex_generated_tokens_total",
        "loraplex_queue_depth",
        "loraplex_running_batch_size",
        "loraplex_time_to_first_token_seconds",
        "loraplex_inter_token_latency_seconds",
        "loraplex_adapter_load_seconds",
        "loraplex_adapter_evictions_total",
        "loraplex_active_adapter_slots",
        "loraplex_cpu_adapter_bytes",
    ):
        assert name in text, name
    assert metric(server, "loraplex_generated_tokens_total", adapter="-") >= 3
