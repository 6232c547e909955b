"""A request that fails after its stream has started (its 200 sent) ends the stream with an error event in its
protocol's shape, which the clients raise on, instead of a dropped connection; the other requests go on, and a
client that leaves still cancels its request. Real connections (uvicorn), the tiny model, and a real engine
failure: the engine's own handling of a grammar matcher whose mask allows no token (422 grammar_dead_end) or
that breaks (a server fault, 500), given to the request where a compiled grammar hands out its matcher."""

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from e2e.server import serve_app

from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app
from server.grammar import GrammarSpec
from server.inference import Inference

EOS = 2  # the tiny tokenizer's
PROMPT = "1, 2, 3"  # the tiny qwen3 model runs on from it to any length (greedy)
DEAD_END = "the grammar allows no token at this point"  # the engine's GrammarDeadEnd
BROKEN = "generation failed: the grammar failed: matcher broke"  # GenerationFailed of the engine's GrammarFailed
BROKEN_SCHEMA = {"description": "broken"}  # a grammar whose matcher breaks; any other dead-ends


class Stuck:
    """A grammar matcher whose first mask allows every token but EOS (one token streams), then none (a dead
    end), or that raises at its second mask (a broken matcher)."""

    family = None

    def __init__(self, broken: bool) -> None:
        self.broken, self.masks = broken, 0

    def fill_mask(self, row: torch.Tensor) -> None:
        self.masks += 1
        if self.masks == 1:
            row.fill_(-1)
            row[0] &= ~(1 << EOS)
        elif self.broken:
            raise RuntimeError("matcher broke")
        else:
            row.fill_(0)

    def advance(self, token: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


class StuckGrammar:
    def __init__(self, broken: bool) -> None:
        self.broken = broken

    def matcher(self) -> Stuck:
        return Stuck(self.broken)


@pytest.fixture(scope="module")
def served(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Inference]]:
    tmp = tmp_path_factory.mktemp("stream-errors")
    base = load_base_model(
        str(tiny_model_dirs["qwen3"]), cache_dir=tmp, device="cpu", quantize=False, dtype=torch.float32
    )
    settings = Settings(adapter_dir=tmp / "store", cache_dir=tmp, device="cpu", max_seq_len=512, max_batch_size=4)
    app = create_app(settings, base=base)
    with serve_app(app) as url:
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield url, app.state.runtime.inference


@pytest.fixture
def url(served: tuple[str, Inference], monkeypatch: pytest.MonkeyPatch) -> str:
    """The server, its grammars compiling to Stuck matchers."""
    url, inference = served

    async def compiled(spec: GrammarSpec) -> StuckGrammar:
        return StuckGrammar("broken" in spec.text)

    monkeypatch.setattr(inference.grammars, "get", compiled)
    return url


def events(url: str, path: str, body: dict) -> list[str]:
    """The `data:` payloads of a stream, read to its end (a dropped connection raises)."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=30) as r:
        assert r.status_code == 200
        return [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]


def no_asgi_traceback(caplog: pytest.LogCaptureFixture, server_faults: int) -> None:
    """A failed stream is no unhandled error; a server fault is logged once as the stream's, a 4xx not at all."""
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
    logged = [r for r in caplog.records if r.name == "loraplex" and r.levelno >= logging.ERROR]
    assert len(logged) == server_faults and all(
        r.getMessage().startswith("a stream ended with an error") for r in logged
    )


@pytest.mark.parametrize("broken", [False, True], ids=["dead-end", "broken"])
@pytest.mark.parametrize("path", ["/generate_stream", "/"])
def test_a_tgi_stream_that_fails_ends_with_tgis_error_event(
    url: str, caplog: pytest.LogCaptureFixture, path: str, broken: bool
) -> None:
    grammar = {"type": "json", "value": BROKEN_SCHEMA} if broken else {"type": "regex", "value": "x"}
    body = {"inputs": "hello", "stream": True, "parameters": {"max_new_tokens": 8, "grammar": grammar}}
    *tokens, last = [json.loads(e) for e in events(url, path, body)]
    assert len(tokens) == 1 and "token" in tokens[0]  # the failure comes after the stream started
    if broken:
        assert last == {"error": BROKEN, "error_type": "internal_error"}
    else:
        assert last == {"error": DEAD_END, "error_type": "grammar_dead_end"}
    no_asgi_traceback(caplog, server_faults=int(broken))


