"""`loraplex serve --ray` stopped with SIGTERM (a container's or a service manager's stop) takes the application and
its local Ray down as Ctrl-C does and exits 0, instead of dying in the middle of it with Ray's processes left behind.
Skipped without the `ray` extra (`make test-ray` installs it and runs this)."""

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")


def test_sigterm_stops_serve_ray_as_ctrl_c_does(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    serve = [sys.executable, "-m", "loraplex", "serve", "--ray", "--port", str(port), "--device", "cpu"]
    settings = ["--base-model", str(tiny_model_dirs["llama"]), "--adapter-dir", str(tmp_path / "store")]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*serve, *settings, "--max-batch-size", "2"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "SIGTERM received" not in log.read_text()  # Ray's own handler: it killed the driver mid-shutdown
