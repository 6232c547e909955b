"""The `loraplex` command line: a quick start that loads nothing heavy, help that says everything, fast
failures, and the adapter commands against a fake admin API."""

import argparse
import ast
import logging
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from adapters import client as admin
from loraplex.cli import build_parser, main
from loraplex.logs import quiet_third_party
from loraplex.settings import Settings
from training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "server.app")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraplex", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def test_help_imports_nothing_heavy():
    argvs = [["--help"], ["serve", "--help"], ["train", "--help"], ["adapters", "list", "-h"]]
    probe = "\n".join(
        [
            "import sys",
            "from loraplex.cli import main",
            f"for argv in {argvs!r}:",
            "    try:",
            "        main(argv)",
            "    except SystemExit:",
            "        pass",
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)",
        ]
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0 and run.stdout.count("usage: loraplex") == len(argvs), run.stderr
    assert "HEAVY []" in run.stderr


def test_help_starts_in_under_a_second():
    # CPU seconds of the child, not wall time: the same bound on an idle machine and on a busy one
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = run_cli("--help")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert run.returncode == 0 and run.stderr == ""  # no third-party noise either
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 1.0


def test_serve_help_shows_every_flag_with_its_description_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, field in Settings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text
        assert field.description and " ".join(field.description.split()) in text, name
    assert "(default: 8000)" in text and "(default: auto)" in text and "(default: on)" in text


def test_the_readme_flags_table_lists_every_serve_flag():
    """The README's table of `loraplex serve` flags, which a newcomer reads before --help, misses none."""
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `--")]
    for name in Settings.model_fields:
        flag = f"`--{name.replace('_', '-')}"
        assert any(row.startswith(f"| {flag}") or f", {flag}" in row.split("|")[1] for row in rows), flag


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a variable the docs name as what not to set: a misspelling, and the ones Kubernetes' service links set
NOT_SETTINGS = {"LORAPLEX_ADMIN_KEYS", "LORAPLEX_PORT", "LORAPLEX_SERVICE_HOST"}


def doc_command_lines(text: str) -> list[str]:
    """The shell lines a newcomer copies: each bash block's lines (continuations joined; a comment's `or:`
    alternative too) and each inline `.venv/bin/...` or `make ...` command."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            code, *comment = re.split(r"(?:^|\s)#", line, maxsplit=1)
            lines += [code, *(c.removeprefix(" or:") for c in comment if c.startswith(" or: "))]
    lines += re.findall(r"`((?:\.venv/bin/|make )[^`]+)`", text)
    return [line.strip() for line in lines if line.strip()]


def shell_commands(line: str) -> list[list[str]]:
    """A shell line's simple commands, as the words each runs with (redirections left out)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    commands: list[list[str]] = [[]]
    redirect = False
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        elif set(token) <= set("<>"):
            redirect = True
        elif not redirect:
            commands[-1].append(token)
        else:
            redirect = False
    return [words for words in commands if words]


def loraplex_argvs(line: str) -> list[list[str]]:
    """The arguments each `loraplex` command of a shell line passes (`make serve ARGS=...` included)."""
    argvs = []
    for words in shell_commands(line):
        if words[:2] == ["make", "serve"]:
            args = [w.removeprefix("ARGS=") for w in words if w.startswith("ARGS=")]
            argvs.append(["serve", *shlex.split(args[0] if args else "")])
        for i, word in enumerate(words):
            # after variables it runs with (VAR=value), or as `python -m loraplex`
            if word.split("/")[-1] == "loraplex" and (all("=" in w for w in words[:i]) or words[i - 1] == "-m"):
                argvs.append(words[i + 1 :])
    return argvs


