"""The batch's rows are shared between clients through the real server: one client's streams of long answers hold
every row, and another client's request (another peer address, on a server without keys) is answered while they
still run, with the same answer it gets alone; the first client's answers are whole."""

import asyncio
import json

import httpx
import pytest

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
BATCH = 4  # the shared server's --max-batch-size (conftest.py)
HONEST = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
HOG = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 400, "n": 2, "temperature": 1.0, "seed": 3,
       "ignore_eos": True, "stream": True}  # fmt: skip


def gauge(url: str, name: str) -> float:
    line = next(line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(f"{name} "))
    return float(line.split()[1])


async def hog_stream(client: httpx.AsyncClient, tokens: list[int]) -> None:
    async with client.stream("POST", "/v1/completions", json=HOG) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                tokens[0] += len(json.loads(line[6:])["choices"])


def test_another_clients_request_is_answered_while_one_client_holds_every_row(server: str) -> None:
    alone = httpx.post(f"{server}/v1/completions", json=HONEST, timeout=120).json()["choices"][0]["text"]

    async def run() -> tuple[str, float, int]:  # the answer, the most requests paused, the first client's tokens
        hog_transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")  # another client: another address
        async with (
            httpx.AsyncClient(base_url=server, transport=hog_transport, timeout=300) as hog,
            httpx.AsyncClient(base_url=server, timeout=300) as honest,
        ):
            tokens = [0]
            streams = [asyncio.create_task(hog_stream(hog, tokens)) for _ in range(BATCH // 2)]
            while (
                await asyncio.to_thread(gauge, server, "loraplex_running_batch_size") < BATCH or tokens[0] < 2 * BATCH
            ):
                assert not any(s.done() for s in streams), [s.exception() for s in streams if s.done()]
                await asyncio.sleep(0.1)
            asked = asyncio.create_task(honest.post("/v1/completions", json=HONEST))
            paused = 0.0
            while not asked.done():  # the gauge, while the other client's request runs
                paused = max(paused, await asyncio.to_thread(gauge, server, "loraplex_paused_requests"))
                await asyncio.sleep(0.05)
            answer, out = (await asked).json()["choices"][0]["text"], tokens[0]
            for stream in streams:  # leaving cancels them: the shared server is left idle
                stream.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return answer, paused, out

    answer, paused, out = asyncio.run(run())
    assert answer == alone
    # it came before any of the first client's answers could end (each is 400 tokens), one of them paused for it
    assert out < HOG["max_tokens"] and paused == 1, (out, paused)
