"""End-to-end fixtures: real servers on loopback ports, serving the embedded model in NF4 on CPU."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.server import embedded_server


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
