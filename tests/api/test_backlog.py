"""Streams' backlogs (server/backlog.py) count against --max-unsent-mb: a stream's write buffer holds about one
event, and the rest of its answer waits in its request's queue, made at the engine's speed. Clients that read a few
bytes now and then (never stalling long enough for the stall deadline) held it for as long as they liked."""

import asyncio
import gc
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest
from budgeted import Budgeted as Served
from budgeted import serve_budgeted, settled
from prometheus_client.parser import text_string_to_metric_families
from tiny import tiny_model

from loraplex.synthetic import byte_tokenizer
from server.api.connections import UNSENT_GRACE_S, ConnectionCap
from server.backlog import EventSizes, ScoreShapes
from server.engine import TokenEvent

MIB = 1 << 20
BUDGET = MIB
# no EOS (id 2, tests/tiny.py): each of 2 choices runs to max_tokens, each token with 20 alternatives: ~3 MB of
# events estimated (server/backlog.py), three times the budget
SLOW = {"model": "", "prompt": "hello", "max_tokens": 400, "n": 2, "logprobs": 20, "logit_bias": {"2": -100}}
HONEST = {"inputs": "hello", "parameters": {"max_new_tokens": 200, "top_n_tokens": 5}}


@pytest.fixture(scope="module")
def served(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_budgeted(tiny_model_dirs["llama"], tmp_path_factory.mktemp("backlog"), BUDGET, 64) as server:
        yield server


@dataclass
class Trickle:
    """A client that reads its stream a few bytes at a time, well within any stall deadline."""

    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)
    reset: bool = False
    closed: bool = False


def trickle(url: str, body: dict, stop: threading.Event) -> tuple[Trickle, threading.Thread]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window the server may fill
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    client = Trickle(sock)

    def read() -> None:
        sock.settimeout(0.05)
        while not stop.wait(0.1):
            try:
                if not (chunk := sock.recv(256)):
                    client.closed = True
                    return
                client.received += chunk
            except ConnectionResetError:
                client.reset = True
                return
            except TimeoutError:
                pass

    thread = threading.Thread(target=read)
    thread.start()
    return client, thread


async def honest_stream(url: str) -> list[tuple[int, str]]:
    """Each event's token and its text (logprobs differ in their last bits with the batch's size, and so may the
    order of near ties among the top tokens)."""
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{url}/generate_stream", json=HONEST) as r,
    ):
        assert r.status_code == 200
        events = [json.loads(line.removeprefix("data:")) async for line in r.aiter_lines() if line.startswith("data:")]
    assert events[-1]["details"]["generated_tokens"] == len(events)  # the whole answer
    return [(e["token"]["id"], e["token"]["text"]) for e in events]


