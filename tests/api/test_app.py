"""The app factory's start-up behaviour: readiness, and the warning an open server gives off loopback."""

import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from ready import wait_ready

from loraplex.basemodel import load_base_model
from loraplex.settings import Settings
from server.app import create_app


@pytest.mark.parametrize(
    ("host", "keys", "warns"), [("0.0.0.0", [], True), ("127.0.0.1", [], False), ("0.0.0.0", ["k"], False)]
)
def test_open_server_warns_off_loopback(
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    host: str,
    keys: list[str],
    warns: bool,
) -> None:
    base = load_base_model(
        str(tiny_model_dirs["llama"]), cache_dir=tmp_path, device="cpu", quantize=False, dtype=torch.float32
    )
    settings = Settings(
        host=host,
        api_key=keys,
        adapter_dir=tmp_path / "store",
        cache_dir=tmp_path,
        device="cpu",
        max_seq_len=64,
        max_batch_size=2,
    )
    with caplog.at_level(logging.WARNING, logger="loraplex"), TestClient(create_app(settings, base=base)) as client:
        wait_ready(client)
        assert client.get("/ready").json()["model"] == "llama"
    assert any("no API keys configured" in r.message for r in caplog.records) == warns
