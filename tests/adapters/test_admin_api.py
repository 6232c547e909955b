"""The admin routes through a FastAPI app that includes the router, with real multipart uploads; the
client and the CLI against the same app served by uvicorn."""

import argparse
import asyncio
import errno
import io
import json
import re
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from e2e.server import serve_app
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from peft_dirs import LIMITS, make_peft_dir, new_store, variants

from adapters import cli
from adapters import client as admin_client
from adapters.client import AdminClient, AdminClientError
from adapters.errors import InvalidAdapterName
from adapters.names import is_name, parse_ref
from adapters.validate import AdapterLimits
from loraplex.settings import Settings
from server.api.adapters import router
from server.api.errors import install_error_handlers
from server.api.intake import UploadSlots
from server.registry import AdapterRegistry, AdapterState


def make_app(root: Path, limits: AdapterLimits = LIMITS, **settings: object) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.settings = config = Settings(adapter_dir=root, **settings)
    app.state.registry = AdapterRegistry(
        new_store(root, limits), max_cpu_adapters=4, keep_versions=config.max_versions_per_adapter
    )
    app.state.uploads = UploadSlots(config.max_concurrent_uploads, config.max_uploads_per_client)
    return app


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(make_app(tmp_path / "store")) as test_client:
        yield test_client


