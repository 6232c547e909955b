"""What the server does before a route reads a byte of the body: the key check (401) and the body limit
(413), both JSON. No model is loaded: these answers never wait for one. The client streams its body in
chunks, so each test sees how much of it the server pulled."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from loraplex.settings import Settings
from server.app import create_app

USER, ADMIN = "user-key", "admin-key"
CHUNK = b"x" * (1 << 20)


class Body:
    """A body of `chunks` MiB sent chunked (no Content-Length); `pulled` counts what the server read."""

    def __init__(self, chunks: int, head: bytes = b"") -> None:
        self.chunks, self.head, self.pulled = chunks, head, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.head:
            yield self.head
        for _ in range(self.chunks):
            self.pulled += 1
            yield CHUNK


def send(
    path: str,
    *,
    key: str | None = None,
    body: Body | bytes = b"{}",
    method: str = "POST",
    headers: dict[str, str] | None = None,
    **settings: object,
) -> httpx.Response:
    fields = {"api_key": [USER], "admin_key": [ADMIN], "adapter_dir": Path("/nonexistent"), **settings}
    app = create_app(Settings(**fields))  # type: ignore[arg-type]
    all_headers = {"content-type": "application/json", **(headers or {})}
    if key:
        all_headers["authorization"] = f"Bearer {key}"

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, content=body, headers=all_headers)

    return asyncio.run(run())


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_no_key_is_401_before_the_body_is_read() -> None:
    body = Body(100)
    response = send("/generate", body=body)
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    assert body.pulled <= 1, f"{body.pulled} MiB read before the 401"


def test_malformed_json_without_a_key_is_401() -> None:
    response = send("/v1/completions", body=b"{not json", key="wrong")
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"


def test_body_over_the_limit_is_413_as_soon_as_it_passes() -> None:
    body = Body(100, head=b'{"inputs": "')
    response = send("/generate", key=USER, body=body, max_request_mb=2)
    assert response.status_code == 413, response.text
    error = error_of(response)
    assert error["code"] == "request_too_large" and "--max-request-mb" in error["message"]
    assert body.pulled <= 3, f"{body.pulled} MiB read for a 2 MiB limit"


def test_declared_length_over_the_limit_is_413_unread() -> None:
    response = send(
        "/v1/chat/completions", key=USER, body=b"{}", max_request_mb=1, headers={"content-length": str(50 << 20)}
    )
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


def test_a_body_within_the_limit_reaches_the_route() -> None:
    response = send("/generate", key=USER, body=b'{"inputs": "' + b"x" * 1000 + b'"}')
    assert response.status_code == 503 and error_of(response)["code"] == "not_ready"  # no model in this test


def test_the_upload_route_keeps_its_own_larger_limit() -> None:
    # 3 MiB is over --max-request-mb 1 but within --max-adapter-mb: the upload route answers itself
    response = send(
        "/v1/adapters",
        key=ADMIN,
        body=Body(3),
        max_request_mb=1,
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 503 and error_of(response)["code"] == "not_ready"


@pytest.mark.parametrize(("key", "status"), [(None, 401), ("wrong", 401), (USER, 200), (ADMIN, 200)])
def test_metrics_need_any_configured_key(key: str | None, status: int) -> None:
    assert send("/metrics", method="GET", key=key, body=b"").status_code == status


@pytest.mark.parametrize("path", ["/health", "/ready", "/docs", "/openapi.json"])
def test_probes_and_docs_stay_open(path: str) -> None:
    assert send(path, method="GET", body=b"").status_code in (200, 503)  # /ready: 503 while loading


def test_an_open_server_needs_no_key_for_metrics() -> None:
    assert send("/metrics", method="GET", body=b"", api_key=[], admin_key=[]).status_code == 200


def test_open_metrics_opens_metrics_alone() -> None:
    """For scrapers that send no key (the inference gateway's endpoint picker): /metrics only, nothing else."""
    assert send("/metrics", method="GET", body=b"", open_metrics=True).status_code == 200
    assert send("/generate", body=b"{}", open_metrics=True).status_code == 401


def test_a_body_too_deep_to_parse_is_a_json_400() -> None:
    response = send("/generate", key=USER, body=b"[" * 10_000)  # within the items a body may hold
    assert response.status_code == 400 and error_of(response)["code"] == "bad_request"


def test_health_is_200_while_the_model_loads() -> None:
    response = send("/health", method="GET", body=b"")  # no lifespan here: the model never finishes loading
    assert response.status_code == 200 and response.json() == {"status": "ok"}
