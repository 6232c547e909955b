"""Random-weight base models for capacity planning: `--base-model random:<preset or config.json>`.

Speed and memory depend on shapes, not on weight values, so a random model with a real model's config
measures what that model would cost without downloading it. Only the decoder Linears are NF4, as when
load_base_model quantizes a checkpoint, so adapters made for the real model fit it (same fingerprint).

The tokenizer is byte-level: one token per byte of the prompt, so a benchmark sets the prompt length in
tokens exactly by its length in bytes. Ids past the 256 bytes decode to short words (" w1234"), so every
sampled id from a large vocabulary streams visible text.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from loraplex.errors import BaseModelError

PREFIX = "random:"
SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")  # ids 0, 1, 2; the config's token ids are set to match
BYTE_VOCAB = len(SPECIALS) + 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
PRESETS: dict[str, dict] = {
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=BYTE_VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def is_synthetic(base_model: str | None) -> bool:
    return base_model is not None and base_model.startswith(PREFIX)


def synthetic_config(base_model: str) -> PretrainedConfig:
    """`random:llama3-8b` (a preset) or `random:path/to/config.json` (or its directory) -> the config."""
    spec = base_model.removeprefix(PREFIX)
    if spec in PRESETS:
        values = dict(PRESETS[spec])
    else:
        path = Path(spec).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise BaseModelError(
                f"{base_model!r}: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file"
            )
        try:
            values = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BaseModelError(f"{path} is not valid JSON: {exc}") from exc
    model_type = values.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as exc:
        raise BaseModelError(f"{base_model!r}: cannot build a config of model_type {model_type!r}: {exc}") from exc
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise BaseModelError(f"{base_model!r} is a {config.model_type!r} config, not a causal language model")
    if config.vocab_size < BYTE_VOCAB:
        raise BaseModelError(f"{base_model!r}: vocab_size {config.vocab_size} is below the {BYTE_VOCAB} byte tokens")
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    return config


def served_name(base_model: str) -> str:
    spec = Path(base_model.removeprefix(PREFIX))
    return "random-" + (spec.parent.name if spec.name == "config.json" else spec.stem)


def check_synthetic(base_model: str) -> tuple[str, str]:
    """check_base_model's answer for a `random:` source: (source, default served name)."""
    synthetic_config(base_model)
    return base_model, served_name(base_model)


def byte_tokenizer(vocab_size: int = BYTE_VOCAB) -> PreTrainedTokenizerFast:
    """pad/bos/eos (0-2), one token per byte (3-258), then filler words up to `vocab_size`."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(byte_chars)})
    # "Ġ" is the byte-level form of a space: filler id 1234 decodes to " w1234"
    vocab.update({f"Ġw{i}": i for i in range(BYTE_VOCAB, vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIALS[0], bos_token=SPECIALS[1], eos_token=SPECIALS[2]
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_synthetic(
    base_model: str, device: torch.device, dtype: torch.dtype, quantize: bool, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random model built straight on `device`, one module at a time: with quantize=True each decoder
    Linear exists in `dtype` only while it is quantized, so an 8B model never needs 16 GB anywhere."""
    config = synthetic_config(base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    keep_dense = model.get_output_embeddings()  # as transformers' bitsandbytes quantizer: lm_head stays dense
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, module in list(model.named_modules()):
            if quantize and isinstance(module, nn.Linear) and module is not keep_dense:
                _swap(model, name, _random_nf4(module, device, dtype, model.config.initializer_range))
            elif any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
                module.to_empty(device=device, recurse=False)
                model._init_weights(module)  # transformers' own init: normal weights, unit norms, RoPE tables
    if config.tie_word_embeddings:
        model.tie_weights()
    if quantize:  # what from_pretrained(quantization_config=nf4_config()) marks; PEFT and Trainer read these
        from transformers.quantizers import AutoHfQuantizer

        from loraplex.basemodel import nf4_config  # here: basemodel imports this module

        model.is_loaded_in_4bit = model.is_quantized = True
        model.quantization_method = "bitsandbytes"
        model.hf_quantizer = AutoHfQuantizer.from_config(nf4_config(dtype))
    model.eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model, byte_tokenizer(config.vocab_size)


def _random_nf4(linear: nn.Linear, device: torch.device, dtype: torch.dtype, std: float) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        quant_type="nf4",
        compress_statistics=True,
        device="meta",
    )
    weight = torch.empty(linear.out_features, linear.in_features, dtype=dtype, device=device).normal_(0.0, std)
    # Params4bit quantizes when moved to a device; the dtype copy is dropped right after
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=dtype, device=device), requires_grad=False)
    return q


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
