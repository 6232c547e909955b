"""The training loop on a tiny random NF4 model: learning, checkpoints and an exact resume."""

import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

import adapters.client
import training.run
from training.cli import summary
from training.config import TrainConfig
from training.errors import TrainingError
from training.model import CausalLMLoss
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
    assert meta["results"]["resumed"] == []
    # the step-3 checkpoint served its purpose once the adapter was written and read back
    assert not (result.output_dir / "checkpoints").exists() and result.kept_checkpoints is None
    # PEFT's resolved targets are a set: written in set order, they would differ from process to process
    peft_config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert peft_config["target_modules"] == sorted(peft_config["target_modules"])


def _losses(log_lines: str) -> dict[int, str]:
    """{step: loss as logged} from `step N/M: loss X, ...` lines."""
    return {int(m[1]): m[2] for m in re.finditer(r"step (\d+)/\d+: loss ([\d.]+)", log_lines)}


def test_sigkilled_run_resumes_to_the_same_adapter_and_reports_the_whole_run(data, tiny_model_dirs, tmp_path, caplog):
    """A real `loraplex train` killed with SIGKILL after a checkpoint, then resumed: the adapter is bitwise the
    uninterrupted run's, every step's loss is the same, and the results cover the whole run."""
    model_dir = tiny_model_dirs["qwen2"]
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "loraplex", "train", "--data", str(data), "--output", str(out)]
    argv += ["--base-model", str(model_dir), "--device", "cpu", "--rank", "4", "--lr", "5e-3", "--batch-size", "4"]
    argv += ["--grad-accum", "2", "--max-steps", "8", "--save-every", "2", "--dropout", "0.1", "--seed", "7"]
    argv += ["--no-progress", "--log-every", "1"]
    first = out / "checkpoints" / "step-0000002"
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def kill_after_first_checkpoint() -> None:  # a thread, so the reference run below overlaps its start-up
        deadline = time.monotonic() + 240
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    caplog.set_level(logging.INFO, "loraplex.training")
    run = config(data, model_dir, tmp_path / "whole", max_steps=8, save_every=2, log_every=1)
    whole = train(run, progress=False)
    whole_losses = _losses("\n".join(caplog.messages))
    caplog.clear()
    killer.join()
    killed_log = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, killed_log[-3000:]
    assert not (out / "training.json").exists()
    # another process, another string-hash salt: the same adapter_config.json all the same
    assert (first / "adapter_config.json").read_bytes() == (whole.output_dir / "adapter_config.json").read_bytes()

    resumed = train(run.model_copy(update={"output": out, "resume": True}), progress=False)
    meta = json.loads((out / "training.json").read_text())["results"]
    [resume] = meta["resumed"]
    assert resume["changed"] == {} and resume["from_step"] in (2, 4, 6)
    assert f"resumed from step {resume['from_step']} " in summary(resumed)
    # counters of the segment before the kill travel in the checkpoint: the totals are the uninterrupted run's
    assert meta["first_loss"] == whole.fit.first_loss
    assert meta["trained_tokens"] == whole.fit.trained_tokens <= meta["real_tokens"] == whole.fit.real_tokens
    assert f"{whole.fit.trained_tokens:,} trained tokens, {whole.fit.real_tokens:,} tokens" in summary(resumed)

    killed_losses, resumed_losses = _losses(killed_log), _losses("\n".join(caplog.messages))
    assert min(resumed_losses) == resume["from_step"] + 1 and max(resumed_losses) == 8
    for losses in (killed_losses, resumed_losses):
        assert losses and all(whole_losses[step] == loss for step, loss in losses.items())
    a = load_file(whole.output_dir / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert not (out / "checkpoints").exists()


def test_resume_without_checkpoint_is_an_error_before_the_model_loads(data, tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(training.run, "load_base_model", _must_not_load)
    with pytest.raises(TrainingError, match=r"no checkpoint in .*; run without --resume to start afresh"):
        train(config(data, tiny_model_dirs["llama"], tmp_path / "o", resume=True), progress=False)


def _must_not_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model loaded before the checkpoint was checked")


@pytest.mark.parametrize(
    ("memory_flags", "fix"),
    [
        ({"gradient_checkpointing": False}, "drop --no-gradient-checkpointing"),
        ({"checkpoint_share": 0.25}, "raise --checkpoint-share (0.25: more layers recomputed"),
    ],
)
def test_running_out_of_device_memory_names_what_to_change(
    data, tiny_model_dirs, tmp_path, monkeypatch, memory_flags: dict, fix: str
):
    """A micro-batch the device cannot hold (torch's OutOfMemoryError, raised at step 5's first forward) ends the
    run in one line: the step and batch, the flags that lower the memory (gradient checkpointing among them, as it
    was turned off or left to a share of the layers) and the step-3 checkpoint to resume from."""
    forward, calls = CausalLMLoss.forward, []

    def out_of_memory_at_step_5(self: CausalLMLoss, *args: object, **kwargs: object) -> object:
        calls.append(None)
        if len(calls) == 9:  # two micro-batches a step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMLoss, "forward", out_of_memory_at_step_5)
    run = config(data, tiny_model_dirs["llama"], tmp_path / "out", **memory_flags)
    with pytest.raises(TrainingError) as caught:
        train(run, progress=False)
    message = str(caught.value)
    assert re.fullmatch(r"out of memory at step 5 on a micro-batch of 4 rows x \d+ tokens: .*", message), message
    assert "--batch-size" in message and fix in message, message
    assert message.endswith("--resume goes on from the last checkpoint"), message
    assert [p.name for p in run.checkpoint_dir.iterdir()] == ["step-0000003"]


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
    refused = "--push http://srv: the key is refused; give an admin key with --api-key KEY; nothing was trained"
    with pytest.raises(TrainingError, match=refused):
        train(cfg, progress=False)
    assert not (tmp_path / "o").exists()


def test_failed_push_says_where_the_adapter_is(data, tiny_model_dirs, tmp_path, fake_client, monkeypatch):
    monkeypatch.setattr(fake_client, "refuse", "push")
    cfg = config(data, tiny_model_dirs["llama"], tmp_path / "o", max_steps=1, push="http://srv", name="bot")
    with pytest.raises(TrainingError, match=r"adapter was written to .*/o, but --push failed") as failed:
        train(cfg.model_copy(update={"api_key": "secret"}), progress=False)
    assert str(failed.value).endswith("--name bot --server http://srv --api-key KEY)")  # the retry; not the key
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_rows_cut_at_max_seq_len_are_reported(data, tiny_model_dirs, tmp_path, caplog):
    """Rows longer than --max-seq-len were cut silently: their ends, EOS included, untrained, so the adapter did not
    learn where they stop. Now a warning before the model loads says how many and how long, and so does the summary."""
    caplog.set_level(logging.WARNING, "loraplex.training")
    result = train(config(data, tiny_model_dirs["llama"], tmp_path / "o", max_steps=1, max_seq_len=16), progress=False)
    longest = max(len(row["prompt"]) + len(row["completion"]) for row in ROWS) + 1  # a token a byte, then EOS
    assert (
        f"12 of 12 rows are longer than --max-seq-len 16 (the longest {longest} tokens): cut there, their ends (EOS "
        "included) are not trained, so the adapter learns less where to stop; raise --max-seq-len to train them whole"
    ) in caplog.messages
    assert "trained 1 step on 12 rows (12 cut at --max-seq-len)" in summary(result)
