import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))  # the shared PEFT fixtures

from peft_dirs import make_peft_dir


@pytest.fixture(scope="session")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_dir(tmp_path_factory.mktemp("peft") / "good")
