"""bench/flood_client.py against a real server on CPU (a tiny random model): each kind of flood gets the answers
it is built to cause, so the benchmark cannot rot."""

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.server import running_server
from transformers import AutoModelForCausalLM

from loraplex.synthetic import byte_tokenizer, synthetic_config

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "flood_client.py"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("flood")
    AutoModelForCausalLM.from_config(synthetic_config("random:tiny")).save_pretrained(tmp / "tiny")
    byte_tokenizer().save_pretrained(tmp / "tiny")
    flags = ["--base-model", str(tmp / "tiny"), "--device", "cpu", "--max-seq-len", "256", "--adapter-dir",
             str(tmp / "store"), "--cache-dir", str(tmp / "cache")]  # fmt: skip
    with running_server(tmp / "server.log", *flags, startup_timeout=60) as url:
        yield url


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("kind", "status"), [("chat", 422), ("detokenize", 200), ("token_batches", 413), ("generate", 200), ("score", 200)]
)
def test_each_flood_gets_the_answers_it_is_built_to_cause(url: str, kind: str, status: int) -> None:
    """chat: templated, then refused as too long (the tokenizer's work only); detokenize: answered; token_batches:
    refused unparsed, its items past any honest request's; generate and score: answered."""
    flags = ["--url", url, "--kind", kind, "--connections", "2", "--requests", "20", "--ids", "200"]
    flags += ["--max-tokens", "4"]
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    codes = ast.literal_eval(done.stdout.splitlines()[-1])
    assert set(codes) == {status} and codes[status] >= 20
