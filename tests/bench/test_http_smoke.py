"""CI smoke run of the load generator against a real server on CPU: a tiny random model, uploaded
random adapters, base and adapter traffic. The script itself must fail loudly, so its exit code is checked."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from random_adapters import write_adapters
from transformers import AutoModelForCausalLM

from loraplex.synthetic import byte_tokenizer, synthetic_config

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "http_load.py"


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_smoke_run_against_a_served_tiny_model(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(synthetic_config("random:tiny")).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    write_adapters(str(model_dir), tmp_path / "adapters", count=2, rank=4)
    serve = f"--base-model {model_dir} --device cpu --adapter-dir {tmp_path / 'store'} --cache-dir {tmp_path / 'cache'}"
    # its own session: on a timeout the whole group goes, the server it started included
    process = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--serve",
            serve,
            "--adapters-dir",
            str(tmp_path / "adapters"),
            "--upload",
            "--adapters-in-use",
            "0,2",
            "--out",
            str(tmp_path / "report.json"),
            "--server-log",
            str(tmp_path / "server.log"),
            "--processes",  # the smoke run's two clients, one in each of two load-generating processes
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    assert process.returncode == 0, stdout + stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["registered_adapters"] == 2
    assert report["tokenizer"] == str(model_dir)  # prompts built with the served model's tokenizer and checked
    assert [p["adapters_in_use"] for p in report["points"]] == [0, 2]
    assert all(p["ok"] == p["requests"] > 0 and p["output_tokens"] > 0 for p in report["points"])
    assert "| adapters |" in stdout
    assert "loraplex: listening on" in (tmp_path / "server.log").read_text()  # the server's output, kept
    # each point's CPU: the load generator's and the server's (read from /proc), both busy while it ran
    assert all(p["client_cpu_per_s"] > 0 and p["server_cpu_per_s"] > 0 for p in report["points"])
