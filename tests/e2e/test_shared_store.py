"""Issue 17: two real servers on one adapter store, a shared directory and an S3-compatible server on loopback
(moto). Uploads race through both, what one stores the other serves at once, what one deletes the other
refuses within the refresh bound while its running request finishes, and a server killed with SIGKILL in the
middle of uploads leaves a store the other serves whole. Tiny random models keep the servers quick."""

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from peft_dirs import make_peft_dir, new_store
from s3_server import s3_server

from e2e.server import running_server

pytestmark = pytest.mark.e2e

REFRESH_S = 1.0
BUCKET = "loraplex-shared"


class Pair:
    def __init__(self, urls: list[str], root: Path, backend: str) -> None:
        self.a, self.b = urls
        self.root = root  # the shared directory; with S3, the first server's cache
        self.backend = backend


@pytest.fixture(scope="module", params=["directory", "s3"])
def pair(
    request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp(request.param)
    common = [
        "--base-model",
        str(tiny_model_dirs["llama"]),
        "--device",
        "cpu",
        "--max-batch-size",
        "4",
        "--max-seq-len",
        "256",
        "--store-refresh-s",
        str(REFRESH_S),
        "--max-concurrent-uploads",  # the race sends five uploads through one server at once
        "8",
    ]
    with contextlib.ExitStack() as stack:
        if request.param == "s3":
            env = stack.enter_context(s3_server(BUCKET))
            patch = stack.enter_context(pytest.MonkeyPatch.context())
            for key, value in env.items():  # the servers inherit them; boto3 reads them there
                patch.setenv(key, value)
            stores = [
                ["--adapter-store", f"s3://{BUCKET}/fleet", "--adapter-dir", str(tmp / f"cache-{i}")] for i in range(2)
            ]
        else:
            stores = [["--adapter-dir", str(tmp / "shared")]] * 2
        # started side by side: each loads its model while the other does
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(stack.enter_context, running_server(tmp / f"server-{i}.log", *common, *store))
                for i, store in enumerate(stores)
            ]
            urls = [f.result() for f in futures]
        yield Pair(urls, tmp / ("cache-0" if request.param == "s3" else "shared"), request.param)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_peft_dir(root / f"p{i}", seed=i) for i in range(12)]


def upload(url: str, name: str, peft_dir: Path) -> httpx.Response:
    files = {
        "config": ("adapter_config.json", (peft_dir / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (peft_dir / "adapter_model.safetensors").read_bytes()),
    }
    return httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files, timeout=60)


def generate(url: str, adapter: str, max_new_tokens: int = 2) -> httpx.Response:
    body = {"inputs": "hello", "parameters": {"adapter_id": adapter, "max_new_tokens": max_new_tokens}}
    return httpx.post(f"{url}/generate", json=body, timeout=120)


def versions(url: str, name: str) -> list[int]:
    response = httpx.get(f"{url}/v1/adapters/{name}", timeout=30)
    return sorted(v["version"] for v in response.json()["versions"]) if response.status_code == 200 else []


def test_concurrent_uploads_through_both_servers(pair: Pair, adapters: list[Path]) -> None:
    """Same name and different names at once through both servers: no number twice or skipped, one content
    stored twice only where another became the newest between its two uploads (an upload of the newest's content is
    answered with that version), and every version either absent or whole (each one listed is served by both
    servers)."""
    jobs = [(pair.a if i % 2 else pair.b, "race", adapters[i]) for i in range(4)]
    jobs += [(pair.b, "race", adapters[0])]  # the same content twice (through one server: S3 ties aside)
    jobs += [(pair.a if i % 2 else pair.b, f"solo-{i}", adapters[i]) for i in range(4)]
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:  # what the other server shows mid-race must already be servable
        while not stop.is_set():
            for number in versions(pair.a, "race"):
                if number not in seen:
                    assert generate(pair.a, f"race@{number}").status_code == 200
                    seen.add(number)

    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        watcher = pool.submit(watch)
        responses = list(pool.map(lambda job: upload(*job), jobs))
        stop.set()
        watcher.result()
    assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses]
    race = [r.json() for r in responses[:5]]
    content = {m["version"]: m["sha256"] for m in race}
    numbers = sorted(content)
    assert len(set(content.values())) == 4 and numbers in ([1, 2, 3, 4], [1, 2, 3, 4, 5]), numbers
    assert all(content[n] != content[n + 1] for n in numbers[:-1]), content
    for url in (pair.a, pair.b):
        assert versions(url, "race") == numbers
        for number in numbers:
            assert generate(url, f"race@{number}").status_code == 200
        for i in range(4):
            assert generate(url, f"solo-{i}").status_code == 200


