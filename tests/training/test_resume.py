"""--resume against damaged checkpoints, changed settings and changed base weights (a directory's, a hub
repository's new commit), checked before the model loads; durable saves."""

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_loop import ROWS, config
from tiny import save_tiny
from transformers import AutoModelForCausalLM

import training.run
from loraplex.cli import main
from training.checkpoint import MANIFEST_FILE, STATE_FILE, CheckpointPlan, Progress, plan_checkpoints, save_checkpoint
from training.cli import summary
from training.errors import TrainingError
from training.fingerprint import base_weights
from training.run import train

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def finished(tiny_model_dirs, tmp_path_factory) -> Path:
    """A 7-step run that saved at steps 2, 4 and 6 and kept its checkpoints: the last two, 4 and 6."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    train(_config(data, tiny_model_dirs, root / "out", keep_checkpoints=True), progress=False)
    return root / "out"


def _config(data: Path, tiny_model_dirs: dict[str, Path], output: Path, **overrides):
    return config(data, tiny_model_dirs["llama"], output, **({"max_steps": 7, "save_every": 2} | overrides))


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """The finished run's output with its checkpoints, minus the final adapter: as a killed run leaves it."""
    out = tmp_path / "out"
    shutil.copytree(finished / "checkpoints", out / "checkpoints")
    return out


def _must_not_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model loaded before the checkpoint was checked")


@pytest.fixture
def no_model(monkeypatch) -> None:
    monkeypatch.setattr(training.run, "load_base_model", _must_not_load)


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "weights cut short": lambda ckpt: _cut_short(ckpt / WEIGHTS),
    "weights emptied": lambda ckpt: (ckpt / WEIGHTS).write_bytes(b""),
    "trainer state emptied": lambda ckpt: (ckpt / STATE_FILE).write_bytes(b""),
    "trainer state missing": lambda ckpt: (ckpt / STATE_FILE).unlink(),
    "manifest missing (killed before it was written)": lambda ckpt: (ckpt / MANIFEST_FILE).unlink(),
    "manifest garbled": lambda ckpt: _cut_short(ckpt / MANIFEST_FILE),
}


def test_a_finished_run_keeps_the_last_two_checkpoints_when_asked(finished):
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    manifest = json.loads((finished / "checkpoints" / "step-0000006" / MANIFEST_FILE).read_text())
    assert manifest["progress"]["step"] == 6 and manifest["fingerprint"]["lr"] == 0.005
    assert sorted(manifest["files"]) == sorted(["adapter_config.json", WEIGHTS, STATE_FILE])


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(run_copy, finished, tiny_model_dirs, damage):
    cfg = _config(finished.parent / "data.jsonl", tiny_model_dirs, run_copy, resume=True)
    fingerprint = json.loads((run_copy / "checkpoints" / "step-0000006" / MANIFEST_FILE).read_text())["fingerprint"]
    DAMAGE[damage](run_copy / "checkpoints" / "step-0000006")
    warnings: list[str] = []
    plan = plan_checkpoints(cfg, fingerprint, warnings.append)
    assert plan.resume_from == run_copy / "checkpoints" / "step-0000004" and plan.start.step == 4
    [warning] = warnings
    assert warning.startswith("--resume: skipping damaged checkpoint step-0000006: ") and "\n" not in warning
    assert warning.endswith("; resuming from step-0000004")


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_no_usable_checkpoint_is_one_line_before_the_model_loads(run_copy, finished, tiny_model_dirs, no_model, damage):
    for checkpoint in (run_copy / "checkpoints").iterdir():
        DAMAGE[damage](checkpoint)
    cfg = _config(finished.parent / "data.jsonl", tiny_model_dirs, run_copy, resume=True)
    with pytest.raises(TrainingError) as caught:
        train(cfg, progress=False)
    message = str(caught.value)
    assert message.startswith(f"--resume: no usable checkpoint in {run_copy / 'checkpoints'} (step-0000006: ")
    assert message.endswith(f"; remove {run_copy / 'checkpoints'} and run without --resume to start afresh")
    assert "\n" not in message


