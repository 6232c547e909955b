"""The training loop on a tiny random NF4 model: learning, checkpoints and an exact resume."""

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

import adapters.client
import training.loop
from training.checkpoint import STATE_FILE, latest_checkpoint
from training.config import TrainConfig
from training.errors import TrainingError
from training.run import train

REPO = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).with_name("ddp_entry.py")
ROWS = [{"prompt": f"question {i}?", "completion": f" answer {i % 3}."} for i in range(12)]


@pytest.fixture
def data(write_jsonl) -> Path:
    return write_jsonl(ROWS)


def config(data: Path, model_dir: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(
        data=data,
        output=output,
        base_model=str(model_dir),
        device="cpu",
        rank=4,
        lr=5e-3,
        batch_size=4,
        grad_accum=2,
        max_steps=6,
        save_every=3,
        dropout=0.1,
        seed=7,
    )
    return TrainConfig(**(values | overrides))


def test_trains_and_writes_adapter(data, tiny_model_dirs, tmp_path, caplog):
    caplog.set_level(logging.INFO, "loraplex.training")
    result = train(
        config(data, tiny_model_dirs["llama"], tmp_path / "out", eval_fraction=0.25, eval_every=2, log_every=4),
        progress=False,
    )
    fit = result.fit
    assert fit.steps == 6 and fit.final_loss < fit.first_loss and fit.eval_loss is not None
    # without the bar: the first step, every log_every, the last, and the eval losses
    logged = [m.split(":")[0] for m in caplog.messages]
    assert logged == ["step 1/6", "step 2", "step 4/6", "step 4", "step 6/6", "step 6"]
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= {
        p.name for p in result.output_dir.iterdir()
    }
    modes = {p.name: p.stat().st_mode & 0o777 for p in result.output_dir.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # safetensors' own 0600 is not left on the weights
    meta = json.loads((result.output_dir / "training.json").read_text())
    assert meta["dataset"]["rows"] == 12 and len(meta["dataset"]["sha256"]) == 64
    assert meta["hyperparameters"]["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert meta["base_model"]["architecture"] == "LlamaForCausalLM"
    assert meta["results"]["trained_tokens"] == fit.trained_tokens > 0
    assert latest_checkpoint(result.output_dir / "checkpoints").name == "step-0000003"


class Crash(Exception):
    pass


def test_resume_restores_optimizer_and_scheduler_exactly(data, tiny_model_dirs, tmp_path, monkeypatch):
    model_dir = tiny_model_dirs["qwen2"]
    whole = train(config(data, model_dir, tmp_path / "whole"), progress=False)

    # The same run, killed right after its step-3 checkpoint, then continued with --resume.
    real_save = training.loop.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Crash

    interrupted = config(data, model_dir, tmp_path / "resumed")
    monkeypatch.setattr(training.loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(interrupted, progress=False)
    monkeypatch.undo()
    state = torch.load(latest_checkpoint(interrupted.checkpoint_dir) / STATE_FILE, weights_only=True)
    assert state["step"] == 3 and state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3

    resumed = train(interrupted.model_copy(update={"resume": True}), progress=False)
    assert resumed.fit.steps == 6 and resumed.fit.trained_tokens == whole.fit.trained_tokens
    assert resumed.fit.final_loss == pytest.approx(whole.fit.final_loss, rel=1e-6)
    a = load_file(whole.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_resume_without_checkpoint_is_an_error(data, tiny_model_dirs, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(config(data, tiny_model_dirs["llama"], tmp_path / "o", resume=True), progress=False)


def test_two_process_ddp_on_cpu(data, tiny_model_dirs, tmp_path):
    """What `accelerate launch` / torchrun does on GPUs, on CPU with gloo: both processes train, one writes."""
    out = tmp_path / "ddp"
    argv = ["train", "--data", str(data), "--output", str(out), "--base-model", str(tiny_model_dirs["llama"])]
    argv += ["--device", "cpu", "--rank", "4", "--max-steps", "3", "--batch-size", "2", "--eval-fraction", "0.2"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ENTRY), *argv, "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter written to") == 1  # only the main process reports
    meta = json.loads((out / "training.json").read_text())
    assert meta["hyperparameters"]["processes"] == 2 and meta["results"]["steps"] == 3


class FakeClient:
    """The admin client, recording what training asks of it; `refuse` makes the named call fail."""

    calls: ClassVar[list[tuple]] = []
    refuse: ClassVar[str | None] = None

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.calls.append(("connect", base_url, api_key))

    def __enter__(self) -> "FakeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _call(self, what: str, *args: object) -> None:
        self.calls.append((what, *args))
        if self.refuse == what:
            raise adapters.client.AdminClientError("the key is refused", 401, "invalid_api_key")

    def check_access(self) -> None:
        self._call("check")

    def push(self, dir: Path, name: str) -> dict:
        assert (dir / "training.json").is_file() and (dir / "adapter_model.safetensors").is_file()
        self._call("push", name)
        return {"name": name, "version": 1}


@pytest.fixture
def fake_client(monkeypatch) -> type[FakeClient]:
    monkeypatch.setattr(adapters.client, "AdminClient", FakeClient)
    monkeypatch.setattr(FakeClient, "calls", [])
    return FakeClient


def test_push_checks_the_server_first_then_uploads_the_written_adapter(data, tiny_model_dirs, tmp_path, fake_client):
    cfg = config(data, tiny_model_dirs["llama"], tmp_path / "o", max_steps=1, push="http://srv", name="bot")
    result = train(cfg.model_copy(update={"api_key": "k"}), progress=False)
    connect = ("connect", "http://srv", "k")
    assert fake_client.calls == [connect, ("check",), connect, ("push", "bot")]
    assert result.pushed == {"name": "bot", "version": 1}


def test_refused_push_target_stops_before_training(data, tiny_model_dirs, tmp_path, fake_client, monkeypatch):
    monkeypatch.setattr(fake_client, "refuse", "check")
    cfg = config(data, tiny_model_dirs["llama"], tmp_path / "o", max_steps=1, push="http://srv", name="bot")
    with pytest.raises(TrainingError, match="--push http://srv: the key is refused; nothing was trained"):
        train(cfg, progress=False)
    assert not (tmp_path / "o").exists()


def test_failed_push_says_where_the_adapter_is(data, tiny_model_dirs, tmp_path, fake_client, monkeypatch):
    monkeypatch.setattr(fake_client, "refuse", "push")
    cfg = config(data, tiny_model_dirs["llama"], tmp_path / "o", max_steps=1, push="http://srv", name="bot")
    with pytest.raises(TrainingError, match=r"adapter was written to .*/o, but --push failed"):
        train(cfg, progress=False)
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