def test_an_upload_through_one_is_served_by_the_other_at_once(pair: Pair, adapters: list[Path]) -> None:
    assert generate(pair.b, "fresh").status_code == 404
    assert upload(pair.a, "fresh", adapters[5]).status_code == 201
    assert generate(pair.b, "fresh").status_code == 200  # no wait: a miss looks in the store
    assert upload(pair.a, "fresh", adapters[6]).json()["version"] == 2
    assert generate(pair.b, "fresh@2").status_code == 200  # a version not seen yet: the same


def test_a_delete_through_one_is_refused_by_the_other_within_the_bound(pair: Pair, adapters: list[Path]) -> None:
    assert upload(pair.a, "doomed", adapters[7]).status_code == 201
    assert generate(pair.b, "doomed").status_code == 200  # loaded in the other server's CPU tier
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, pair.b, "doomed", 200)  # in flight on the other server
        time.sleep(0.2)
        deleted = time.monotonic()
        assert httpx.delete(f"{pair.a}/v1/adapters/doomed", timeout=30).json()["versions_deleted"] == 1
        while generate(pair.b, "doomed").status_code == 200:
            assert time.monotonic() - deleted < REFRESH_S + 2, "still served past the refresh bound"
            time.sleep(0.1)
        assert generate(pair.b, "doomed").status_code == 404
        assert running.result().status_code == 200  # the request that had started finishes
    assert upload(pair.b, "doomed", adapters[7]).json()["version"] == 2  # never a number twice


def test_a_server_killed_mid_upload_leaves_a_consistent_store(pair: Pair, adapters: list[Path]) -> None:
    """Last in the module: kills the first server (SIGKILL) while uploads through it are in flight."""
    victim = server_pid(pair.a)
    survivor_before = versions(pair.b, "crash")
    with ThreadPoolExecutor(8) as pool:
        uploads = [pool.submit(upload, pair.a if i % 2 else pair.b, "crash", adapters[i]) for i in range(8, 12)]
        uploads += [pool.submit(upload, pair.a, f"crash-{i}", adapters[i]) for i in range(4)]
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        outcomes = [f.exception() or f.result() for f in uploads]
    stored = [o.json() for o in outcomes if isinstance(o, httpx.Response) and o.status_code == 201]
    assert stored  # the survivor's uploads, at least, went in
    listed = versions(pair.b, "crash")
    assert survivor_before == [] and {m["version"] for m in stored if m["name"] == "crash"} <= set(listed)
    for number in listed:  # whatever is listed is whole
        assert generate(pair.b, f"crash@{number}").status_code == 200
    for i in range(4):
        assert generate(pair.b, f"crash-{i}").status_code in (200, 404)
    newest = upload(pair.b, "crash", adapters[2]).json()["version"]
    assert newest > max(listed)
    if pair.backend == "directory":  # what the dead server was writing goes when the next process starts
        new_store(pair.root)
        assert len(list(pair.root.glob(".tmp-*"))) == 1  # the survivor's own, locked while it lives


def server_pid(url: str) -> int:
    """The `loraplex serve` process listening on the url's port."""
    port = url.rsplit(":", 1)[1].encode()
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"serve" in args and b"--port" in args and args[args.index(b"--port") + 1] == port:
                return int(proc.name)
    raise AssertionError(f"no server process on port {port.decode()}")
