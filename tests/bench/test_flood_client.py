"""bench/flood_client.py against a real server on CPU (a tiny random model): each kind of flood gets the answers
it is built to cause, so the benchmark cannot rot."""

import ast
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForCausalLM

from loraplex.synthetic import byte_tokenizer, synthetic_config

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "flood_client.py"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("flood")
    AutoModelForCausalLM.from_config(synthetic_config("random:tiny")).save_pretrained(tmp / "tiny")
    byte_tokenizer().save_pretrained(tmp / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--base-model", str(tmp / "tiny"), "--device", "cpu", "--port", str(port), "--max-seq-len", "256",
             "--adapter-dir", str(tmp / "store"), "--cache-dir", str(tmp / "cache")]  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", *flags], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and server.poll() is None
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.e2e
@pytest.mark.parametrize(("kind", "status"), [("chat", 422), ("detokenize", 200)])
def test_each_flood_gets_the_answers_it_is_built_to_cause(url: str, kind: str, status: int) -> None:
    """chat: templated, then refused as too long (the tokenizer's work only); detokenize: answered."""
    flags = ["--url", url, "--kind", kind, "--connections", "2", "--requests", "20", "--ids", "200"]
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    codes = ast.literal_eval(done.stdout.splitlines()[-1])
    assert set(codes) == {status} and codes[status] >= 20