@pytest.mark.parametrize("broken", [False, True], ids=["dead-end", "broken"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_openai_stream_that_fails_ends_with_an_error_chunk_then_done(
    url: str, caplog: pytest.LogCaptureFixture, path: str, broken: bool
) -> None:
    body: dict = {"model": "qwen3", "max_tokens": 8, "temperature": 0, "stream": True, "n": 2}
    body |= {"prompt": "hello"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hello"}]}
    schema = {"name": "x", "schema": BROKEN_SCHEMA} if broken else {"name": "x"}
    body["response_format"] = {"type": "json_schema", "json_schema": schema}
    *chunks, error, done = events(url, path, body)
    assert done == "[DONE]" and chunks and all("choices" in json.loads(c) for c in chunks)
    if broken:
        expected = {"message": BROKEN, "type": "server_error", "code": "internal_error"}
    else:
        expected = {"message": DEAD_END, "type": "invalid_request_error", "code": "grammar_dead_end"}
    assert json.loads(error) == {"error": expected}
    no_asgi_traceback(caplog, server_faults=int(broken))


@pytest.mark.parametrize("broken", [False, True], ids=["dead-end", "broken"])
def test_a_responses_stream_that_fails_ends_with_its_error_event(
    url: str, caplog: pytest.LogCaptureFixture, broken: bool
) -> None:
    """The Responses API's stream ends with an `error` event (its SSE `event:` line too), which the openai package
    reads as ResponseErrorEvent; no [DONE] in that protocol."""
    schema = BROKEN_SCHEMA if broken else {"type": "object"}
    body = {"model": "qwen3", "input": "hello", "max_output_tokens": 8, "stream": True,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [p["type"] for p in payloads] == names and names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "error"  # after the stream started
    code = "internal_error" if broken else "grammar_dead_end"
    assert payloads[-1] == {"type": "error", "code": code, "message": BROKEN if broken else DEAD_END, "param": None}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    read = list(client.responses.create(**{k: v for k, v in body.items() if k != "stream"}, stream=True))
    assert read[-1].type == "error" and read[-1].code == code
    no_asgi_traceback(caplog, server_faults=2 * int(broken))


def test_an_error_not_raised_on_purpose_ends_the_stream_as_an_internal_error(
    served: tuple[str, Inference], url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, inference = served

    def broken(token_id: int) -> str:
        raise KeyError(token_id)

    monkeypatch.setattr(inference, "token_text", broken)  # the route's own code fails, after the 200
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "top_n_tokens": 1}}
    assert [json.loads(e) for e in events(url, "/generate_stream", body)] == [
        {"error": "Internal Server Error", "error_type": "internal_error"}
    ]
    no_asgi_traceback(caplog, server_faults=1)


def test_the_openai_package_raises_on_the_error_chunk(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="qwen3",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        stream=True,
        response_format={"type": "json_object"},
    )
    with pytest.raises(openai.APIError, match=DEAD_END) as raised:
        for _ in stream:
            pass
    assert raised.value.code == "grammar_dead_end" and raised.value.type == "invalid_request_error"


def test_other_requests_go_on_and_a_client_that_leaves_cancels_its_request(
    served: tuple[str, Inference], url: str
) -> None:
    _, inference = served
    plain = {"inputs": PROMPT, "parameters": {"max_new_tokens": 48, "details": True}}
    reference = httpx.post(f"{url}/generate", json=plain, timeout=30).json()
    assert reference["details"]["finish_reason"] == "length"  # no EOS: they run while the others fail
    failing = {"inputs": "hello", "parameters": {"max_new_tokens": 48, "grammar": {"type": "regex", "value": "x"}}}
    with ThreadPoolExecutor(4) as pool:  # failing streams in the same batches as the plain ones
        plains = [pool.submit(events, url, "/generate_stream", plain) for _ in range(2)]
        failed = [pool.submit(events, url, "/generate_stream", failing) for _ in range(2)]
        for stream in failed:
            assert json.loads(stream.result()[-1])["error_type"] == "grammar_dead_end"
        for stream in plains:
            assert json.loads(stream.result()[-1])["generated_text"] == reference["generated_text"]

    def cancelled() -> float:
        return (
            inference.metrics.registry.get_sample_value("loraplex_requests_total", {"adapter": "-", "status": "499"})
            or 0
        )

    before = cancelled()
    long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400}}
    with httpx.stream("POST", f"{url}/generate_stream", json=long, timeout=30) as r:
        next(r.iter_lines())  # one token: it runs
    deadline = time.monotonic() + 10
    while cancelled() == before or inference.scheduler.running:
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.02)