def test_cli_reports_a_damaged_checkpoint_in_one_line(run_copy, finished, tiny_model_dirs, no_model, capsys):
    """An empty trainer_state.pt was an EOFError traceback; a cut-short safetensors file a SafetensorError."""
    (run_copy / "checkpoints" / "step-0000006" / STATE_FILE).write_bytes(b"")
    _cut_short(run_copy / "checkpoints" / "step-0000004" / WEIGHTS)
    argv = ["train", "--data", str(finished.parent / "data.jsonl"), "--output", str(run_copy), "--resume"]
    argv += ["--base-model", str(tiny_model_dirs["llama"]), "--device", "cpu", "--max-steps", "7", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --resume: no usable checkpoint"), err


def test_resume_after_a_damaged_checkpoint_ends_as_the_uninterrupted_run(run_copy, finished, tiny_model_dirs, caplog):
    _cut_short(run_copy / "checkpoints" / "step-0000006" / WEIGHTS)
    caplog.set_level(logging.WARNING, "loraplex.training")
    result = train(_config(finished.parent / "data.jsonl", tiny_model_dirs, run_copy, resume=True), progress=False)
    assert [m for m in caplog.messages if "skipping damaged" in m] == [
        "--resume: skipping damaged checkpoint step-0000006: adapter_model.safetensors is not as written "
        "(sha256 differs); resuming from step-0000004"
    ]
    a, b = load_file(finished / WEIGHTS), load_file(run_copy / WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    expected = json.loads((finished / "training.json").read_text())["results"]
    results = json.loads((run_copy / "training.json").read_text())["results"]
    assert results["resumed"] == [{"from_step": 4, "changed": {}}]
    for counter in ("steps", "first_loss", "final_loss", "trained_tokens", "real_tokens"):
        assert results[counter] == expected[counter], counter
    assert results["trained_tokens"] <= results["real_tokens"]
    assert not (run_copy / "checkpoints").exists() and result.kept_checkpoints is None


CHANGES = {
    "lr": ({"lr": 1e-3}, "lr 0.005 -> 0.001"),
    "seed": ({"seed": 8}, "seed 7 -> 8"),
    "batch size": ({"batch_size": 2}, "batch_size 4 -> 2"),
    "accumulation": ({"grad_accum": 1}, "grad_accum 2 -> 1"),
    "schedule": ({"warmup_ratio": 0.2}, "warmup_ratio 0.03 -> 0.2"),
    "max steps": ({"max_steps": 9}, "max_steps 7 -> 9"),
    "rank and alpha": ({"rank": 8, "alpha": 16}, "rank 4 -> 8, alpha 32.0 -> 16.0"),
    "targets": ({"target_modules": "v_proj,q_proj"}, 'target_modules all-linear -> ["q_proj", "v_proj"]'),
    "max length": ({"max_seq_len": 16}, "max_seq_len 1024 -> 16, train_rows_sha256 "),
}


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_changed_settings_are_refused_before_the_model_loads(run_copy, finished, tiny_model_dirs, no_model, change):
    overrides, named = CHANGES[change]
    cfg = _config(finished.parent / "data.jsonl", tiny_model_dirs, run_copy, resume=True, **overrides)
    with pytest.raises(TrainingError) as caught:
        train(cfg, progress=False)
    message = str(caught.value)
    assert message.startswith(f"--resume: step-0000006 was written with other data or settings ({named}")
    assert message.endswith("or add --force-resume to go on with the new ones") and "\n" not in message


def test_changed_data_is_refused(run_copy, finished, tiny_model_dirs, no_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text((finished.parent / "data.jsonl").read_text() + json.dumps({"prompt": "q?", "completion": " a"}))
    with pytest.raises(TrainingError, match=r"\(data_sha256 \w{12} -> \w{12}, train_rows_sha256 \w{12} -> \w{12}\)"):
        train(_config(data, tiny_model_dirs, run_copy, resume=True), progress=False)


def test_forced_resume_goes_on_and_records_the_change(run_copy, finished, tiny_model_dirs):
    cfg = _config(finished.parent / "data.jsonl", tiny_model_dirs, run_copy, resume=True, force_resume=True, lr=1e-3)
    result = train(cfg, progress=False)
    resumed = json.loads((run_copy / "training.json").read_text())["results"]["resumed"]
    assert resumed == [{"from_step": 6, "changed": {"lr": [0.005, 0.001]}}]
    assert "resumed from step 6, with changed settings: lr 0.005 -> 0.001 " in summary(result)
    assert json.loads((run_copy / "training.json").read_text())["hyperparameters"]["lr"] == 0.001


def test_base_weights_changed_in_place_are_refused_before_the_model_loads(tiny_model_dirs, tmp_path, monkeypatch):
    """Other weights saved under the base model's path between the interrupted run and its resume: the resume went on
    training the adapter against them, and reported an ordinary resume."""
    base = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "out"
    train(config(data, base, out, max_steps=3, save_every=1, keep_checkpoints=True), progress=False)
    save_tiny(base, "llama", seed=5)  # same architecture and shapes, other weights
    resume = config(data, base, out, max_steps=3, save_every=1, resume=True)
    with monkeypatch.context() as patch:
        patch.setattr(training.run, "load_base_model", _must_not_load)
        with pytest.raises(TrainingError) as caught:
            train(resume, progress=False)
    assert str(caught.value) == (
        "--resume: the base model's weights are not those step-0000002 was trained on (base_weights: "
        f"model.safetensors rewritten); restore them, or remove {out / 'checkpoints'} and run without --resume to "
        "start afresh (--force-resume goes on with the new weights regardless)"
    )

    result = train(resume.model_copy(update={"force_resume": True}), progress=False)
    [resumed] = json.loads((out / "training.json").read_text())["results"]["resumed"]
    assert resumed["from_step"] == 2 and list(resumed["changed"]) == ["base_weights"]
    assert "with changed settings: base_weights: model.safetensors rewritten " in summary(result)


@pytest.mark.parametrize("recorded", ["missing", "null"])
def test_a_checkpoint_that_predates_base_weights_still_resumes(run_copy, finished, tiny_model_dirs, recorded):
    """Checkpoints written before the base weights were recorded say nothing of them (missing), nor do those of a
    hub id's base before it was trained from a snapshot (null): nothing to compare, no refusal."""
    cfg = _config(finished.parent / "data.jsonl", tiny_model_dirs, run_copy, resume=True)
    manifest_path = run_copy / "checkpoints" / "step-0000006" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    fingerprint = dict(manifest["fingerprint"])
    if recorded == "missing":
        del manifest["fingerprint"]["base_weights"]
    else:
        manifest["fingerprint"]["base_weights"] = None
    manifest_path.write_text(json.dumps(manifest))
    plan = plan_checkpoints(cfg, fingerprint, _no_warning)
    assert plan.start.step == 6 and plan.start.resumes[-1].changed == {}
    assert plan.fingerprint["base_weights"] == fingerprint["base_weights"]  # what the next checkpoints record


def test_base_weights_are_sampled_not_read_whole(tmp_path):
    """The base model is gigabytes, fingerprinted at every start: a few MiB of each weight file are read, spread
    enough over it that a rewritten part of the file shows."""
    weights = tmp_path / "model.safetensors"
    with weights.open("wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    (tmp_path / "config.json").write_text("{}")
    before = _bytes_read()
    fingerprint = base_weights(str(tmp_path))
    assert _bytes_read() - before < 8 << 20
    assert list(fingerprint) == ["model.safetensors"] and fingerprint["model.safetensors"]["bytes"] == 1 << 30
    with weights.open("r+b") as f:  # 64 MiB of the file's 1024 rewritten, as a fine-tune of a few layers would
        f.seek(600 << 20)
        f.write(os.urandom(64 << 20))
    assert base_weights(str(tmp_path)) != fingerprint  # the same size: only the sampled hash can tell


def _bytes_read() -> int:
    """What this process has read through read() calls so far, by the kernel's count."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def _no_warning(message: str) -> None:
    raise AssertionError(message)


def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused(run_copy, finished, tiny_model_dirs, no_model):
    with pytest.raises(TrainingError, match=r"holds checkpoints of an earlier run \(newest: step-0000006\): add "):
        train(_config(finished.parent / "data.jsonl", tiny_model_dirs, run_copy), progress=False)


def test_save_fsyncs_files_and_directory_before_the_rename_and_keeps_two_good(tiny_model_dirs, tmp_path, monkeypatch):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plan = CheckpointPlan(tmp_path / "checkpoints", {"lr": 1.0})
    events: list[str] = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}"))
    monkeypatch.setattr(Path, "rename", lambda self, to: events.append(f"rename {self} {to}") or real_rename(self, to))

    saved = save_checkpoint(plan, Progress(step=1), model, optimizer, scheduler)
    staging = plan.root / ".step-0000001.partial"
    *file_syncs, dir_sync, rename, parent_sync = events
    assert {f"fsync {staging / name}" for name in ("adapter_config.json", WEIGHTS, STATE_FILE, MANIFEST_FILE)} <= set(
        file_syncs
    )
    assert all(event.startswith(f"fsync {staging}/") for event in file_syncs)
    assert [dir_sync, rename, parent_sync] == [f"fsync {staging}", f"rename {staging} {saved}", f"fsync {plan.root}"]

    monkeypatch.setattr(os, "fsync", real_fsync)
    save_checkpoint(plan, Progress(step=2), model, optimizer, scheduler)
    _cut_short(plan.root / "step-0000002" / WEIGHTS)  # damaged on disk after it was written
    save_checkpoint(plan, Progress(step=3), model, optimizer, scheduler)
    # the last two good ones: the damaged step 2 is no fallback, so step 1 stays
    assert sorted(p.name for p in plan.root.iterdir()) == ["step-0000001", "step-0000003"]


def test_a_hub_base_is_trained_from_one_commit_and_a_new_commit_is_a_changed_base(
    tiny_model_dirs, tmp_path, monkeypatch
):
    """A base model named by hub id (a hub cache holding its repository, offline) is read from the snapshot of the
    commit its branch names, and training.json names that commit. Once the branch names a commit of other weights, a
    resume is refused before the model loads, as for a local directory whose weights were rewritten: it used to go on
    against whatever the hub served by then."""
    hub = tmp_path / "hub"
    repo = hub / "models--tinyorg--tiny-llama"
    first, second = "1" * 40, "2" * 40
    shutil.copytree(tiny_model_dirs["llama"], repo / "snapshots" / first)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "out"
    run = config(data, tiny_model_dirs["llama"], out, max_steps=3, save_every=1, keep_checkpoints=True)
    run = run.model_copy(update={"base_model": "tinyorg/tiny-llama"})
    train(run, progress=False)
    base = json.loads((out / "training.json").read_text())["base_model"]
    assert (base["source"], base["commit"]) == ("tinyorg/tiny-llama", first)

    save_tiny(repo / "snapshots" / second, "llama", seed=5)  # the same architecture, other weights
    (repo / "refs" / "main").write_text(second)
    monkeypatch.setattr(training.run, "load_base_model", _must_not_load)
    with pytest.raises(TrainingError, match=r"base_weights: model\.safetensors rewritten"):
        train(run.model_copy(update={"resume": True}), progress=False)
