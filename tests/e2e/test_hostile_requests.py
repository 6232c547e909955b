"""Hostile requests against a real server while honest ones are in flight: each hostile client gets its own
4xx (or a harmless answer), the honest answers are exactly what they are alone, and the server stays live,
with bounded metrics and a quiet log."""

import asyncio
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from e2e.server import INFERENCE_KEY as KEY
from e2e.server import KEYED_CONNECTIONS

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "SmolLM2-135M-Instruct"
KEYED_BATCH = 8  # the keyed server's --max-batch-size (conftest.py)
HONEST = [
    ("/generate", {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 16}}),
    ("/generate", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 16, "do_sample": True, "seed": 42}}),
    ("/v1/completions", {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 16, "temperature": 0}),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 16,
            "temperature": 0,
        },
    ),
]
# (path, body: JSON or raw bytes, headers, expected status, expected error code or None)
HOSTILE: list[tuple[str, object, dict[str, str], int, str | None]] = [
    ("/generate", {"inputs": "hi", "parameters": {"do_sample": True, "seed": 2**64}}, AUTH, 422, "invalid_request"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2**64}, AUTH, 422, "invalid_request"),
    ("/generate", {"inputs": "hi", "parameters": {"top_k": 100_000, "max_new_tokens": 4}}, AUTH, 200, None),
    ("/generate", b'{"inputs": "hi", "parameters": {"temperature": NaN}}', AUTH, 422, "invalid_request"),
    ("/generate", {"inputs": "hi", "parameters": {"stop": ["x"] * 20_000}}, AUTH, 422, "invalid_request"),
    ("/generate", {"inputs": "hi", "parameters": {"stop": ["y" * 256] * 16, "max_new_tokens": 8}}, AUTH, 200, None),
    ("/v1/completions", b"{not json", {}, 401, "invalid_api_key"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        AUTH,
        422,
        "invalid_request",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100_000}, AUTH, 422, "max_tokens_too_large"),
    # each bad element of a long list was an error of its own: seconds of the event loop, megabytes of answer
    ("/v1/completions", {"model": MODEL, "prompt": [True] * 20_000}, AUTH, 422, "invalid_request"),
    # OpenAI's batch of token-id prompts, 250,000 of one id, under --max-request-mb: parsing it kept the interpreter
    # lock, and so every stream, for ~70 ms; refused unparsed
    ("/v1/completions", b'{"model": "", "prompt": [' + b"[3]," * 249_999 + b"[3]]}", AUTH, 413, "too_many_json_items"),
    ("/v1/chat/completions", b"[" * 10_000 + b"]" * 10_000, AUTH, 400, "bad_request"),
    ("/generate", {"inputs": "x" * 500_000}, AUTH, 422, "prompt_too_long"),
    # half a surrogate pair in a history call's arguments, which the template renders: it reached the count of the
    # prompt's bytes, a 500
    (
        "/v1/chat/completions",
        b'{"model": "", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '
        b'"\\ud800"}}]}, {"role": "user", "content": "hi"}]}',
        AUTH,
        422,
        "invalid_request",
    ),
    # a grammar forcing a long run: the whole run was tokenized at every token, the interpreter lock held
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 8, "guided_regex": "a{100000}"}, AUTH, 200, None),
    *[
        ("/generate", {"inputs": "hi", "parameters": {"adapter_id": f"ghost-{i}"}}, AUTH, 404, "adapter_not_found")
        for i in range(8)
    ],
]


