"""Shared fixtures: tiny random model directories (fast) and the embedded model's cache (converted once)."""

import os
import sys
from pathlib import Path

# One compute thread for torch (OpenMP) in every test process and every server, trainer or script it starts (they
# inherit the variable): `make test` runs two test processes, most of them beside a server, on as few as two cores,
# where each process's team of one thread a core spun waiting on threads the others had descheduled (two processes
# of two threads took twice as long as of one). Read by torch when it is imported: set before.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch  # after the thread count above

sys.path.insert(0, str(Path(__file__).parent))  # `import tiny` from any test folder
if not torch.cuda.is_available():  # before Triton is imported: its kernels then run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from peft_dirs import make_peft_dir
from tiny import FAMILIES, save_tiny
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraplex.embedded import embedded_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`--dist loadfile`: the slowest files first, and the files sharing a session server on one process
    (scheduling.py); any other mode is pytest-xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from scheduling import SlowestFirstFileScheduling

    return SlowestFirstFileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_cache_dir() -> Path:
    """Cache dir for the embedded SmolLM2 checkpoint: git-ignored and kept between runs, so it converts once."""
    path = REPO / ".cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smollm2(embedded_cache_dir: Path) -> PreTrainedTokenizerBase:
    """The embedded model's tokenizer: what a server without --base-model tokenizes with."""
    return AutoTokenizer.from_pretrained(embedded_checkpoint(embedded_cache_dir))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny random model directory per supported family, as a user would pass to --base-model."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One valid PEFT adapter on the tiny llama (read-only: tests that alter files copy it first)."""
    return make_peft_dir(tmp_path_factory.mktemp("peft") / "good")
