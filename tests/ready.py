"""Waiting for an in-process app (fastapi's TestClient) to be ready: its base model loads on a thread at start-up."""

import time

from fastapi.testclient import TestClient


def wait_ready(client: TestClient, timeout: float = 60) -> TestClient:
    """`client`, once its app answers /ready with 200."""
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, f"the app was not ready within {timeout:.0f} s"
        time.sleep(0.02)
    return client
