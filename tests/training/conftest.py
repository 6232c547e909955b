import json
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny import byte_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraplex.embedded import embedded_checkpoint


@pytest.fixture(scope="session")
def embedded_dir(embedded_cache_dir: Path) -> Path:
    return embedded_checkpoint(embedded_cache_dir)


@pytest.fixture(scope="session", params=["byte", "embedded"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    """Both tokenizers the masking must work with: the tiny byte one and the real SmolLM2 one."""
    if request.param == "byte":
        return byte_tokenizer()
    return AutoTokenizer.from_pretrained(request.getfixturevalue("embedded_dir"))


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    def write(rows: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    return write
