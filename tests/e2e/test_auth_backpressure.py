"""Scoped keys and backpressure through a real server: 401/403 by key, and a flood against a short queue
gets 429s with Retry-After, never a 5xx, and the server serves normally afterwards."""

import asyncio
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from e2e.server import ADMIN_KEY as ADMIN
from e2e.server import INFERENCE_KEY as USER

pytestmark = pytest.mark.e2e
GENERATE = {"inputs": "1, 2, 3,", "parameters": {"max_new_tokens": 16}}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def guarded(keyed_server: tuple[str, Path]) -> str:
    return keyed_server[0]


def test_keys_are_scoped(guarded: str) -> None:
    assert httpx.get(f"{guarded}/health").status_code == 200  # liveness stays open
    no_key = httpx.post(f"{guarded}/generate", json=GENERATE)
    assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in no_key.json()["error"]["message"]
    wrong = httpx.post(f"{guarded}/v1/completions", json={"model": "x", "prompt": "hi"}, headers=bearer("nope"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"

    def generate_as(key: str) -> int:
        return httpx.post(f"{guarded}/generate", json=GENERATE, headers=bearer(key), timeout=60).status_code

    with ThreadPoolExecutor(2) as pool:  # both in one batch: one decode run instead of two
        assert list(pool.map(generate_as, [USER, ADMIN])) == [200, 200]
    forbidden = httpx.get(f"{guarded}/v1/adapters", headers=bearer(USER))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "insufficient_permissions"
    assert httpx.get(f"{guarded}/v1/adapters", headers=bearer(ADMIN)).status_code == 200
    assert httpx.delete(f"{guarded}/v1/adapters/anything", headers=bearer(USER)).status_code == 403


def test_cached_prompt_prefixes_are_not_shared_between_keys(guarded: str) -> None:
    """A prompt prefix cached for one key's request serves that key's next one, never another key's: a cached
    prefix answers sooner, which would tell one key what another asked."""
    system = f"You are the assistant of case {uuid.uuid4().hex}. Answer in one word."  # no earlier prompt has it
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Where?"}]}  # fmt: skip

    def cached_tokens(key: str) -> int:
        answer = httpx.post(f"{guarded}/v1/chat/completions", json=body, headers=bearer(key), timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached_tokens(USER) == 0
    assert cached_tokens(ADMIN) == 0
    assert cached_tokens(USER) > 0


def test_flood_gets_429_then_normal_service(guarded: str) -> None:
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            headers=bearer(USER), timeout=120, limits=httpx.Limits(max_connections=64)
        ) as client:
            return await asyncio.gather(*(client.post(f"{guarded}/generate", json=GENERATE) for _ in range(48)))

    responses = asyncio.run(flood())
    statuses = Counter(r.status_code for r in responses)
    assert statuses[429] > 0 and statuses[200] > 0, statuses
    assert set(statuses) <= {200, 429}, statuses  # never a 5xx for load
    for r in responses:
        if r.status_code == 429:
            # the queue's bound, or the tokenizer's backlog (bounded by it) for requests not yet tokenized
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] in ("queue_full", "tokenizer_busy")
        else:
            assert r.json()["details"] is None and r.json()["generated_text"]
    after = httpx.post(f"{guarded}/generate", json=GENERATE, headers=bearer(USER), timeout=60)
    assert after.status_code == 200
