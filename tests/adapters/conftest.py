from pathlib import Path

import pytest
from peft_dirs import make_peft_dir


@pytest.fixture(scope="session")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One valid adapter (read-only: tests that alter files copy it first)."""
    return make_peft_dir(tmp_path_factory.mktemp("peft") / "good")
