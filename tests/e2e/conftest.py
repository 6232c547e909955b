"""End-to-end fixtures: real servers on loopback ports, serving the embedded model in NF4 on CPU."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.server import ADMIN_KEY, INFERENCE_KEY, KEYED_CONNECTIONS, embedded_server


@pytest.fixture(scope="session")
def server(embedded_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An open server (no keys) with a small batch and one adapter store, shared by every end-to-end module that
    needs no server flags of its own: each start loads the model again (~15 s on two cores). Modules that share
    it upload under names of their own and never assume an empty store."""
    tmp = tmp_path_factory.mktemp("server")
    with embedded_server(
        tmp,
        embedded_cache_dir,
        "--max-batch-size",
        "4",
        "--max-seq-len",
        "512",
    ) as url:
        yield url


@pytest.fixture(scope="session")
def keyed_server(embedded_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server with an inference key and an admin key, a batch of 8 and a short queue, and its log: shared by the
    key and backpressure tests and the hostile requests (one start instead of two). The short queue (8) is
    flooded by the backpressure test's 48 requests; the hostile test's engine requests (7 at most, at once) fit
    in the batch, so none of its refusals can be a 429. Neither module adds adapters."""
    tmp = tmp_path_factory.mktemp("keyed")
    with embedded_server(
        tmp,
        embedded_cache_dir,
        "--max-batch-size",
        "8",
        "--max-queue",
        "8",
        "--max-seq-len",
        "512",
        "--max-request-mb",
        "1",
        "--max-connections",
        str(KEYED_CONNECTIONS),
        "--api-key",
        INFERENCE_KEY,
        "--admin-key",
        ADMIN_KEY,
    ) as url:
        yield url, tmp / "server.log"