def answer_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    body = response.json()
    if "generated_text" in body:
        return body["generated_text"]
    choice = body["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


@pytest.fixture(scope="module")
def alone(keyed_server: tuple[str, Path]) -> list[str]:
    """The HONEST requests' answers, each sent alone (one after another): what they must be beside anything, in
    every test of this module (the same requests to the same server; computed once, ~4 s of CPU a request)."""
    url, _ = keyed_server
    with httpx.Client(base_url=url, timeout=300) as client:
        return [answer_of(client.post(path, json=body, headers=AUTH)) for path, body in HONEST]


async def post(client: httpx.AsyncClient, path: str, body: object, headers: dict[str, str]) -> httpx.Response:
    if isinstance(body, bytes):
        return await client.post(path, content=body, headers={"content-type": "application/json", **headers})
    return await client.post(path, json=body, headers=headers)


async def send_part(url: str, declared: int, headers: dict[str, str]) -> tuple[int, dict]:
    """POST /generate declaring a `declared`-byte body but sending only its first MiB: the answer must come
    without the rest (a server that waited for it would wait forever)."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    head = "".join(
        f"{k}: {v}\r\n"
        for k, v in {
            "Host": "x",
            "Content-Type": "application/json",
            "Content-Length": str(declared),
            **headers,
        }.items()
    )
    writer.write(f"POST /generate HTTP/1.1\r\n{head}\r\n".encode() + b'{"inputs": "' + b"x" * (1 << 20))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 30)
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        length = int(value) if name.lower() == "content-length" else length
    body = json.loads(await reader.readexactly(length))
    writer.close()
    return int(status_line.split()[1]), body


async def leave_early(client: httpx.AsyncClient) -> None:
    """A client that gives up on a long answer: its request is cancelled, and logged in one line."""
    with pytest.raises(httpx.ReadTimeout):
        await client.post(
            "/generate",
            json={"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 400}},
            headers=AUTH,
            timeout=0.5,
        )


def test_hostile_requests_harm_only_their_senders(keyed_server: tuple[str, Path], alone: list[str]) -> None:
    url, log = keyed_server

    async def run() -> tuple[list[str], list[tuple[int, dict]], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
            honest = [asyncio.create_task(post(client, path, body, AUTH)) for path, body in HONEST]
            await asyncio.sleep(0.3)  # the honest requests are running when the hostile ones arrive
            _, no_key, too_large, *hostile = await asyncio.gather(
                leave_early(client),
                send_part(url, 100 << 20, {}),
                send_part(url, 100 << 20, AUTH),
                *(post(client, path, body, headers) for path, body, headers, *_ in HOSTILE),
            )
            together = [answer_of(r) for r in await asyncio.gather(*honest)]
            return together, [no_key, too_large], hostile

    together, unread, hostile = asyncio.run(run())
    assert together == alone
    assert unread[0][0] == 401 and unread[0][1]["error"]["code"] == "invalid_api_key"
    assert unread[1][0] == 413 and unread[1][1]["error"]["code"] == "request_too_large"
    for (path, _, _, status, code), response in zip(HOSTILE, hostile, strict=True):
        assert response.status_code == status, (path, response.text[:300])
        if code is not None:
            assert response.json()["error"]["code"] == code, (path, response.text[:300])

    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/metrics").status_code == 401
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert "ghost-" not in metrics and 'adapter="<unknown>",status="404"' in metrics
    text = log.read_text()
    assert "Traceback" not in text and "client disconnected" in text, text[-3000:]


def gauges(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics", headers=AUTH).text.splitlines()
    wanted = ("loraplex_queue_depth ", "loraplex_running_batch_size ", "loraplex_paused_requests ")
    return {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith(wanted)}


async def open_stream_and_wait(url: str, path: str, body: dict) -> asyncio.StreamWriter:
    """A streaming request sent on a connection of its own, whose answer is never read; closing the writer leaves."""
    address = urlsplit(url)
    _, writer = await asyncio.open_connection(address.hostname, address.port)
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    writer.write(f"{head}Authorization: Bearer {KEY}\r\n\r\n".encode() + payload)
    await writer.drain()
    return writer


async def until_rows_are_full(url: str, seconds: float = 120) -> None:
    """Until every row of the keyed server's batch runs a request and one more waits. Waiting for one more queued
    request per stream opened raced the honest requests ending (their rows go to the choices, which open one
    after another), and that wait had no end: once it hung a test run for its whole timeout."""
    deadline = time.monotonic() + seconds
    while (now := gauges(url))["loraplex_queue_depth"] < 1 or now["loraplex_running_batch_size"] < KEYED_BATCH:
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.1)


def test_streams_left_before_their_first_token_free_their_rows(
    keyed_server: tuple[str, Path], alone: list[str]
) -> None:
    """Clients that leave while their streams wait for rows (n choices open one after another; a full batch
    queues them): their requests are cancelled, not run to max_tokens for nobody ahead of honest ones."""
    url, _ = keyed_server
    many = {"max_tokens": 400, "n": 8, "stream": True, "temperature": 1.0}
    leaving = [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **many, "seed": 1}),
        ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", **many, "seed": 2}),
        ("/generate_stream", {"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 400}}),
    ]

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            honest = [asyncio.create_task(post(client, path, body, AUTH)) for path, body in HONEST]
            writers = [await open_stream_and_wait(url, path, body) for path, body in leaving]
            await until_rows_are_full(url)  # the leaving requests hold rows, and wait for them
            for writer in writers:
                writer.close()
            together = [answer_of(r) for r in await asyncio.gather(*honest)]
            return together

    together = asyncio.run(run())
    assert together == alone
    # left alone, the choices would hold all 8 rows for minutes (24 x 400 tokens on two cores)
    deadline = time.monotonic() + 10
    idle = {"loraplex_queue_depth": 0.0, "loraplex_running_batch_size": 0.0, "loraplex_paused_requests": 0.0}
    while (now := gauges(url)) != idle:
        assert time.monotonic() < deadline, now
        time.sleep(0.1)


def test_silent_connections_past_the_cap_harm_no_honest_request(
    keyed_server: tuple[str, Path], alone: list[str]
) -> None:
    """More connections that never send a request than --max-connections, opened while honest requests are in
    flight: each closes the one silent longest, the honest answers are as alone, requests sent after them get
    in, and the log says so once."""
    url, log = keyed_server
    address = urlsplit(url)

    async def run() -> tuple[list[str], list[str], bytes]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            honest = [asyncio.create_task(post(client, path, body, AUTH)) for path, body in HONEST]
            await asyncio.sleep(0.5)  # the honest requests under way
            silent = [
                await asyncio.open_connection(address.hostname, address.port) for _ in range(KEYED_CONNECTIONS + 64)
            ]
            # at once, as the honest requests beside the silent ones were sent: one batch, answers as alone
            later = [answer_of(r) for r in await asyncio.gather(*(post(client, p, b, AUTH) for p, b in HONEST))]
            together = [answer_of(r) for r in await asyncio.gather(*honest)]
            first = await asyncio.wait_for(silent[0][0].read(), 10)  # closed: b""
            for _, writer in silent:
                writer.close()
            return together, later, first

    together, later, first = asyncio.run(run())
    assert together == alone and later == alone and first == b""
    logged = sum("past --max-connections (" in line for line in log.read_text().splitlines())
    assert 0 < logged <= 3  # a line every 10 s at most, not one a connection closed


def test_a_tokenizing_flood_is_bounded_beside_honest_requests(keyed_server: tuple[str, Path], alone: list[str]) -> None:
    """Hundreds of /tokenize requests of the longest text a prompt may be, beside honest requests: each is
    answered or refused at once with 429 tokenizer_busy (past the tokenizer's backlog, tests/api/
    test_tokenizer_pool.py), and the honest requests answer as alone."""
    url, _ = keyed_server
    text = "lorem ipsum " * 100  # within max_seq_len 512 tokens: a text past it is refused before its answer

    async def run() -> tuple[list[str], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            honest = [asyncio.create_task(post(client, path, body, AUTH)) for path, body in HONEST]
            flood = await asyncio.gather(*(post(client, "/tokenize", {"prompt": text}, AUTH) for _ in range(300)))
            together = [answer_of(r) for r in await asyncio.gather(*honest)]
            return together, flood

    together, flood = asyncio.run(run())
    assert together == alone
    assert {r.status_code for r in flood} <= {200, 429} and any(r.status_code == 200 for r in flood)
    for busy in (r for r in flood if r.status_code == 429):
        assert busy.json()["error"]["code"] == "tokenizer_busy" and int(busy.headers["retry-after"]) >= 1