def test_the_docs_loraplex_commands_parse():
    """Every `loraplex` command the README and docs/ show, flags included, is one the command line takes, so a
    renamed or removed flag cannot stay in a page a newcomer copies from."""
    parser, seen = build_parser(), 0  # flags whole: one renamed from --name to --names must not pass as its prefix
    for doc in DOCS:
        for line in doc_command_lines(doc.read_text()):
            for argv in loraplex_argvs(line):
                try:
                    parser.parse_args(argv)
                except SystemExit as exc:
                    assert exc.code == 0, f"{doc.name}: {line}"  # 0: --help
                seen += 1
    assert seen >= 15  # the tour, Adapters, Training, Ray Serve and the shared store's commands


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and its subcommands' parsers, at every depth."""
    parsers = [parser]
    for each in parsers:
        parsers += [p for a in each._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    return parsers


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--max-seq", "10"],  # --max-seq-len
        ["train", "--dat", "rows.jsonl", "--output", "out"],  # --data
        ["adapters", "push", "dir", "--nam", "a"],  # --name
        ["adapters", "list", "--serv", "http://x"],  # --server
    ],
)
def test_an_abbreviated_flag_is_refused(argv: list[str], capsys):
    """A flag is taken written whole: an abbreviation would mean another flag once one beginning so is added."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    abbreviation = next(word for word in argv if word.startswith("--"))
    assert exc.value.code == 2 and abbreviation in capsys.readouterr().err
    assert all(not p.allow_abbrev for p in all_parsers(build_parser()))  # every subcommand's, one added later too


def test_every_argument_parser_of_the_repository_takes_flags_whole():
    """The benchmarks' command lines too: each ArgumentParser is made with allow_abbrev=False."""
    calls = []
    for path in (
        path for top in ("adapters", "bench", "loraplex", "server", "training") for path in (REPO / top).rglob("*.py")
    ):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == (
                "ArgumentParser"
            ):
                calls.append((path.relative_to(REPO), node.lineno, node))
    whole = [
        any(k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and k.value.value is False
            for k in node.keywords)
        for _, _, node in calls
    ]  # fmt: skip
    assert len(calls) >= 16
    assert all(whole), [f"{path}:{line}" for (path, line, _), ok in zip(calls, whole, strict=True) if not ok]


def test_the_docs_install_into_a_virtual_environment():
    """A bare `pip install` goes to the system's Python, where a fresh Debian or Ubuntu has no pip or refuses
    (externally managed): every install the docs show goes through a virtual environment's pip."""
    for doc in DOCS:
        for line in doc_command_lines(doc.read_text()):
            for words in shell_commands(line):
                runs_pip = words[0].split("/")[-1] in ("pip", "pip3") or words[1:3] == ["-m", "pip"]
                assert not runs_pip or "/bin/" in words[0], f"{doc.name}: {line}"


def test_the_readme_installs_the_venv_package_before_the_first_make():
    """`make` sets up .venv with `python3 -m venv`, which fails on a fresh Debian or Ubuntu until the python3-venv
    package is installed: the README says so before its first commands."""
    readme = (REPO / "README.md").read_text()
    assert "apt-get install python3-venv`" in readme[: readme.index("make serve")]


def test_the_docs_variables_are_settings():
    """Every LORAPLEX_* variable the docs name sets a flag: the server refuses one that does not, at start."""
    settings = {f"LORAPLEX_{name.upper()}" for name in Settings.model_fields}
    for doc in DOCS:
        named = set(re.findall(r"\bLORAPLEX_[A-Z_]*[A-Z]", doc.read_text()))
        assert named - NOT_SETTINGS <= settings, f"{doc.name}: {named - NOT_SETTINGS - settings}"


