"""What `loraplex adapters` says when it is pointed at the wrong place or given a reference that is not one:
one line on stderr and exit code 1, never a traceback, never a request for something else than was meant."""

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from e2e.server import serve_app
from peft_dirs import variants
from test_admin_api import make_app, run_cli

from adapters.client import AdminClient


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
