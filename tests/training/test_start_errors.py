"""What `loraplex train` says when a run cannot start as asked: one line and exit code 2, before the model
loads, never a traceback, and never a run that trains somewhere else than asked."""

import json
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_cli import ctrl_c, sigint_default
from test_config import parse
from test_loop import ROWS

import training.run
from training import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(write_jsonl) -> Path:
    return write_jsonl(ROWS)


def must_not_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model loaded although the run cannot go as asked")


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training.run, "load_base_model", must_not_load)


def run_train(capsys: pytest.CaptureFixture[str], data: Path, output: Path, base: Path, *flags: str) -> str:
    """`loraplex train` in this process; returns its one line of error."""
    argv = ["--data", str(data), "--output", str(output), "--base-model", str(base), "--max-steps", "1", *flags]
    assert cli.run(parse(*argv, "--no-progress")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    return err


def test_an_invalid_loraplex_variable_is_named(data, tiny_model_dirs, tmp_path, monkeypatch, no_model, capsys):
    """The model cache's default comes from the server's settings, which read every LORAPLEX_* variable."""
    monkeypatch.setenv("LORAPLEX_PORT", "eighty")
    err = run_train(capsys, data, tmp_path / "out", tiny_model_dirs["llama"])
    assert "LORAPLEX_PORT" in err and "valid integer" in err and "--cache-dir" in err


@pytest.mark.parametrize("files", [{"config.json": "{}"}, {"config.json": None}])
def test_a_base_model_directory_that_holds_no_model(data, tiny_model_dirs, tmp_path, no_model, capsys, files):
    """An empty config; a model's config without its tokenizer."""
    base = tmp_path / "base"
    base.mkdir()
    for name, text in files.items():
        if text is None:
            shutil.copy(tiny_model_dirs["llama"] / name, base / name)
        else:
            (base / name).write_text(text)
    err = run_train(capsys, data, tmp_path / "out", base)
    assert f"base model {str(base)!r}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(data, tiny_model_dirs, tmp_path, no_model, capsys):
    """It trained on the CPU instead, saying nothing."""
    err = run_train(capsys, data, tmp_path / "out", tiny_model_dirs["llama"], "--device", "cuda")
    assert "--device cuda" in err and "CUDA is not available" in err


@pytest.mark.parametrize("make", ["file", "under a file"])
def test_an_output_that_cannot_hold_the_adapter(data, tiny_model_dirs, tmp_path, no_model, capsys, make):
    """It was found when the adapter was written, after the whole training, as a traceback."""
    (tmp_path / "taken").write_text("not a directory")
    output = tmp_path / "taken" if make == "file" else tmp_path / "taken" / "out"
    err = run_train(capsys, data, output, tiny_model_dirs["llama"], "--device", "cpu")
    assert f"--output {output}" in err and "nothing was trained" in err


def finished_run(capsys: pytest.CaptureFixture[str], data: Path, output: Path, base: Path, *flags: str) -> list[str]:
    """`loraplex train` into `output` run to its end (1 step unless `flags` say otherwise); returns its flags."""
    argv = ["--data", str(data), "--output", str(output), "--base-model", str(base), "--device", "cpu"]
    argv += ["--rank", "4", "--max-steps", "1", *flags, "--no-progress"]
    assert cli.run(parse(*argv)) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    return argv


def test_an_output_that_holds_an_adapter_is_not_trained_over(data, tiny_model_dirs, tmp_path, monkeypatch, capsys):
    """The same command run again trained a new adapter over the finished one, saying nothing."""
    out = tmp_path / "out"
    argv = finished_run(capsys, data, out, tiny_model_dirs["llama"])
    written = {path.name: path.read_bytes() for path in out.iterdir()}
    with monkeypatch.context() as patch:
        patch.setattr(training.run, "load_base_model", must_not_load)
        err = run_train(capsys, data, out, tiny_model_dirs["llama"], "--device", "cpu", "--rank", "8")
    assert err == (
        f"error: --output {out} already holds an adapter (adapter_model.safetensors): give another --output, or add "
        "--overwrite to replace it; nothing was trained"
    )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == written

    assert cli.run(parse(*argv, "--rank", "8", "--overwrite")) == 0, capsys.readouterr().err[-3000:]
    assert json.loads((out / "training.json").read_text())["hyperparameters"]["rank"] == 8


def test_a_resume_may_replace_the_adapter_of_its_own_run(data, tiny_model_dirs, tmp_path, capsys):
    """A finished run's kept checkpoints are resumed to train it longer: its adapter is the one to replace."""
    out = tmp_path / "out"
    flags = ("--max-steps", "2", "--save-every", "1", "--keep-checkpoints")  # the last step saves no checkpoint
    argv = finished_run(capsys, data, out, tiny_model_dirs["llama"], *flags)
    assert cli.run(parse(*argv, "--max-steps", "3", "--resume", "--force-resume")) == 0, capsys.readouterr().err
    results = json.loads((out / "training.json").read_text())["results"]
    assert results["steps"] == 3 and results["resumed"] == [{"from_step": 1, "changed": {"max_steps": [2, 3]}}]


def test_ctrl_c_says_how_to_go_on(data, tiny_model_dirs, tmp_path):
    """Ctrl-C printed the traceback of wherever the loop was; now it names the checkpoint --resume goes on from."""
    out = tmp_path / "out"
    argv = ["train", "--data", str(data), "--output", str(out), "--base-model", str(tiny_model_dirs["llama"])]
    argv += ["--device", "cpu", "--rank", "4", "--batch-size", "2", "--max-steps", "100000", "--save-every", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex", *argv, "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list((out / "checkpoints").glob("step-*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        stderr = ctrl_c(proc)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert last.startswith("interrupted") and f"{newest}" in last and "--resume" in last, last
    step = json.loads((newest / "checkpoint.json").read_text())["progress"]["step"]
    assert f"step {step}" in last


class HangingPush(BaseHTTPRequestHandler):
    """A server that takes the key, then never answers the upload."""

    posted = threading.Event()

    def do_GET(self) -> None:
        body = b'{"data": [], "next": null}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.posted.set()
        time.sleep(120)

    def log_message(self, *args: object) -> None:
        pass


def test_ctrl_c_during_the_push_says_the_adapter_is_written(data, tiny_model_dirs, tmp_path):
    """The checkpoints are removed before the push: "before the first checkpoint" would tell the user to start over."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HangingPush)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "out"
    argv = ["train", "--data", str(data), "--output", str(out), "--base-model", str(tiny_model_dirs["llama"])]
    argv += ["--device", "cpu", "--rank", "4", "--max-steps", "1", "--name", "bot"]
    argv += ["--push", f"http://127.0.0.1:{server.server_address[1]}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex", *argv, "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default,
    )  # fmt: skip
    try:
        assert HangingPush.posted.wait(240), proc.communicate(timeout=60)[1][-3000:]
        stderr = ctrl_c(proc)
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the adapter was written to {out}, but --push was interrupted (retry: "), last
    assert (out / "adapter_model.safetensors").is_file()