def files_of(peft_dir: Path, training: dict | None = None) -> dict:
    files = {
        "config": ("adapter_config.json", (peft_dir / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (peft_dir / "adapter_model.safetensors").read_bytes()),
    }
    if training is not None:
        files["training"] = ("training.json", json.dumps(training).encode())
    return files


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def assert_error(response, status: int, code: str, match: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and match in error["message"] and error["type"] == "invalid_request_error"


def test_upload_versions_and_idempotency(client: TestClient, peft_dir: Path, tmp_path: Path) -> None:
    first = client.post("/v1/adapters", data={"name": "bot"}, files=files_of(peft_dir))
    assert first.status_code == 201 and first.json()["version"] == 1 and first.json()["origin"] == "uploaded"
    again = client.post("/v1/adapters", data={"name": "bot"}, files=files_of(peft_dir))
    assert again.status_code == 200 and again.json() == first.json()
    second = client.post(
        "/v1/adapters",
        data={"name": "bot"},
        files=files_of(make_peft_dir(tmp_path / "v2", seed=1), training={"dataset_sha256": "00", "loss": 1.2}),
    )
    assert second.status_code == 201 and second.json()["version"] == 2
    assert second.json()["origin"] == "trained" and second.json()["training"]["loss"] == 1.2
    shown = client.get("/v1/adapters/bot").json()
    assert shown["version"] == 2 and shown["state"] == "stored"
    assert [v["version"] for v in shown["versions"]] == [2, 1]  # newest first
    assert shown["versions_next"] is None and shown["versions_total"] == 2
    assert client.get("/v1/adapters/bot@1").json()["sha256"] == first.json()["sha256"]


def test_archive_upload_with_training_metadata(client: TestClient, peft_dir: Path) -> None:
    members = {f"out/{p.name}": p.read_bytes() for p in peft_dir.iterdir() if p.suffix != ".md"}
    members["out/training.json"] = json.dumps({"epochs": 2}).encode()
    response = client.post("/v1/adapters", data={"name": "packed"}, files={"archive": ("a.tar.gz", tar_bytes(members))})
    assert response.status_code == 201, response.text
    assert response.json()["origin"] == "trained" and response.json()["training"] == {"epochs": 2}


def test_unsafe_uploads_are_refused(client: TestClient, peft_dir: Path, tmp_path: Path) -> None:
    pickled = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, pickled)
    files = files_of(peft_dir)
    files["weights"] = ("adapter_model.safetensors", pickled.getvalue())
    assert_error(client.post("/v1/adapters", data={"name": "p"}, files=files), 415, "unsafe_adapter_format", "pickle")
    files["weights"] = ("adapter_model.bin", pickled.getvalue())
    assert_error(client.post("/v1/adapters", data={"name": "p"}, files=files), 415, "unsafe_adapter_format", "pickle")

    evil = tar_bytes({"../../evil": b"x", "adapter_config.json": b"{}"})
    response = client.post("/v1/adapters", data={"name": "t"}, files={"archive": ("a.tar.gz", evil)})
    assert_error(response, 400, "unsafe_archive", "outside")
    assert not (tmp_path / "evil").exists()

    dora = make_peft_dir(tmp_path / "dora", use_dora=True)
    response = client.post("/v1/adapters", data={"name": "d"}, files=files_of(dora))
    assert_error(response, 422, "unsupported_adapter", "DoRA")
    listing = {"data": [], "next": None, "broken": [], "broken_next": None, "broken_total": 0}
    assert client.get("/v1/adapters").json() == listing


def test_malformed_requests(client: TestClient, peft_dir: Path) -> None:
    files = files_of(peft_dir)
    assert_error(client.post("/v1/adapters", files=files), 400, "invalid_upload", "'name'")
    response = client.post("/v1/adapters", data={"name": "x"}, files={"config": files["config"]})
    assert_error(response, 400, "invalid_upload", "weights")
    response = client.post("/v1/adapters", data={"name": "x"}, files={**files, "archive": ("a.zip", b"PK")})
    assert_error(response, 400, "invalid_upload", "not both")
    response = client.post("/v1/adapters", data={"name": "Bad Name"}, files=files)
    assert_error(response, 400, "invalid_adapter_name", "a-z")
    assert_error(client.post("/v1/adapters", json={"name": "x"}), 400, "invalid_upload", "multipart")
    # a repeated field is refused, not read as its last copy (which named the adapter, or chose its config)
    response = client.post("/v1/adapters", data={"name": ["x", "y"]}, files=files)
    assert_error(response, 400, "invalid_upload", "['name'] are sent more than once")
    response = client.post("/v1/adapters", data={"name": "x"}, files=[*files.items(), ("config", files["config"])])
    assert_error(response, 400, "invalid_upload", "['config'] are sent more than once")
    assert client.get("/v1/adapters").json()["data"] == []


def test_an_error_quotes_what_was_sent_in_bounded_length(client: TestClient, peft_dir: Path) -> None:
    """Errors quote the value they refuse: a name field of 1 MiB (the multipart parser's bound on a text field), a
    config field or a tensor's key of megabytes made an answer that long. The message keeps its start (what is
    wrong) and its end (how to fix it)."""
    files = files_of(peft_dir)
    response = client.post("/v1/adapters", data={"name": "A" * 1_000_000}, files=files)
    assert_error(response, 400, "invalid_adapter_name", "use 1-64 characters of a-z")
    assert len(response.content) < 4096 and "invalid adapter name 'AAA" in response.text
    config = json.loads(files["config"][1])
    files["config"] = ("adapter_config.json", json.dumps({**config, "peft_type": "\x00" * 150_000}).encode())
    response = client.post("/v1/adapters", data={"name": "x"}, files=files)
    assert_error(response, 422, "invalid_adapter_config", "only LoRA adapters (peft_type 'LORA') can be served")
    assert len(response.content) < 4096
    assert client.get("/v1/adapters").json()["data"] == []


def test_upload_over_the_limit_is_cut_off(tmp_path: Path, peft_dir: Path) -> None:
    with TestClient(make_app(tmp_path / "store", AdapterLimits(max_rank=16, max_bytes=1024))) as client:
        big = {"weights": ("adapter_model.safetensors", b"\0" * (200 << 10))}
        response = client.post("/v1/adapters", data={"name": "big"}, files=big)
        assert_error(response, 413, "adapter_too_large", "max-adapter-mb")


def test_list_show_delete(client: TestClient, peft_dir: Path) -> None:
    for name in ["c", "a", "b"]:
        assert client.post("/v1/adapters", data={"name": name}, files=files_of(peft_dir)).status_code == 201
    page = client.get("/v1/adapters", params={"limit": 2}).json()
    assert [m["name"] for m in page["data"]] == ["a", "b"] and page["next"] == "b"
    page = client.get("/v1/adapters", params={"limit": 2, "after": page["next"]}).json()
    assert [m["name"] for m in page["data"]] == ["c"] and page["next"] is None

    registry: AdapterRegistry = client.app.state.registry
    asyncio.run(registry.acquire("a")).release()
    assert client.get("/v1/adapters/a").json()["state"] == "on_cpu"

    assert client.delete("/v1/adapters/a@1").json() == {"name": "a", "version": 1, "versions_deleted": 1}
    assert client.delete("/v1/adapters/b").json() == {"name": "b", "version": None, "versions_deleted": 1}
    assert registry.cpu_adapters == 0
    assert_error(client.get("/v1/adapters/a"), 404, "adapter_not_found", "'a'")
    assert_error(client.delete("/v1/adapters/b"), 404, "adapter_not_found", "b")
    assert_error(client.get("/v1/adapters/x@0"), 400, "invalid_adapter_name", "NAME@VERSION")
    assert [m["name"] for m in client.get("/v1/adapters").json()["data"]] == ["c"]


def version_pages(client: TestClient, ref: str, limit: int, between: Callable[[int], None] | None = None) -> list[int]:
    """Every version `GET /v1/adapters/{ref}` lists, following `versions_next`; `between(cursor)` runs between
    pages."""
    listed: list[int] = []
    params: dict = {"versions_limit": limit}
    while True:
        response = client.get(f"/v1/adapters/{ref}", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["versions"]) <= limit and page["version"] == int(ref.partition("@")[2] or page["version"])
        listed += [v["version"] for v in page["versions"]]
        if page["versions_next"] is None:
            return listed
        assert page["versions_next"] == listed[-1]
        if between is not None:
            between(page["versions_next"])
        params["versions_after"] = page["versions_next"]


def test_versions_are_paged_newest_first(client: TestClient, peft_dir: Path, tmp_path: Path) -> None:
    """A name's versions come a page at a time, newest first, through `versions_next`; versions stored between
    pages are newer than every cursor (a new first page shows them), and ones deleted drop out, without a repeat
    or a gap in the others."""
    dirs = variants(peft_dir, tmp_path / "variants", 30)
    for path in dirs[:23]:
        assert client.post("/v1/adapters", data={"name": "bot"}, files=files_of(path)).status_code == 201
    shown = client.get("/v1/adapters/bot").json()
    assert [v["version"] for v in shown["versions"]] == list(range(23, 0, -1)) and shown["versions_next"] is None
    assert shown["versions_total"] == 23 and shown["version"] == 23 and shown["versions"][0]["state"] == "stored"
    first = client.get("/v1/adapters/bot@3", params={"versions_limit": 5}).json()
    assert first["version"] == 3 and first["sha256"] == shown["versions"][-3]["sha256"]
    assert [v["version"] for v in first["versions"]] == [23, 22, 21, 20, 19] and first["versions_next"] == 19
    for limit in (1, 5, 22, 23, 1000):
        assert version_pages(client, "bot", limit) == list(range(23, 0, -1))
        assert version_pages(client, "bot@7", limit) == list(range(23, 0, -1))

    more = iter(dirs[23:])

    def upload_and_delete(cursor: int) -> None:
        assert client.post("/v1/adapters", data={"name": "bot"}, files=files_of(next(more))).status_code == 201
        if cursor > 2:
            assert client.delete(f"/v1/adapters/bot@{cursor - 2}").json()["versions_deleted"] == 1
            deleted.add(cursor - 2)

    deleted: set[int] = set()
    listed = version_pages(client, "bot", 4, upload_and_delete)
    assert listed == [n for n in range(23, 0, -1) if n not in deleted] and deleted == {18, 13, 8, 3}
    assert version_pages(client, "bot", 1000) == [n for n in range(27, 0, -1) if n not in deleted]  # 4 uploaded
    assert client.get("/v1/adapters/bot", params={"versions_after": 1}).json()["versions"] == []


@pytest.mark.parametrize(
    ("params", "match"),
    [({"versions_limit": 0}, "versions_limit: Input should be greater than or equal to 1"),
     ({"versions_limit": 1001}, "versions_limit: Input should be less than or equal to 1000"),
     ({"versions_limit": 10**9}, "versions_limit: Input should be less than or equal to 1000"),
     ({"versions_limit": "many"}, "versions_limit: Input should be a valid integer"),
     ({"versions_after": "abc"}, "versions_after='abc' is not a version number: send the versions_next"),
     ({"versions_after": "0"}, "versions_after='0' is not a version number"),
     ({"versions_after": "-3"}, "versions_after='-3' is not a version number"),
     ({"versions_after": "bot@3"}, "versions_after='bot@3' is not a version number"),
     ({"versions_after": "1" * 40}, "versions_after='11111111111111111111111111111111...' is not a version number"),
     ({"versions_after": ""}, "versions_after='' is not a version number")],
)  # fmt: skip
def test_a_bad_page_of_versions_says_what_to_send(client: TestClient, peft_dir: Path, params: dict, match: str) -> None:
    assert client.post("/v1/adapters", data={"name": "bot"}, files=files_of(peft_dir)).status_code == 201
    assert_error(client.get("/v1/adapters/bot", params=params), 422, "invalid_request", match)
    assert_error(client.get("/v1/adapters/bot@1", params=params), 422, "invalid_request", match)
    assert_error(client.get("/v1/adapters/ghost", params=params), 422, "invalid_request", match)  # before the name


def test_unreadable_versions_are_listed_a_page_at_a_time(tmp_path: Path, peft_dir: Path) -> None:
    """`broken` listed every unreadable version in the first page of the listing, whatever its `limit`: a store with
    many gave one answer of any size. They are paged as an adapter's versions are: `broken_limit`, `broken_next`,
    `broken_after`, `broken_total`."""
    root = tmp_path / "store"
    new_store(root).put("bot", peft_dir)
    keys = []
    for name, count in (("bot", 130), ("ghost", 120)):
        for number in range(2, 2 + count):
            (root / name / str(number)).mkdir(parents=True)
            (root / name / str(number) / "manifest.json").write_text("{")
            keys.append(f"{name}@{number}")
    with TestClient(make_app(root)) as client:
        first = client.get("/v1/adapters", params={"limit": 1}).json()
        assert [m["name"] for m in first["data"]] == ["bot"] and first["broken_total"] == 250
        assert [b["key"] for b in first["broken"]] == keys[:100] and first["broken_next"] == keys[99]
        listed, params = [], {"broken_limit": 7}
        while True:
            page = client.get("/v1/adapters", params=params).json()
            assert len(page["broken"]) <= 7 and page["data"][0]["name"] == "bot"
            listed += [b["key"] for b in page["broken"]]
            if page["broken_next"] is None:
                break
            params["broken_after"] = page["broken_next"]
        assert listed == keys
        assert "broken" not in client.get("/v1/adapters", params={"after": "a"}).json()  # the first page's part
        later = client.get("/v1/adapters", params={"after": "bot", "broken_after": "ghost@120"}).json()
        assert later["data"] == [] and [b["key"] for b in later["broken"]] == ["ghost@121"]
        for bad in ("bot", "bot@0", "BOT@3", "", "x" * 100):
            response = client.get("/v1/adapters", params={"broken_after": bad})
            assert_error(response, 422, "invalid_request", "is not a version's key: send the broken_next")
        response = client.get("/v1/adapters", params={"broken_limit": 1001})
        assert_error(response, 422, "invalid_request", "broken_limit: Input should be less than or equal to 1000")


def test_the_listing_is_the_json_it_was_with_each_versions_state_as_it_is_now(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing is encoded from each manifest's JSON, built once a version: byte for byte the answer FastAPI
    encoded from the whole page, and each version's state read at each listing."""
    root = tmp_path / "store"
    store = new_store(root)
    store.put("bot", peft_dir)
    store.put("bot", make_peft_dir(tmp_path / "v2", seed=1, target_modules="all-linear", lora_alpha=0.1))
    trained = make_peft_dir(tmp_path / "trained", seed=2)
    (trained / "training.json").write_text(json.dumps({"loss": 0.5, "note": "déjà vu"}))  # never listed
    store.put("trained", trained)
    (root / "ghost" / "2").mkdir(parents=True)
    (root / "ghost" / "2" / "manifest.json").write_text("{")
    app = make_app(root)
    registry = app.state.registry

    def page(states: dict[str, str], **params: object) -> bytes:
        manifests, cursor = registry.store.page(int(params.get("limit", 100)), params.get("after"))
        listing: dict = {
            "data": [{**m.model_dump(mode="json", exclude={"training"}), "state": states[m.key]} for m in manifests],
            "next": cursor,
        }
        if "after" not in params:
            error = registry.store.broken()[0].error
            listing |= {"broken": [{"key": "ghost@2", "name": "ghost", "version": 2, "error": error}]}
            listing |= {"broken_next": None, "broken_total": 1}
        return JSONResponse(listing).body

    stored = {"bot@2": "stored", "trained@1": "stored"}
    state = registry.state
    with TestClient(app) as client:
        for params in ({}, {"limit": 1}, {"after": "bot"}):
            response = client.get("/v1/adapters", params=params)
            assert response.content == page(stored, **params) and response.headers["content-type"] == "application/json"
        monkeypatch.setattr(registry, "state", lambda key: AdapterState.ON_CPU if key == "bot@2" else state(key))
        assert client.get("/v1/adapters").content == page({**stored, "bot@2": "on_cpu"})


def test_a_page_of_the_listing_is_built_off_the_event_loop(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of a thousand all-linear adapters (each manifest with its ~210 modules' shapes) took ~0.2 s to build
    and encode on the event loop, every other client's requests and streams held meanwhile. The page is held here
    while it is built: the server answers another request meanwhile."""
    app = make_app(tmp_path / "store")
    registry = app.state.registry
    registry.store.put("bot", peft_dir)
    building, answered = threading.Event(), threading.Event()
    state = registry.state

    def held_state(key: str) -> AdapterState:  # read as each entry of the page is built
        building.set()
        answered.wait(30)
        return state(key)

    monkeypatch.setattr(registry, "state", held_state)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        listed: list[httpx.Response] = []
        lister = threading.Thread(target=lambda: listed.append(http.get("/v1/adapters")))
        lister.start()
        try:
            assert building.wait(30)
            other = httpx.get(f"{url}/v1/adapters", params={"limit": 0}, timeout=5)  # the event loop's answer alone
            assert_error(other, 422, "invalid_request", "limit")
        finally:
            answered.set()
            lister.join(60)
    assert listed[0].status_code == 200 and [m["name"] for m in listed[0].json()["data"]] == ["bot"]


def test_retention_keeps_the_newest_versions(tmp_path: Path, peft_dir: Path) -> None:
    """--max-versions-per-adapter 2: each upload leaves the name's two newest versions; a version a request holds
    stays past the cap until a later upload finds it free; another name is untouched."""
    with TestClient(make_app(tmp_path / "store", max_versions_per_adapter=2)) as client:
        dirs = variants(peft_dir, tmp_path / "variants", 5)
        assert client.post("/v1/adapters", data={"name": "other"}, files=files_of(dirs[0])).status_code == 201
        for path in dirs[:3]:
            assert client.post("/v1/adapters", data={"name": "bot"}, files=files_of(path)).status_code == 201
        assert version_pages(client, "bot", 1) == [3, 2]
        assert_error(client.get("/v1/adapters/bot@1"), 404, "adapter_not_found", "its versions are [2, 3]")
        registry: AdapterRegistry = client.app.state.registry
        held = asyncio.run(registry.acquire("bot@2"))
        assert client.post("/v1/adapters", data={"name": "bot"}, files=files_of(dirs[3])).status_code == 201
        assert version_pages(client, "bot", 1) == [4, 3, 2]
        held.release()
        assert client.post("/v1/adapters", data={"name": "bot"}, files=files_of(dirs[4])).status_code == 201
        assert version_pages(client, "bot", 10) == [5, 4]
        assert version_pages(client, "other", 10) == [1]


def test_503_until_the_registry_is_up(tmp_path: Path) -> None:
    app = make_app(tmp_path / "store")
    del app.state.registry
    with TestClient(app) as client:
        response = client.get("/v1/adapters")
        assert response.status_code == 503 and response.headers["retry-after"] == "2"
        assert response.json()["error"]["code"] == "not_ready"


def test_admin_key_is_required_when_keys_are_set(tmp_path: Path, peft_dir: Path) -> None:
    app = make_app(tmp_path / "store", admin_key=["adm"], api_key=["inf"])
    with TestClient(app) as client:
        assert client.get("/v1/adapters").status_code == 401
        assert client.get("/v1/adapters", headers={"Authorization": "Bearer inf"}).status_code == 403
        assert client.get("/v1/adapters", headers={"Authorization": "Bearer adm"}).status_code == 200


# -- client and CLI against a served app ------------------------------------------------------------


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    with serve_app(make_app(tmp_path / "store")) as url:
        yield url


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="loraplex")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_client_push_list_remove(server_url: str, peft_dir: Path, tmp_path: Path) -> None:
    trained = make_peft_dir(tmp_path / "trained", seed=3)
    (trained / "training.json").write_text(json.dumps({"steps": 10}))
    with AdminClient(server_url) as client:
        assert client.push(peft_dir, "one")["version"] == 1
        assert client.push(trained, "two")["origin"] == "trained"
        archive = tmp_path / "three.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(peft_dir, arcname="three")
        assert client.push(archive, "three")["sha256"] == client.push(peft_dir, "one")["sha256"]
        (tmp_path / "empty").mkdir()
        with pytest.raises(AdminClientError, match="not a PEFT adapter directory"):
            client.push(tmp_path / "empty", "x")
        with pytest.raises(AdminClientError, match="no such adapter directory"):
            client.push(tmp_path / "nowhere", "x")
        assert [m["name"] for m in client.list()] == ["one", "three", "two"]
        client.remove("one")
        with pytest.raises(AdminClientError, match="no adapter 'one' to delete") as failure:
            client.remove("one")
        assert failure.value.http_status == 404 and failure.value.code == "adapter_not_found"
    with pytest.raises(AdminClientError, match="cannot reach"):
        AdminClient("http://127.0.0.1:9").list()


def test_client_and_cli_follow_the_pages_of_versions(
    server_url: str, peft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client library returns every version, oldest first, across the server's pages (of 4 here, 1000 by
    default); `list` asks for one page of a name's newest versions however many it has; `versions` lists them
    all."""
    monkeypatch.setattr(admin_client, "_PAGE", 4)
    with AdminClient(server_url) as client:
        for path in variants(peft_dir, tmp_path / "variants", 11):
            client.push(path, "bot")
        client.push(peft_dir, "solo")
        assert [v["version"] for v in client.versions("bot")] == list(range(1, 12))
        assert [v["version"] for v in client.versions("bot@5")] == list(range(1, 12))
        page = client.version_page("bot", versions_limit=3, after=5)
        assert [v["version"] for v in page["versions"]] == [4, 3, 2] and page["versions_next"] == 2
        assert page["versions_total"] == 11 and page["version"] == 11
        assert client.remove("bot@4") == 1
        assert [v["version"] for v in client.versions("bot")] == [1, 2, 3, *range(5, 12)]
        assert run_cli("adapters", "list", "--server", server_url) == 0
        rows = capsys.readouterr().out.splitlines()
        assert rows[1].startswith("bot ") and " ...,3,5,6,7,8,9,10,11 (of 10) " in rows[1]  # the 8 newest
        assert rows[2].split()[:2] == ["solo", "1"]
        assert run_cli("adapters", "versions", "bot", "--server", server_url) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == [f"bot@{n}" for n in (1, 2, 3, *range(5, 12))]
        assert all(line.split()[1] == "stored" for line in lines)
        assert run_cli("adapters", "rm", "bot", "--server", server_url) == 0
        assert capsys.readouterr().out.strip() == "deleted bot (10 versions)"
        assert run_cli("adapters", "versions", "bot", "--server", server_url) == 1
        assert "no adapter named 'bot'" in capsys.readouterr().err


def test_cli(server_url: str, peft_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("adapters", "push", str(peft_dir), "--name", "bot", "--server", server_url) == 0
    assert capsys.readouterr().out.startswith("pushed bot@1 (rank 4")
    assert run_cli("adapters", "list", "--server", server_url) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSIONS", "RANK", "ORIGIN", "SIZE", "CREATED"]
    assert lines[1].split()[:4] == ["bot", "1", "4", "uploaded"]
    assert run_cli("adapters", "rm", "bot@1", "--server", server_url) == 0
    assert run_cli("adapters", "rm", "bot", "--server", server_url) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no adapter 'bot' to delete"]


def test_uploads_in_progress_are_bounded_and_every_ending_frees_its_slot(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each upload keeps copies of its files on disk until it ends, so past --max-concurrent-uploads one more is
    a 429 before its body is read; the slot comes back when an upload is stored, refused, or its client drops
    the connection mid-body, and what was stored is untouched."""
    app = make_app(tmp_path / "store", max_concurrent_uploads=1)
    store = app.state.registry.store
    stored, go = threading.Event(), threading.Event()

    def held_put(name: str, src: Path):  # type: ignore[no-untyped-def]
        if name == "held":  # blocks in its worker thread, inside the upload, until the test lets it go
            stored.set()
            assert go.wait(30)
        return put(name, src)

    put = store.put
    monkeypatch.setattr(store, "put", held_put)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:

        def upload(name: str, files: dict | None = None) -> httpx.Response:
            return http.post("/v1/adapters", data={"name": name}, files=files or files_of(peft_dir))

        held: list[httpx.Response] = []
        first = threading.Thread(target=lambda: held.append(upload("held")))
        first.start()
        assert stored.wait(30)
        refused = upload("next")
        assert_error(refused, 429, "too_many_uploads", "--max-concurrent-uploads")
        assert refused.headers["retry-after"] == "2"
        go.set()
        first.join(30)
        assert held[0].status_code == 201, held[0].text

        dora = make_peft_dir(tmp_path / "dora", use_dora=True)
        assert_error(upload("dora", files_of(dora)), 422, "unsupported_adapter", "DoRA")  # refused: slot freed
        assert upload("next").status_code == 201

        # a client that sends part of its body and drops the connection: its slot is freed once the server sees it
        with socket.create_connection((http.base_url.host, http.base_url.port or 80)) as dropped:
            dropped.sendall(
                b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
                b'Content-Disposition: form-data; name="weights"; filename="w"\r\n\r\n' + b"\0" * 4096
            )
            deadline = time.monotonic() + 30
            while not app.state.uploads.taken:  # not probed by uploads: a probe would race it for the slot
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert_error(upload("next"), 429, "too_many_uploads", "retry")
        deadline = time.monotonic() + 30
        while (after := upload("after")).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert after.status_code == 201, after.text

        listed = {m["name"]: m for m in http.get("/v1/adapters").json()["data"]}
        assert sorted(listed) == ["after", "held", "next"]
        manifest = {k: v for k, v in held[0].json().items() if k != "training"}  # shown by GET /v1/adapters/held
        assert listed["held"] == {**manifest, "state": "stored"}


def held_upload(url: str, source: str, headers: str = "") -> socket.socket:
    """An upload from the address `source` whose head and first part arrive, and then nothing: it holds its slot
    until the connection is dropped."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), source_address=(source, 0))
    sock.sendall(
        f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n{headers}"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        'Content-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'.encode()
        + b"\0" * 4096
    )
    return sock


@pytest.mark.parametrize("identity", ["key", "address"])
def test_one_client_cannot_hold_every_upload_slot(tmp_path: Path, peft_dir: Path, identity: str) -> None:
    """--max-uploads-per-client 2 of 3 slots: a client (its key; on a server without keys, its address, as
    --max-requests-per-client counts them) holding two uploads gets 429 for a third while another client's uploads
    are stored; once its uploads end, it uploads again. Without the share it took the last slot, and every other
    client got 429 too_many_uploads until one of its uploads ended."""
    keys = {"admin_key": ["greedy-key", "honest-key"]} if identity == "key" else {}
    app = make_app(tmp_path / "store", max_concurrent_uploads=3, max_uploads_per_client=2, **keys)
    greedy_address = "127.0.0.1" if identity == "key" else "127.0.0.2"  # loopback: 127.0.0.0/8
    greedy_auth = {"Authorization": "Bearer greedy-key"} if identity == "key" else {}
    honest_auth = {"Authorization": "Bearer honest-key"} if identity == "key" else {}
    greedy_transport = httpx.HTTPTransport(local_address=greedy_address)
    with (
        serve_app(app) as url,
        httpx.Client(base_url=url, timeout=30, headers=honest_auth) as honest,
        httpx.Client(base_url=url, timeout=30, headers=greedy_auth, transport=greedy_transport) as greedy,
        ThreadPoolExecutor(1) as pool,
    ):
        kept = honest.post("/v1/adapters", data={"name": "kept"}, files=files_of(peft_dir)).json()
        header = "".join(f"{k}: {v}\r\n" for k, v in greedy_auth.items())
        held = [held_upload(url, greedy_address, header) for _ in range(2)]
        deadline = time.monotonic() + 30
        while app.state.uploads.taken < 2:  # not probed by uploads: a probe would race them for the slots
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # honest uploads in flight, one after another, while the greedy client asks for more
        stored = pool.map(
            lambda i: honest.post("/v1/adapters", data={"name": f"honest{i}"}, files=files_of(peft_dir)), range(3)
        )
        for _ in range(3):
            refused = greedy.post("/v1/adapters", data={"name": "greedy"}, files=files_of(peft_dir))
            assert_error(refused, 429, "client_upload_share_full", "--max-uploads-per-client")
            assert refused.headers["retry-after"] == "2"
        for i, answer in enumerate(stored):
            assert answer.status_code == 201 and answer.json()["name"] == f"honest{i}", answer.text
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 30
        while (
            after := greedy.post("/v1/adapters", data={"name": "greedy"}, files=files_of(peft_dir))
        ).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert after.status_code == 201, after.text
        listed = {m["name"]: m for m in honest.get("/v1/adapters").json()["data"]}
    assert sorted(listed) == ["greedy", "honest0", "honest1", "honest2", "kept"]
    assert listed["kept"] == {**{k: v for k, v in kept.items() if k != "training"}, "state": "stored"}
    assert app.state.uploads.taken == 0 and app.state.uploads.shares.holders == 0


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [(OSError(errno.ENOSPC, "No space left on device"), 507, "insufficient_storage"),
     (RuntimeError("a bug"), 500, "internal_error")],
    ids=["disk-full", "unexpected"],
)  # fmt: skip
def test_a_server_failure_mid_upload_is_a_json_error_and_stores_nothing(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception, status: int, code: str
) -> None:
    """The disk filling up while an upload is staged (or any error that is the server's) answers JSON, not the
    framework's plain text; the adapter stored before is intact and the next upload works."""
    with TestClient(make_app(tmp_path / "store"), raise_server_exceptions=False) as client:
        assert client.post("/v1/adapters", data={"name": "kept"}, files=files_of(peft_dir)).status_code == 201
        with monkeypatch.context() as patch:

            def fail(*args: object) -> None:
                raise failure

            patch.setattr("server.api.adapters.shutil.copyfileobj", fail)
            response = client.post("/v1/adapters", data={"name": "new"}, files=files_of(peft_dir))
        assert response.status_code == status
        error = response.json()["error"]
        assert error["code"] == code and error["type"] == "server_error"
        assert [a["name"] for a in client.get("/v1/adapters").json()["data"]] == ["kept"]
        assert client.post("/v1/adapters", data={"name": "new"}, files=files_of(peft_dir)).status_code == 201


def test_the_schema_states_the_upload_form_and_what_a_reference_may_be(client: TestClient, peft_dir: Path) -> None:
    """The OpenAPI schema a client is generated from names the upload's form fields (the route reads its form by
    hand) and the reference's pattern; the pattern takes exactly the references the server takes, and the server
    still answers one it does not take with its own message."""
    spec = client.get("/openapi.json").json()
    form = spec["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["name"]
    assert set(form["properties"]) == {"name", "config", "weights", "training", "archive"}
    name_pattern = re.compile(form["properties"]["name"]["pattern"])
    ref_patterns = {
        re.compile(next(p for p in op["parameters"] if p["name"] == "ref")["schema"]["pattern"])
        for op in spec["paths"]["/v1/adapters/{ref}"].values()
    }
    assert len(ref_patterns) == 1
    ref_pattern = ref_patterns.pop()
    names = ["bot", "b", "a" * 64, "a" * 65, "Bot", "-bot", "b.o_t-1", "bot@", "b t", "bøt"]
    refs = [*names, "bot@1", "bot@0", "bot@01", "bot@123456789", "bot@1234567890", "bot@2@3", "@2"]
    for ref in refs:
        try:
            parse_ref(ref)
        except InvalidAdapterName:
            taken = False
        else:
            taken = True
        assert bool(ref_pattern.fullmatch(ref)) == taken, ref
    for name in names:
        assert bool(name_pattern.fullmatch(name)) == is_name(name), name
    # the fields the schema names are the ones the route reads: an upload by them is stored
    with (
        (peft_dir / "adapter_config.json").open("rb") as config,
        (peft_dir / "adapter_model.safetensors").open("rb") as weights,
    ):
        stored = client.post("/v1/adapters", data={"name": "bot"}, files={"config": config, "weights": weights})
    assert stored.status_code == 201, stored.text
    refused = client.get("/v1/adapters/Bot@2")
    assert refused.status_code == 400 and "use 1-64 characters" in refused.json()["error"]["message"], refused.text
