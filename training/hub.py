"""A base model named by a hub id is trained from one commit of its repository: its files are fetched into the hub
cache (or found there) as that commit's snapshot directory, and the whole run reads that directory. So the weights
a resume checks against its checkpoint (fingerprint.base_weights) are the weights it trains, as for a local
directory, and training.json names the commit; a repository updated between a run and its resume is a change of
base weights, not a silent one. The config and tokenizer come first, so that the run's cheap checks (its data, its
output, its push target) still fail before gigabytes of weights are fetched."""

from pathlib import Path

from loraplex.basemodel import resolve_source
from loraplex.errors import BaseModelError, first_line
from loraplex.synthetic import is_synthetic

# What transformers reads besides the weights: configs, tokenizer files, chat templates
SMALL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# The weights transformers loads, not the repository's other copies of them (an original/ checkpoint, .h5, .onnx),
# which can be as large again; PyTorch's pickled .bin files only where a repository has no safetensors
WEIGHTS, OLD_WEIGHTS = "*.safetensors", "*.bin"


def pin_snapshot(base_model: str | None, cache_dir: Path) -> tuple[str | None, str | None]:
    """(the base model to train, its commit): a hub id becomes its snapshot directory at the commit its default
    branch names now, with its config and tokenizer (fetch_weights brings the rest); the embedded model, a
    directory or a random: model stay as given, without a commit."""
    if base_model is None or is_synthetic(base_model):
        return base_model, None
    source, _ = resolve_source(base_model, cache_dir)
    if Path(source).is_dir():
        return base_model, None
    snapshot = _download(source, None, SMALL_FILES)
    return str(snapshot), snapshot.name  # the cache names each snapshot directory by its commit


def fetch_weights(repo_id: str, commit: str) -> None:
    """The weights of `repo_id` at `commit` into its snapshot directory (pin_snapshot's), where missing."""
    if not any(_download(repo_id, commit, [WEIGHTS]).glob(WEIGHTS)):
        _download(repo_id, commit, [OLD_WEIGHTS])


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline without it in the cache, a gated or missing repository: one line
        raise BaseModelError(f"cannot fetch base model {repo_id!r} from the hub: {first_line(exc)}") from exc
