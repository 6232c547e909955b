"""Loading the base model: one function, used by serving and training alike."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraplex.embedded import EMBEDDED_NAME, embedded_checkpoint
from loraplex.errors import BaseModelError, first_line
from loraplex.synthetic import check_synthetic, is_synthetic, load_synthetic

DeviceSpec = Literal["auto", "cuda", "cpu"]


@dataclass(frozen=True)
class LoadedBase:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    served_name: str  # the name clients use for the base model (OpenAI `model`, /v1/models)
    device: torch.device


def resolve_device(spec: DeviceSpec) -> torch.device:
    if spec == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model computes in on `device`, NF4 weights dequantized to it: bf16 on CUDA; fp32 on a CPU, where
    bf16 matmuls without AVX512-BF16 are emulated (the embedded model decoded 1.4-1.8x and prefilled 6x slower)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def nf4_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def resolve_source(base_model: str | None, cache_dir: Path) -> tuple[str, str]:
    """(where to load from, default served name). None means the embedded SmolLM2."""
    if base_model is None:
        return str(embedded_checkpoint(cache_dir)), EMBEDDED_NAME
    path = Path(base_model).expanduser()
    looks_like_path = base_model.startswith((".", "/", "~")) or path.exists() or base_model.count("/") != 1
    if looks_like_path:
        if not path.is_dir():
            raise BaseModelError(f"base model directory {base_model!r} does not exist")
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{base_model!r} has no config.json: not a transformers model directory")
        return str(path), path.name
    return base_model, base_model.split("/")[-1]


def check_base_model(base_model: str | None, cache_dir: Path) -> tuple[str, str]:
    """Fail fast, before any weight is read: the source exists and holds a causal LM config.

    Returns (where to load from, default served name).
    """
    if is_synthetic(base_model):  # random:<preset|config.json>, random weights for capacity planning
        return check_synthetic(base_model)
    from transformers import AutoConfig, AutoModelForCausalLM

    source, default_name = resolve_source(base_model, cache_dir)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot read the config of base model {source!r}: {first_line(exc)}") from exc
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise BaseModelError(f"base model {source!r} is a {config.model_type!r} model, not a causal language model")
    return source, default_name


def load_base_model(
    base_model: str | None,
    *,
    cache_dir: Path,
    device: DeviceSpec = "auto",
    quantize: bool = True,
    dtype: torch.dtype | None = None,
    served_name: str | None = None,
) -> LoadedBase:
    """Load a causal LM (hub id, local directory, or None for the embedded model) with its tokenizer.

    quantize=True gives NF4 weights with double quantization and `dtype` compute (bitsandbytes, on CUDA
    and on CPU); quantize=False keeps `dtype` weights (the fp32 reference path of the tests). `dtype` defaults to
    the device's (compute_dtype).
    """
    from transformers import AutoModelForCausalLM

    source, default_name = check_base_model(base_model, cache_dir)
    dev = resolve_device(device)
    dtype = dtype or compute_dtype(dev)
    if is_synthetic(source):
        model, tokenizer = load_synthetic(source, dev, dtype, quantize)
    else:
        kwargs: dict = {"dtype": dtype, "device_map": {"": dev}}
        if quantize:
            kwargs["quantization_config"] = nf4_config(dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except Exception as exc:  # corrupt weights, a hub error: one clear line, whatever raised
            if isinstance(exc, BaseModelError):
                raise
            raise BaseModelError(f"cannot load base model {source!r}: {first_line(exc)}") from exc
        tokenizer = load_tokenizer(source)
        model.eval()
        model.requires_grad_(False)
    if dev.type == "cpu":
        from loraplex.cpu_weights import dequantize_once, expand_nested_scales  # bitsandbytes: only where used

        expand_nested_scales(model)
        dequantize_once(model, compute_dtype(dev))
    return LoadedBase(model, tokenizer, served_name or default_name, dev)


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a source that check_base_model passed; a missing or broken one is one BaseModelError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError or TypeError, in many lines
        hint = " (save the tokenizer into the model directory too)" if Path(source).is_dir() else ""
        why = first_line(exc).rstrip(": ")
        raise BaseModelError(f"cannot load the tokenizer of base model {source!r}{hint}: {why}") from exc
