"""What `loraplex adapters` says when it is pointed at the wrong place or given a reference that is not one:
one line on stderr and exit code 1, never a traceback, never a request for something else than was meant."""

import contextlib
import functools
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from e2e.server import serve_app
from peft_dirs import variants
from test_admin_api import make_app, run_cli

from adapters import cli as adapters_cli
from adapters.client import AdminClient, AdminClientError


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    with serve_app(make_app(tmp_path / "store")) as url:
        yield url


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize(
    "make_url",
    [
        lambda port: f"127.0.0.1:{port}",
        lambda port: f"localhost:{port}",
        lambda port: f"http://127.0.0.1:{port}x",
        lambda port: "http://[::1",
        lambda port: "http://",
    ],
)
def test_a_server_url_that_is_not_one_says_how_to_write_it(server_url: str, make_url, capsys) -> None:
    url = make_url(server_url.rsplit(":", 1)[1])
    assert run_cli("adapters", "list", "--server", url) == 1
    err = one_error_line(capsys)
    assert f"invalid server URL {url!r}" in err and "http://HOST:PORT" in err


class NotLoraplex(BaseHTTPRequestHandler):
    """Another web server on the port: a page for every GET, its own HTML errors for the rest."""

    def do_GET(self) -> None:
        body = b"<html><body>my other app</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotLoraplex)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("argv", "answer"),
    [
        (["list"], "GET /v1/adapters with 200 OK, not JSON"),
        (["versions", "bot"], "GET /v1/adapters/bot with 200 OK, not JSON"),
        (["rm", "bot"], "DELETE /v1/adapters/bot with 501 Unsupported method ('DELETE')"),
    ],
)
def test_a_server_that_is_not_loraplex_is_named_as_such(other_server: str, argv: list[str], answer: str, capsys):
    assert run_cli("adapters", *argv, "--server", other_server) == 1
    err = one_error_line(capsys)
    assert f"the server at {other_server} answered {answer}" in err and "is it a loraplex server" in err
    assert "<" not in err  # no HTML


def test_a_push_refused_by_another_server_quotes_no_page(other_server: str, peft_dir: Path, capsys) -> None:
    assert run_cli("adapters", "push", str(peft_dir), "--name", "bot", "--server", other_server) == 1
    err = one_error_line(capsys)
    assert "answered POST /v1/adapters with 404 Not Found" in err and "<" not in err


@pytest.mark.parametrize("ref", ["bot#1", "bot?version=1", "bot/1", "../../v1/adapters", "", "..", "bot@0"])
def test_a_reference_that_is_no_adapter_is_refused_before_any_request(
    server_url: str, peft_dir: Path, tmp_path: Path, ref: str, capsys
) -> None:
    """`bot#1` (meaning bot@1) was sent as DELETE /v1/adapters/bot, the URL's fragment dropped: every version went."""
    with AdminClient(server_url) as client:
        for path in variants(peft_dir, tmp_path / "variants", 2):
            client.push(path, "bot")
        for command in ("rm", "versions"):
            assert run_cli("adapters", command, ref, "--server", server_url) == 1
            assert "invalid adapter" in one_error_line(capsys)
        assert [v["version"] for v in client.versions("bot")] == [1, 2]


def test_pushing_the_output_of_an_unfinished_training_run_says_to_finish_it(tmp_path: Path, capsys) -> None:
    """It said 'write it with save_pretrained()', which a `loraplex train` user never calls."""
    (tmp_path / "out" / "checkpoints" / "step-0000100").mkdir(parents=True)
    assert run_cli("adapters", "push", str(tmp_path / "out"), "--name", "bot", "--server", "http://127.0.0.1:9") == 1
    err = one_error_line(capsys)
    assert "unfinished `loraplex train` run" in err and "--resume" in err and "save_pretrained" not in err


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers, nor reads what is sent: a stuck server."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):  # a chance to see `stop`
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in [*held, listener]:
        connection.close()


QUICK_CALLS: dict[str, tuple[Callable[[AdminClient], object], str]] = {
    "list": (AdminClient.list, "GET /v1/adapters"),
    "versions": (lambda client: client.versions("bot"), "GET /v1/adapters/bot"),
    "remove": (lambda client: client.remove("bot"), "DELETE /v1/adapters/bot"),
    "check access": (AdminClient.check_access, "GET /v1/adapters"),
}


@pytest.mark.parametrize("call", QUICK_CALLS, ids=list(QUICK_CALLS))
def test_a_server_that_never_answers_is_named_after_the_short_timeout(silent_server: str, call: str) -> None:
    """Every call waited the upload's 300 s, then said it could not reach a server it had reached."""
    method, request = QUICK_CALLS[call]
    began = time.monotonic()
    with AdminClient(silent_server, timeout=0.5) as client, pytest.raises(AdminClientError) as caught:
        method(client)
    assert time.monotonic() - began < 10
    assert str(caught.value) == (
        f"the server at {silent_server} did not answer {request} within 0.5 s: check that a loraplex server is "
        "running there and is not stuck, then retry"
    )


@pytest.mark.parametrize("command", [["list"], ["versions", "bot"], ["rm", "bot"]])
def test_the_cli_says_in_one_line_that_the_server_did_not_answer(silent_server, command, monkeypatch, capsys) -> None:
    monkeypatch.setattr(adapters_cli, "AdminClient", functools.partial(AdminClient, timeout=0.5))
    assert run_cli("adapters", *command, "--server", silent_server) == 1
    err = one_error_line(capsys)
    assert err.startswith(f"error: the server at {silent_server} did not answer ") and "within 0.5 s" in err


@pytest.mark.parametrize("weights_mib", [0, 256], ids=["small: no answer", "large: no longer read"])
def test_an_upload_waits_its_own_longer_timeout(silent_server, peft_dir, tmp_path, weights_mib: int) -> None:
    """An upload of hundreds of MiB over a slow link takes minutes: it may not end at the quick calls' timeout."""
    if weights_mib:
        adapter = shutil.copytree(peft_dir, tmp_path / "large")
        with (adapter / "adapter_model.safetensors").open("r+b") as f:
            f.truncate(weights_mib << 20)  # sparse: more than the connection buffers, no disk used
    else:
        adapter = peft_dir
    began = time.monotonic()
    with AdminClient(silent_server, timeout=0.2, upload_timeout=1.5) as client, pytest.raises(AdminClientError) as e:
        client.push(adapter, "bot")
    assert 1.5 <= time.monotonic() - began < 10
    assert str(e.value).startswith(f"the server at {silent_server} did not answer POST /v1/adapters within 1.5 s: ")
