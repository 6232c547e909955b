import argparse
from pathlib import Path

import pytest

from training import cli
from training.config import ALL_LINEAR
from training.errors import TrainingError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_defaults(tmp_path: Path):
    config = cli.config_from_args(parse("--data", "d.jsonl", "--output", str(tmp_path)))
    assert (config.lr, config.rank, config.alpha, config.target_modules) == (2e-4, 16, 32, ALL_LINEAR)
    assert config.base_model is None and config.format == "auto" and not config.resume
    assert parse("--data", "x").func is cli.run


def test_flags_override_yaml_and_yaml_fills_the_rest(tmp_path: Path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "data: rows.jsonl\noutput: out\nrank: 8\nmax-seq-len: 256\nlr: 1.0e-3\ntarget_modules: q_proj, v_proj\n"
    )
    config = cli.config_from_args(parse("--config", str(path), "--rank", "4", "--resume"))
    assert config.rank == 4  # flag wins
    assert config.max_seq_len == 256 and config.lr == 1e-3  # hyphenated and underscored keys alike
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.data == Path("rows.jsonl") and config.resume


@pytest.mark.parametrize(
    ("yaml_text", "flags", "message"),
    [
        ("data: a\noutput: b\nrnak: 8\n", [], "'rnak'"),
        ("data: a\noutput: b\n", ["--rank", "0"], "'rank'"),
        ("data: a\noutput: b\n", ["--push", "http://x"], "--push needs --name"),
        ("data: a\noutput: b\n", ["--push", "http://x", "--name", "Bad Name"], "invalid adapter name"),
        ("output: b\n", [], "'data'"),
        ("data: a\noutput: b\n", ["--lr", "-1"], "'lr'"),
        ("- a\n- b\n", [], "must hold a mapping"),
        ("data: [\n", [], "not valid YAML"),
    ],
)
def test_invalid_config_is_one_error(tmp_path: Path, yaml_text: str, flags: list[str], message: str):
    path = tmp_path / "train.yaml"
    path.write_text(yaml_text)
    with pytest.raises(TrainingError, match=message):
        cli.config_from_args(parse("--config", str(path), *flags))


def test_cli_reports_bad_data_before_loading_the_model(tmp_path, monkeypatch, capsys, write_jsonl):
    import training.run

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load when the data is bad")

    monkeypatch.setattr(training.run, "load_base_model", no_model)
    data = write_jsonl([{"text": "ok"}, "{oops"])
    args = parse("--data", str(data), "--output", str(tmp_path / "o"), "--base-model", str(tmp_path / "none"))
    assert cli.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 2: invalid JSON" in err


@pytest.mark.parametrize(
    ("yaml_text", "flags", "message"),
    [
        (
            "data: a\noutput: b\n",
            ["--push", "http://x"],
            "--push needs --name: the name the adapter gets on the server",
        ),
        ("data: a\noutput: b\n", ["--force-resume"], "--force-resume only applies with --resume"),
        (
            "data: a\noutput: b\n",
            ["--no-gradient-checkpointing", "--checkpoint-share", "0.5"],
            "--checkpoint-share only applies with gradient checkpointing: drop one of the two",
        ),
        (
            "data: a\noutput: b\nbatch_szie: 4\nlearning-rate: 1.0e-4\n",
            [],
            "unknown training option 'batch_szie' (did you mean 'batch_size'?); unknown training option "
            "'learning_rate'",
        ),
        (
            "data: a\noutput: b\nrank: 0\nlr: x\n",
            [],
            "invalid training option 'lr': Input should be a valid number, unable to parse string as a number; "
            "invalid training option 'rank': Input should be greater than or equal to 1",
        ),
    ],
)
def test_an_error_names_every_wrong_option_in_user_words(tmp_path: Path, yaml_text: str, flags: list[str], message):
    """A check of several options was reported as option 'config' (which is the --config flag) with pydantic's
    'Value error,'; a misspelt key as 'Extra inputs are not permitted'; only the first of several errors."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml_text)
    with pytest.raises(TrainingError) as failure:
        cli.config_from_args(parse("--config", str(path), *flags))
    text = str(failure.value)
    assert text.startswith(message) and "Value error" not in text and "'config'" not in text, text
