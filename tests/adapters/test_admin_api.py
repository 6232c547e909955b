"""The admin routes through a FastAPI app that includes the router, with real multipart uploads; the
client and the CLI against the same app served by uvicorn."""

import argparse
import asyncio
import errno
import io
import json
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from e2e.server import serve_app
from fastapi import FastAPI
from fastapi.testclient import TestClient
from peft_dirs import LIMITS, make_peft_dir, new_store

from adapters import cli
from adapters.client import AdminClient, AdminClientError
from adapters.validate import AdapterLimits
from loraplex.settings import Settings
from server.api.adapters import UploadSlots, router
from server.api.errors import install_error_handlers
from server.registry import AdapterRegistry


def make_app(root: Path, limits: AdapterLimits = LIMITS, **settings: object) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.settings = config = Settings(adapter_dir=root, **settings)
    app.state.registry = AdapterRegistry(new_store(root, limits), max_cpu_adapters=4)
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
    assert [v["version"] for v in shown["versions"]] == [1, 2]
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
    assert client.get("/v1/adapters").json() == {"data": [], "next": None, "broken": []}


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

    assert client.delete("/v1/adapters/a@1").json() == {"deleted": ["a@1"]}
    assert client.delete("/v1/adapters/b").json() == {"deleted": ["b@1"]}
    assert registry.cpu_adapters == 0
    assert_error(client.get("/v1/adapters/a"), 404, "adapter_not_found", "'a'")
    assert_error(client.delete("/v1/adapters/b"), 404, "adapter_not_found", "b")
    assert_error(client.get("/v1/adapters/x@0"), 400, "invalid_adapter_name", "NAME@VERSION")
    assert [m["name"] for m in client.get("/v1/adapters").json()["data"]] == ["c"]


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
