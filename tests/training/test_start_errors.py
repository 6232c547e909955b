"""What `loraplex train` says when a run cannot start as asked: one line and exit code 2, before the model
loads, never a traceback, and never a run that trains somewhere else than asked."""

import shutil
from pathlib import Path

import pytest
import torch
from test_config import parse
from test_loop import ROWS

import training.run
from training import cli


@pytest.fixture
def data(write_jsonl) -> Path:
    return write_jsonl(ROWS)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model loaded although the run cannot go as asked")

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