def metric(url: str, name: str, labels: dict[str, str]) -> float:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    samples = [s for f in families for s in f.samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(s.value for s in samples)


def live_events() -> int:
    gc.collect()
    return sum(type(o) is TokenEvent for o in gc.get_objects())


def test_streams_read_a_few_bytes_at_a_time_are_reset_past_the_budget_and_cancelled(served: Served) -> None:
    """Three clients each read 256 bytes of a stream every 0.1 s (never stalling), each stream's backlog three times
    the budget: past it they are reset, their requests cancelled in the engine (fewer tokens made than asked for) and
    their events freed, while an honest stream beside them gets the answer it gets alone."""
    url = served.url
    alone = asyncio.run(honest_stream(url))
    cancelled = {"adapter": "-", "status": "499"}
    cancelled_before = metric(url, "loraplex_requests_total", cancelled)
    generated_before = metric(url, "loraplex_generated_tokens_total", {"adapter": "-"})
    stop = threading.Event()
    slow = [trickle(url, SLOW, stop) for _ in range(3)]
    try:
        time.sleep(UNSENT_GRACE_S / 2)
        together = asyncio.run(honest_stream(url))
        deadline = time.monotonic() + 20
        while not all(client.reset or client.closed for client, _ in slow) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for client, thread in slow:
            thread.join()
            client.sock.close()
    assert together == alone
    for client, _ in slow:
        assert client.reset, "not reset"
        assert client.received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in client.received
    # each choice's request cancelled (the client gone), none run to its end
    deadline = time.monotonic() + 10
    while metric(url, "loraplex_requests_total", cancelled) - cancelled_before < 6:
        assert time.monotonic() < deadline, "the slow clients' requests were not cancelled"
        time.sleep(0.05)
    assert metric(url, "loraplex_running_batch_size", {}) == 0
    generated = metric(url, "loraplex_generated_tokens_total", {"adapter": "-"}) - generated_before
    assert generated - len(together) < 3 * SLOW["n"] * SLOW["max_tokens"]
    # nothing left waiting for them: the budget's count and the events themselves
    settled(lambda: served.cap.backlogs == 0 and not served.cap.behind)
    assert live_events() < 100


def recorded_estimates(served: Served, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each estimate the server's streams make from now on, in order."""
    scheduler = served.app.state.runtime.scheduler
    estimate, estimated = scheduler.event_sizes, []

    def recorded(event: TokenEvent, shapes: ScoreShapes) -> int:
        estimated.append(size := estimate(event, shapes))
        return size

    monkeypatch.setattr(scheduler, "event_sizes", recorded)
    return estimated


def chat_with_top_logprobs(bias: dict[str, int]) -> dict:
    return {
        "model": "",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 100,
        "logprobs": True,
        "top_logprobs": 20,
        "logit_bias": bias,
        "stream": True,
    }


def test_an_honest_stream_leaves_no_backlog(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that reads its stream as it comes holds no backlog once it has its answer, and the estimate of its
    events covers the bytes they rendered to."""
    estimated = recorded_estimates(served, monkeypatch)
    with httpx.Client(timeout=60) as client:
        body = {**SLOW, "max_tokens": 100, "n": 1, "stream": True}
        completions = client.post(f"{served.url}/v1/completions", json=body).content
        count = len(estimated)
        chats = client.post(f"{served.url}/v1/chat/completions", json=chat_with_top_logprobs({"2": -100})).content
        # the connection still open: behind while its writes were paused, caught up once the server's loop sees
        # them resume (a moment after the client has read the last bytes)
        settled(lambda: served.cap.backlogs == 0 and not served.cap.behind, seconds=10)
    # rendered within the estimate, and not far under it (a byte-level vocabulary's tokens are one byte)
    for rendered, sizes in ((completions, estimated[:count]), (chats, estimated[count:])):
        assert len(sizes) == 100
        assert len(rendered) <= sum(sizes) <= 5 * len(rendered)


def test_the_estimate_covers_a_vocabularys_long_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens of 120 control characters (each rendered as a 6-byte escape, and 1-2 digits in `bytes`), biased to be
    every event's token and all of its top logprobs: the stream renders within its estimate. A fixed size per entry
    (that of a 16-byte token) was 6 times under it."""
    model = tmp_path / "model"
    long_tokens = [chr(1) * 120 + chr(65 + i) for i in range(20)]
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(long_tokens)
    tokenizer.save_pretrained(model)
    tiny_model(vocab_size=len(tokenizer)).save_pretrained(model)
    ids = tokenizer.convert_tokens_to_ids(long_tokens)
    # a budget above the answer's ~1.6 MB: a client slowed by a busy machine must not be reset mid-answer
    with serve_budgeted(model, tmp_path, 8 * MIB, 8) as served:
        estimated = recorded_estimates(served, monkeypatch)
        body = chat_with_top_logprobs({str(i): 100 for i in ids})
        rendered = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60).content
    assert rendered.count(b"\\u0001" * 120) >= 100 * 21  # each event's token and its 20 alternatives
    assert len(estimated) == 100
    assert len(rendered) <= sum(estimated) <= 2 * len(rendered)


def scored_answers(url: str, estimated: list[int], asked: list[tuple[str, dict]]) -> list[tuple[int, int]]:
    """(bytes rendered, bytes estimated) of each answer asked for (path, body), one after another."""
    sizes = []
    with httpx.Client(timeout=60) as client:
        for path, body in asked:
            before = len(estimated)
            response = client.post(f"{url}{path}", json=body)
            assert response.status_code == 200, response.text
            sizes.append((len(response.content), sum(estimated[before:])))
    return sizes


def test_prompt_scores_are_estimated_as_their_answers_render_them(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt's scores (each token with up to 20 alternatives) are counted as the answer renders them, within the
    other events' bounds: vLLM's prompt_logprobs, an echoed prompt's legacy logprobs, both, chat's once for all its
    choices, TGI's prefill. Counted in the chat chunk's shape whatever the answer, the legacy logprobs were ~6 times
    over, and chat's scores once per choice, for the choices after the first to drop: 8 choices, ~10 times."""
    estimated = recorded_estimates(served, monkeypatch)
    ids = [3 + (7 * i) % 250 for i in range(60)]
    completion = {"model": "", "prompt": ids, "max_tokens": 1}
    chat = {"model": "", "messages": [{"role": "user", "content": "ab" * 25}], "max_tokens": 1}
    prefill = {"max_new_tokens": 1, "details": True, "decoder_input_details": True}
    asked = [
        ("/v1/completions", {**completion, "prompt_logprobs": 20, "stream": True}),
        ("/v1/completions", {**completion, "echo": True, "logprobs": 20, "stream": True}),
        ("/v1/completions", {**completion, "echo": True, "logprobs": 5, "prompt_logprobs": 5, "n": 2}),
        ("/v1/chat/completions", {**chat, "prompt_logprobs": 20, "n": 8, "stream": True}),
        ("/v1/chat/completions", {**chat, "prompt_logprobs": 20, "n": 8}),
        ("/generate", {"inputs": "ab" * 30, "parameters": prefill}),
    ]
    for (path, body), (rendered, estimate) in zip(asked, scored_answers(served.url, estimated, asked), strict=True):
        assert rendered <= estimate <= 5 * rendered, (path, body, estimate / rendered)


def test_prompt_scores_of_long_tokens_are_estimated_at_their_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts of tokens of 120 letters, or of 120 control characters (each rendered as a 6-byte escape), scored:
    their answers render within twice their estimates, the legacy logprobs of an echoed prompt too (each token's
    text twice). A prompt score's token counted with a chat chunk's `bytes` list, at 10 bytes a byte, was ~5 times
    over where its text is letters."""
    model = tmp_path / "model"
    letters = [chr(65 + i) * 120 + chr(97 + i) for i in range(10)]
    controls = [chr(1) * 120 + chr(65 + i) for i in range(10)]
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(letters + controls)
    tokenizer.save_pretrained(model)
    tiny_model(vocab_size=len(tokenizer)).save_pretrained(model)
    asked = []
    for tokens in (letters, controls):
        ids = tokenizer.convert_tokens_to_ids(tokens) * 6
        completion = {"model": "", "prompt": ids, "max_tokens": 1, "stream": True}
        asked += [("/v1/completions", {**completion, "prompt_logprobs": 1}),
                  ("/v1/completions", {**completion, "echo": True, "logprobs": 1})]  # fmt: skip
    with serve_budgeted(model, tmp_path, BUDGET, 8) as served:
        sizes = scored_answers(served.url, recorded_estimates(served, monkeypatch), asked)
    for (_, body), (rendered, estimate) in zip(asked, sizes, strict=True):
        assert rendered <= estimate <= 2 * rendered, (body, estimate / rendered)


class FakeConnection:
    """What the cap reads of a connection: its unsent bytes, its backlog, and a reset."""

    def __init__(self, cap: ConnectionCap, unsent: int = 0) -> None:
        self.cap, self._unsent, self.backlog, self.counted, self.was_reset = cap, unsent, 0, True, False
        self.peer = ""

    def unsent(self) -> int:
        return self._unsent

    def add(self, nbytes: int) -> None:
        if self.counted:
            self.backlog += nbytes
            self.cap.backlog_changed(self, nbytes)  # type: ignore[arg-type]

    def reset(self) -> None:
        self.was_reset = True


def test_the_cap_counts_backlogs_with_unsent_bytes_and_resets_the_slowest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backlogs and unsent bytes count against one budget, kept as running totals; a connection is behind from its
    writes' pause until they resume with its backlog written; past the budget the one that took the fewest bytes a
    second is reset (one behind within its grace last), and what it held counts no more."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    cap = ConnectionCap(64, max_unsent=1000)
    fast, slow, fresh, other = (FakeConnection(cap, 100) for _ in range(4))
    for c in (fast, slow):
        cap.fell_behind(c)  # type: ignore[arg-type]
        c.add(300)
    assert cap.unsent_bound == 200 and cap.backlogs == 600
    other.add(100)  # a backlog with its writes running (a step's events, read at once): counted, not behind
    assert cap.backlogs == 700 and other not in cap.behind
    other.add(-100)
    clock[0] += 2
    fast._unsent = 0  # its client took 100 bytes: its writes resume, its backlog still waiting
    cap.caught_up(fast)  # type: ignore[arg-type]
    assert fast in cap.behind and cap.unsent_bound == 100
    fast.add(300)
    assert cap.backlogs == 900 and not any(c.was_reset for c in (fast, slow))
    cap.fell_behind(fresh)  # type: ignore[arg-type]
    # past the budget (1100): the slowest reset (no byte taken), not the fast one (50 bytes a second) nor the one
    # behind within its grace
    assert slow.was_reset and not fast.was_reset and not fresh.was_reset
    assert slow not in cap.behind and slow.backlog == 0 and cap.backlogs == 600 and cap.unsent_bound == 100
    slow.add(-300)  # its stream closing: forgotten already
    assert cap.backlogs == 600
    fast.add(-600)  # its backlog written, its writes running: caught up
    assert fast not in cap.behind and cap.backlogs == 0
    fresh.add(50)
    cap.release(fresh)  # type: ignore[arg-type]
    assert cap.backlogs == 0 and cap.unsent_bound == 0 and not cap.behind


def test_an_events_estimate_grows_with_its_text_its_top_logprobs_and_their_tokens_lengths() -> None:
    sizes = EventSizes(["a"] * 20 + ["a" * 100])  # tokens 0-19 of one byte, token 20 of 100
    plain = TokenEvent("r", 0, 5, "a", -0.5, 3)
    top = TokenEvent("r", 0, 5, "a", -0.5, 3, top_logprobs=tuple((i, -1.0) for i in range(20)))
    assert sizes(plain) < sizes(top)
    assert sizes(TokenEvent("r", 0, 5, "a" * 100, -0.5, 3)) > sizes(plain)
    assert sizes(TokenEvent("r", 0, 20, "a", -0.5, 3)) > sizes(plain)
    assert sizes(replace(top, top_logprobs=((20, -1.0), *top.top_logprobs[1:]))) > sizes(top)
