"""What the Ray ingress relies on, without Ray: the routing key a request names, and the in-process call of
the app that carries a request across and streams its answer back."""

import ast
import asyncio
import json
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from server.api import adapters as adapters_api
from server.api import schemas
from server.api.jsonitems import max_json_items
from server.cli import run as serve_run
from server.fleet import routing
from server.fleet.asgi import ForwardedRequest, ResponseStart, call_app

REPO = Path(__file__).resolve().parents[2]
PROJECT = {"server", "adapters", "loraplex", "training"}
MAX_ITEMS = max_json_items(2048)  # the routes' bound at the default max_seq_len


@pytest.mark.parametrize(
    ("method", "path", "body", "adapter"),
    [
        ("POST", "/generate", {"inputs": "x", "parameters": {"adapter_id": "bot@2"}}, "bot@2"),
        ("POST", "/generate_stream", {"inputs": "x", "parameters": {"adapter_id": None}}, None),
        ("POST", "/v1/chat/completions", {"model": "bot", "messages": []}, "bot"),
        ("POST", "/v1/completions", {"model": "x" * 257, "prompt": "p"}, None),  # no route accepts it
        ("POST", "/v1/completions", {"model": 3, "prompt": "p"}, None),
        ("POST", "/v1/adapters", {"model": "bot"}, None),  # admin: any replica
        ("GET", "/v1/models", None, None),
        ("POST", "/generate", [1, 2], None),
        ("POST", "/generate", b"{not json", None),  # the replica answers with its own 422
        ("POST", "/generate", b'{"inputs": ' + b"[" * 100_000, None),  # nested past the parser's depth: the same
    ],
)
def test_the_routing_key_is_the_adapter_the_routes_read(
    method: str, path: str, body: object, adapter: str | None
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    assert routing.adapter_of(method, path, raw, MAX_ITEMS) == adapter


def test_a_body_past_the_routes_item_bound_is_not_parsed_for_its_routing_key() -> None:
    """4 MiB of one-id lists, more items than any route takes: the replica refuses it unparsed, and the ingress,
    which parsed it for its routing key, held ~25 times its bytes (and the interpreter lock, ~0.3 s) for each such
    body. Counted, it names no adapter, and costs a copy of its bytes or two; a body of as many items as the routes
    take is still read for its key."""
    past = b'{"model": "bot", "prompt": [' + b",".join([b"[3]"] * 1_000_000) + b"]}"
    tracemalloc.start()
    try:
        assert routing.adapter_of("POST", "/v1/completions", past, MAX_ITEMS) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(past), peak
    within = b'{"model": "bot", "prompt": [' + b",".join([b"[3]"] * (MAX_ITEMS // 2 - 8)) + b"]}"
    assert routing.adapter_of("POST", "/v1/completions", within, MAX_ITEMS) == "bot"


def test_the_routing_bound_is_the_routes_bound() -> None:
    assert routing.MAX_NAME_CHARS == schemas.MAX_NAME_CHARS
    assert adapters_api.router.prefix == routing.ADMIN_PREFIX


@pytest.mark.parametrize(
    ("method", "path", "upload"),
    [("POST", "/v1/adapters", True), ("POST", "/v1/adapters/", True), ("GET", "/v1/adapters", False),
     ("DELETE", "/v1/adapters/bot", False), ("POST", "/v1/adapters/bot", False), ("POST", "/generate", False)],
)  # fmt: skip
def test_an_upload_is_a_post_to_the_adapters_route(method: str, path: str, upload: bool) -> None:
    assert routing.is_upload(method, path) == upload


def test_the_ingress_loads_no_torch() -> None:
    """The ingress only forwards bytes: the project's modules it imports load neither torch nor transformers, which
    take seconds and hundreds of MB in every ingress process (the streams' backlog module once pulled in the
    engine's)."""
    tree = ast.parse((REPO / "server" / "fleet" / "ray_serve.py").read_text())
    modules = [
        node.module
        for node in tree.body  # top level: not the imports under TYPE_CHECKING
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT
    ]
    assert "server.api.sse" in modules
    code = "import sys\n" + "".join(f"import {module}\n" for module in modules)
    code += "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]"


def _forwarded(path: str) -> ForwardedRequest:
    return ForwardedRequest("POST", path, b"", [(b"content-type", b"application/json")], b'{"n": 3}')


def test_a_forwarded_request_streams_its_answer_chunk_by_chunk() -> None:
    app = FastAPI()
    finished = asyncio.Event()
    left = asyncio.Event()

    @app.post("/count")
    async def count(body: dict) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                for i in range(body["n"]):
                    yield f"{i};".encode()
                finished.set()
                await asyncio.sleep(3600)  # a stream that runs until its client leaves
            finally:
                left.set()

        return StreamingResponse(chunks(), headers={"x-app": "yes"})

    async def scenario() -> None:
        answer = call_app(app, _forwarded("/count"), [(b"x-loraplex-replica", b"r1")])
        start = await anext(answer)
        assert isinstance(start, ResponseStart) and start.status == 200
        assert (b"x-app", b"yes") in start.headers and (b"x-loraplex-replica", b"r1") in start.headers
        assert [await anext(answer) for _ in range(3)] == [b"0;", b"1;", b"2;"]
        await asyncio.wait_for(finished.wait(), 5)
        await answer.aclose()  # the client went away: the app's stream is cancelled, not left running
        await asyncio.wait_for(left.wait(), 5)

    asyncio.run(scenario())


def test_a_forwarded_request_gets_the_apps_own_answers() -> None:
    async def scenario() -> list[ResponseStart | bytes]:
        return [item async for item in call_app(FastAPI(), _forwarded("/nowhere"))]

    start, body = asyncio.run(scenario())
    assert isinstance(start, ResponseStart) and start.status == 404 and json.loads(body) == {"detail": "Not Found"}


def test_replicas_without_ray_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    from loraplex.cli import build_parser

    assert serve_run(build_parser().parse_args(["serve", "--replicas", "2"])) == 2
    assert capsys.readouterr().err == "loraplex serve: error: --replicas and --max-replicas need --ray\n"