def test_train_help_shows_every_option_in_user_words(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    text = " ".join(out.split())
    for name, field in TrainConfig.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text and field.description, name
    assert "(default: 0.0002)" in text and "(default: all-linear)" in text and "--chat-template" in text
    assert "TrainConfig" not in out and "train()" not in out and "->" not in out


def test_serve_on_a_port_in_use_fails_at_once_in_one_line(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        run = run_cli("serve", "--port", str(port), "--cache-dir", str(tmp_path), "--device", "cpu")
    assert run.returncode == 2
    assert run.stderr.strip() == (
        f"loraplex serve: error: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(is another server running? choose another --port)"
    )
    assert time.monotonic() - began < 60 and not (tmp_path / "models").exists()  # nothing was converted or loaded


def test_ctrl_c_while_waiting_for_a_server_is_one_line():
    """Ctrl-C printed the traceback of wherever httpx was waiting."""
    with socket.socket() as silent:  # a server that takes the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraplex", "adapters", "list", "--server", url],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default,
        )  # fmt: skip
        silent.settimeout(60)
        connection, _ = silent.accept()
        with connection:
            connection.recv(1024)  # the request was sent: the command waits for its answer
            stderr = ctrl_c(proc)
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr


def sigint_default() -> None:
    """Run in the child before the command: SIGINT as a terminal leaves it. A job a shell without job control starts
    in the background (`cmd &` in a script, as a CI runner may) ignores SIGINT, and so does every process under it:
    Python then installs no KeyboardInterrupt handler, and Ctrl-C would be tested as nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ctrl_c(proc: subprocess.Popen) -> str:
    """SIGINT, again every 20 s as a user presses Ctrl-C again: one that lands while Python runs a finalizer is
    dropped ("Exception ignored in ..."). Not sooner: a second one while a handled first one's exit is still under
    way (seconds, on a loaded machine) kills the process by the signal instead of its exit status. Returns stderr."""
    for _ in range(6):
        proc.send_signal(signal.SIGINT)
        try:
            return proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    return proc.communicate()[1]


def test_a_misspelt_variable_is_refused_not_ignored(tmp_path: Path):
    """LORAPLEX_ADMIN_KEYS (for LORAPLEX_ADMIN_KEY) was skipped: the server started without keys, its adapters open
    to anyone's uploads and deletes."""
    run = subprocess.run(
        [sys.executable, "-m", "loraplex", "serve", "--base-model", str(tmp_path / "none"), "--port", "0"],
        env={**os.environ, "LORAPLEX_ADMIN_KEYS": "secret"}, capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.strip() == (
        "loraplex serve: error: unknown variable LORAPLEX_ADMIN_KEYS (did you mean LORAPLEX_ADMIN_KEY?): every "
        "LORAPLEX_* variable sets the `loraplex serve` flag of its name (`loraplex serve --help` lists them)"
    )


def test_bitsandbytes_kernels_warning_is_dropped_and_others_kept(caplog: pytest.LogCaptureFixture):
    quiet_third_party()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
    logger.warning("something else")
    assert caplog.messages == ["something else"]


class FakeServer:
    """The admin API as far as the CLI uses it: one adapter `bot` with versions 1 and 2."""

    def __init__(self) -> None:
        self.manifest = {
            "name": "bot",
            "version": 2,
            "rank": 8,
            "origin": "trained",
            "size_bytes": 3 << 20,
            "created_at": "2026-12-01T10:00:00+00:00",
            "sha256": "ab" * 32,
        }
        self.uploads = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/v1/adapters":
            return httpx.Response(200, json={"data": [self.manifest], "next": None})
        if request.method == "GET" and request.url.path == "/v1/adapters/bot":
            versions = [{"version": v, "sha256": "ab" * 32, "created_at": "", "state": "stored"} for v in (2, 1)]
            page = {"versions": versions, "versions_next": None, "versions_total": 2}
            return httpx.Response(200, json={**self.manifest, **page})
        if request.method == "POST":  # the tests push one content: 201 the first time, then 200 (already stored)
            self.uploads += 1
            return httpx.Response(201 if self.uploads == 1 else 200, json=self.manifest)
        return httpx.Response(404, json={"error": {"message": "no such route", "type": "x", "code": "not_found"}})


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    server = FakeServer()
    real_client = httpx.Client
    monkeypatch.setattr(admin.httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(server), **kw))
    return server


def test_adapters_list_shows_every_version(fake_server: FakeServer, capsys):
    assert main(["adapters", "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "VERSIONS", "RANK", "ORIGIN", "SIZE", "CREATED"]
    assert row.split()[:3] == ["bot", "1,2", "8"]


def test_pushing_the_same_content_again_says_it_was_already_stored(fake_server: FakeServer, peft_dir: Path, capsys):
    assert main(["adapters", "push", str(peft_dir), "--name", "bot"]) == 0
    assert capsys.readouterr().out.strip() == f"pushed bot@2 (rank 8, sha256 {'ab' * 6})"
    assert main(["adapters", "push", str(peft_dir), "--name", "bot"]) == 0
    assert capsys.readouterr().out.strip().startswith("already stored as bot@2, the same content")


@pytest.mark.parametrize(
    ("status", "message", "hint"),
    [
        (401, "missing API key: send the header 'Authorization: Bearer <key>'", "; give an admin key with"),
        (403, "this key may only run inference; managing adapters needs an admin key", ": give one with"),
    ],
)
def test_a_refused_key_names_the_flag_that_gives_one(monkeypatch: pytest.MonkeyPatch, status, message, hint, capsys):
    """The server's refusal speaks HTTP (the header a key goes in); the command line's says which flag sends it."""
    error = {"error": {"message": message, "type": "x", "code": "invalid_api_key"}}
    real_client = httpx.Client
    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=error))
    monkeypatch.setattr(admin.httpx, "Client", lambda **kw: real_client(transport=transport, **kw))
    assert main(["adapters", "list"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {message}{hint} --api-key KEY"


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "adapter_config.json"])
def test_pushing_one_file_suggests_its_directory(peft_dir: Path, file: str, capsys):
    assert main(["adapters", "push", str(peft_dir / file), "--name", "bot", "--server", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is one file of an adapter" in err and f"e.g. {peft_dir}," in err
