"""A base model named by a hub id is trained from one commit of its repository: its files are fetched into the hub
cache (or found there) as that commit's snapshot directory, and the whole run reads that directory. So the weights
a resume checks against its checkpoint (fingerprint.base_weights) are the weights it trains, as for a local
directory, and training.json names the commit; a repository updated between a run and its resume is a change of
base weights, not a silent one."""

from pathlib import Path

from loraplex.basemodel import resolve_source
from loraplex.errors import BaseModelError, first_line
from loraplex.synthetic import is_synthetic

# What transformers loads a model and its tokenizer from; not the repository's other copies of the weights (an
# original/ checkpoint, .bin, .h5, .onnx), which can be as large again
FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
OLD_WEIGHTS = "*.bin"  # a repository without safetensors: PyTorch's pickled weights, what transformers then loads


def pin_snapshot(base_model: str | None, cache_dir: Path) -> tuple[str | None, str | None]:
    """(the base model to train, its commit): a hub id becomes its snapshot directory at the commit its default
    branch names now (downloaded where missing); the embedded model, a directory or a random: model stay as given,
    without a commit."""
    if base_model is None or is_synthetic(base_model):
        return base_model, None
    source, _ = resolve_source(base_model, cache_dir)
    if Path(source).is_dir():
        return base_model, None
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(source, allow_patterns=FILES))
        if not any(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(source, allow_patterns=[*FILES, OLD_WEIGHTS]))
    except Exception as exc:  # offline without it in the cache, a gated or missing repository: one line
        raise BaseModelError(f"cannot fetch base model {source!r} from the hub: {first_line(exc)}") from exc
    return str(snapshot), snapshot.name  # the cache names each snapshot directory by its commit
