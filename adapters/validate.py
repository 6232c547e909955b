"""Everything an adapter must pass before it is stored. Nothing here unpickles: weights are read only as
safetensors, after their header has been checked."""

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.bounds import check_magnitudes, check_tensors
from adapters.errors import (
    AdapterRankTooLarge,
    AdapterTooLarge,
    IncompatibleAdapter,
    InvalidAdapterConfig,
    InvalidAdapterWeights,
    UnsafeAdapterFormat,
    UnsupportedAdapter,
    reason,
)
from adapters.fingerprint import BaseFingerprint
from adapters.fullmatch import fullmatches
from adapters.lora import LoraWeights, lora_weights_from_state, pattern_value, split_peft_key

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAINING_FILE = "training.json"
CHECKPOINTS_DIR = "checkpoints"  # where `loraplex train` keeps a run's checkpoints, in its output directory
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Modules whose adaptation changes the vocabulary or embeddings: the slot-stacked kernels serve Linear
# projections inside the blocks only.
VOCAB_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings"})
# A weights file's header: safetensors itself allows 100 MB, and load_file makes a tensor of every entry (32 MB of
# empty entries: 300,000 tensors, 16 s and 0.8 GB). An adapter has two tensors per adapted linear layer, a few
# hundred; ~130 header bytes each.
MAX_TENSORS = 16_384
_MAX_HEADER = 4 << 20
MAX_JSON_DEPTH = 32  # PEFT's config is 2 levels deep; training metadata a few more
# json.loads takes ~10x a document's size in memory, holding the GIL: the config is ~1 KB, the training
# metadata tens of KB (it lists the base model's modules)
MAX_JSON_BYTES = 4 << 20
# The training metadata is kept in its version's manifest, in the memory of every server sharing the store, for as
# long as the version exists, so it is bounded far tighter. `loraplex train` writes ~70 KB (~3,000 values) for a
# 126-layer model with every projection adapted, ~220 KB once parsed; "{}," repeated takes ~25x its bytes parsed
# (4 MiB of it held 100 MB per version).
MAX_TRAINING_BYTES = 256 << 10
MAX_TRAINING_VALUES = 16_384
# A regex target_modules / exclude_modules (adapters.fullmatch runs it): honest ones name a few projections, or
# enumerate layers (`model\.layers\.(0|1|...|125)\.self_attn\.(q|v)_proj`, ~500 characters)
MAX_REGEX_CHARS = 4096
# PEFT's keyword for every Linear layer but the output embedding, compared in any case: no regex to PEFT
ALL_LINEAR = "all-linear"
_REGEX_KEYS = ("target_modules", "exclude_modules")
_MODULE_PATH = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")  # ours, linear: never a client's pattern
# PEFT features that make a layer compute something other than  x + s B A x  on the base model's own layers: an
# adapter using one, served as a plain LoRA, would answer otherwise than PEFT does with it (its weights can still
# be ordinary lora_A / lora_B pairs of the right shapes, so the weights' checks do not catch it).
_UNSERVED_FEATURES = {
    "use_dora": "DoRA adapters are not supported; train a plain LoRA adapter",
    "modules_to_save": "it would replace whole base modules per adapter; train without modules_to_save so that "
    "only LoRA weights change",
    "trainable_token_indices": "it changes the vocabulary embeddings; adapters must leave them as they are",
    "lora_bias": "LoRA biases are not supported; train with lora_bias=False",
    "layer_replication": "PEFT serves this adapter on a model with base layers copied and reordered, not on the "
    "served base model's layers; train without layer_replication",
    "alora_invocation_tokens": "activated LoRA applies the adapter only after its invocation tokens appear, and "
    "the server applies an adapter to every token; train a plain LoRA adapter",
    "arrow_config": "Arrow routes each token among several adapters, and the server serves one adapter a request; "
    "upload the task adapters themselves",
    "kasa_config": "KaSA drops the smallest singular components of each targeted base weight and scales B A by "
    "learned singular values (lora_diag), so PEFT runs it on other weights than the served base model's; train a "
    "plain LoRA adapter",
    "use_bdlora": "BD-LoRA keeps lora_A or lora_B as diagonal blocks, which the server does not serve; train a plain "
    "LoRA adapter",
    "use_qalora": "QALoRA averages the input over groups of qalora_group_size features before lora_A (on GPTQ base "
    "models), which the server does not; train a plain LoRA adapter",
    "target_parameters": "LoRA on parameters (e.g. MoE experts' weights) is not served, only on Linear modules; "
    "target those with target_modules",
    "megatron_config": "PEFT builds Megatron's tensor-parallel LoRA layers for it, and cannot load it without "
    "Megatron; train the adapter on the Hugging Face model, without megatron_config",
    # At inference these compute x + s B A x, but PEFT saves training state with the adapter, which the server does
    # not take, and checks the sub-config's values as it loads it
    "velora_config": "VeLoRA's adapter holds training state (lora_velora_embed tensors), which the server does not "
    "store; at inference PEFT computes the plain LoRA of its lora_A / lora_B tensors: remove velora_config and the "
    "lora_velora_embed tensors to upload that",
    "monteclora_config": "MonteCLoRA's adapter holds training state (lora_monteclora_sampler tensors), which the "
    "server does not store; at inference PEFT computes the plain LoRA of its lora_A / lora_B tensors: remove "
    "monteclora_config and the lora_monteclora_sampler tensors to upload that",
}
# PEFT builds these sub-configs from any JSON object, {} included, and turns the feature on with it: set unless null
_SUBCONFIGS = frozenset({"arrow_config", "kasa_config", "use_bdlora", "velora_config", "monteclora_config"})
# Sub-configs of initializations that leave B A = 0 (or are refused): no effect on what the saved adapter computes,
# but PEFT refuses to load an adapter whose value is not an object, or whose EVA bounds it refuses (EvaConfig)
_INIT_SUBCONFIGS = ("eva_config", "corda_config", "lora_ga_config")
# PEFT's TaskType: it refuses a config of another; each only picks PEFT's wrapper of the model (its logits are the
# LoRA model's)
_TASK_TYPES = frozenset({"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"})
# bias: which base biases were trained, and saved with the adapter ("all", "lora_only"); such tensors are refused
# (_check_no_base_biases), the value alone changes nothing. PEFT raises on others as it loads the adapter.
_BIAS_VALUES = ("none", "all", "lora_only")
# init_lora_weights: PEFT builds each targeted layer with it before it loads the saved tensors over lora_A / lora_B.
# These leave B A = 0 there (B zero; MiCA: A zero; orthogonal: B's columns orthogonal to A's rows), so a targeted
# module the file holds no tensors for is unchanged, as served. "lora_ga" sets up from gradients that only its
# preprocessing attaches: loaded from a file, PEFT takes the default init. PEFT's rule, case included
# (LoraLayer.update_layer): "gaussian" and "mica" in any case, the others exactly.
_ZERO_INITS = frozenset({"eva", "lora_ga"})
_ZERO_INITS_ANY_CASE = frozenset({"gaussian"})
LoraInit = Literal["zero", "random", "orthogonal", "mica"]  # what _lora_init finds
# The names PEFT tests a regex target_modules against (whole, as re.fullmatch) to tell whether it targets an
# embedding, which ensure_weight_tying then adapts with its tied twin (EMBEDDING_LAYER_NAMES)
_PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")
# Inits under which PEFT changes each targeted base weight as it loads the adapter, before the saved tensors: the
# adapter was trained, and PEFT runs it, on those weights, not on the served model's (_base_changing_init)
_SUBTRACTED = (
    "PEFT subtracts its initial B A from each targeted base weight as it loads the adapter, so the adapter runs on "
    "other weights than the served base model's; convert it into a plain LoRA: save it with PEFT's "
    "save_pretrained(..., path_initial_model_for_weight_conversion=...), which writes one with init_lora_weights true"
)
_BASE_CHANGING_INITS = {
    "pissa": f"with PiSSA, {_SUBTRACTED}",
    "corda": f"with CorDA (given preprocess_corda's data, without which PEFT refuses to load it), {_SUBTRACTED}",
    "olora": f"with OLoRA, {_SUBTRACTED}",
    "loftq": "as it loads the adapter, PEFT replaces each targeted base weight by LoftQ's quantized residual of it "
    "(with bitsandbytes, on a GPU), so the adapter runs on other weights than the served base model's; train a LoRA "
    "on the served base model, with init_lora_weights true",
}


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int
    max_bytes: int  # config + weights + training metadata


@dataclass(frozen=True)
class ValidatedAdapter:
    """The checked content of a PEFT directory and what its manifest says about it."""

    base: BaseFingerprint  # restricted to the modules the adapter targets
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    size_bytes: int
    sha256: str
    training: dict[str, Any] | None


def adapter_files(src: Path) -> list[Path]:
    """The files of a PEFT directory that are stored: config, weights and, if present, training metadata."""
    config_path, weights_path, training_path = src / CONFIG_FILE, src / WEIGHTS_FILE, src / TRAINING_FILE
    if not weights_path.is_file():
        pickled = [p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES] if src.is_dir() else []
        if pickled:
            raise UnsafeAdapterFormat(_pickle_message(pickled[0]))
        raise InvalidAdapterWeights(f"{WEIGHTS_FILE} is missing: save the adapter with save_pretrained()")
    if not config_path.is_file():
        raise InvalidAdapterConfig(f"{CONFIG_FILE} is missing: save the adapter with save_pretrained()")
    return [config_path, weights_path] + ([training_path] if training_path.is_file() else [])


def validate_adapter_dir(src: Path, base: BaseFingerprint, limits: AdapterLimits) -> ValidatedAdapter:
    files = adapter_files(src)
    config_path, weights_path, training_path = src / CONFIG_FILE, src / WEIGHTS_FILE, src / TRAINING_FILE
    size = sum(p.stat().st_size for p in files)
    if size > limits.max_bytes:
        raise AdapterTooLarge(
            f"the adapter is {size / 2**20:.1f} MiB, over the server's limit of "
            f"{limits.max_bytes / 2**20:.0f} MiB (--max-adapter-mb); lower its rank or target fewer modules"
        )
    config = read_config(config_path)
    check_config(config, base)
    state = read_safetensors(weights_path)
    rank = check_weights(state, config, base, limits)
    modules = sorted({_module_of(key) for key in state})
    return ValidatedAdapter(
        base=base.restrict(modules),
        rank=rank,
        alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora")),
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        size_bytes=size,
        sha256=content_sha256(config, state),
        training=read_training(training_path) if training_path.is_file() else None,
    )


def _pickle_message(filename: str) -> str:
    return (
        f"{filename} is a pickle-based checkpoint, which can run arbitrary code when loaded and is refused; "
        "save the adapter as safetensors (save_pretrained(..., safe_serialization=True)) and upload "
        f"{WEIGHTS_FILE}"
    )


def _read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> tuple[Any, int]:
    """The parsed document and how many values it holds (objects, arrays and scalars)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidAdapterConfig(
            f"{what} takes {size} bytes, over the server's bound of {max_bytes}; upload the file as written"
        )
    try:
        value = json.loads(path.read_bytes())
    except ValueError as exc:  # bad UTF-8 or syntax, or an integer of more digits than Python converts
        raise InvalidAdapterConfig(f"{what} is not valid JSON ({exc}); upload the file as written") from exc
    except RecursionError as exc:  # the parser recurses per level: thousands of '[' exhaust the stack
        raise InvalidAdapterConfig(_too_deep(what)) from exc
    depth, values = _shape(value)
    if depth > MAX_JSON_DEPTH:  # kept in the manifest, whose serializer has its own depth limit
        raise InvalidAdapterConfig(_too_deep(what))
    try:  # an escape of half a UTF-16 pair (\ud800) parses to a string that no UTF-8 can store or answer
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise InvalidAdapterConfig(
            f"{what} holds a \\u escape of a lone UTF-16 surrogate ({exc.object[exc.start : exc.end]!a}), which is "
            "not a character; escape characters outside the BMP as their surrogate pair, or write them as UTF-8"
        ) from exc
    return value, values


def _too_deep(what: str) -> str:
    return f"{what} is nested more than {MAX_JSON_DEPTH} levels deep; PEFT writes flat objects"


_CONTAINERS = (dict, list)


def _shape(value: Any) -> tuple[int, int]:
    """Nesting depth and number of values of parsed JSON, without recursion: a level at a time, its values counted
    by their containers' lengths, only its containers looked into. A pass of the interpreter per value, holding the
    lock, took 1.3-1.7 s for a 4 MiB config of `0,` or `{},` (15-25 times json.loads' own time), at the upload and at
    every load of the version from disk."""
    depth, values, level = 1, 1, [value] if type(value) in _CONTAINERS else []
    while children := [child for item in level for child in (item.values() if type(item) is dict else item)]:
        depth, values = depth + 1, values + len(children)
        level = [child for child in children if type(child) in _CONTAINERS]  # json.loads makes plain ones
    return depth, values


def read_config(path: Path) -> dict[str, Any]:
    config, _ = _read_json(path, CONFIG_FILE)
    if not isinstance(config, dict):
        raise InvalidAdapterConfig(f"{CONFIG_FILE} must be a JSON object, as PEFT writes it")
    return config


def read_training(path: Path) -> dict[str, Any]:
    training, values = _read_json(path, "the training metadata", MAX_TRAINING_BYTES)
    if not isinstance(training, dict):
        raise InvalidAdapterConfig("the training metadata must be a JSON object")
    if values > MAX_TRAINING_VALUES:
        raise InvalidAdapterConfig(
            f"the training metadata holds {values} JSON values, over the server's bound of {MAX_TRAINING_VALUES} "
            "(it is kept in memory with its version); upload the training.json that training wrote"
        )
    return training


def _targeting_names(module: str) -> list[str]:
    """The target_modules entries that name `module` as PEFT matches them (the name, or a name it ends with after a
    dot): each dotted suffix of it, a few a name, so that a list is matched by set lookups."""
    parts = module.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _linear_names(base: BaseFingerprint) -> list[str]:
    """The names of the served model's layers that take LoRA adapters, e.g. ['down_proj', ..., 'v_proj']."""
    return sorted({n.rsplit(".", 1)[-1] for n in base.modules} - VOCAB_MODULES)


def check_config(config: dict[str, Any], base: BaseFingerprint) -> None:
    if config.get("peft_type") != "LORA":
        raise InvalidAdapterConfig(
            f"peft_type is {config.get('peft_type')!r}: only LoRA adapters (peft_type 'LORA') can be served"
        )
    # Every module of the base is matched against these entries, at upload and at each load from disk: 180,000
    # pattern keys in a 4 MB config took ~9 s of the interpreter, stalling every stream. A config names each module
    # at most once (or by a shorter name shared by many). A layers_pattern list is searched for each adapted module's
    # layer index: a million names in a 4 MB config took 0.2 s a module, 45 s for an 8B model's 224 projections.
    most = max(64, 2 * len(base.modules))
    for key in (
        "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"
    ):  # fmt: skip
        entries = config.get(key)
        if isinstance(entries, list | dict) and len(entries) > most:
            raise InvalidAdapterConfig(
                f"{key} has {len(entries)} entries; at most {most} (twice the served base model's {len(base.modules)} "
                "Linear modules): name each module once, or by the name its layers share (e.g. 'q_proj')"
            )
    for flag in ("use_rslora", "use_dora", "lora_bias"):  # "false" is a truthy string: no coercion
        if not isinstance(config.get(flag, False), bool):
            raise InvalidAdapterConfig(f"{flag} must be true or false, not {config[flag]!r}")
    for feature, why in _UNSERVED_FEATURES.items():
        value = config.get(feature)
        if value is not None if feature in _SUBCONFIGS else value:
            raise UnsupportedAdapter(f"{feature} is set: {why}")
    _check_fields_peft_loads(config)
    _lora_init(config)
    _check_rank("r", config.get("r"))
    _check_alpha("lora_alpha", config.get("lora_alpha", 8))
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise InvalidAdapterConfig(f"{key} must map module names to numbers, not {pattern!r}")
        for module, value in pattern.items():
            if not _MODULE_PATH.fullmatch(module):
                raise InvalidAdapterConfig(
                    f"{key} key {module!r} is not a module name: use a module's name or a dotted suffix of it, "
                    "e.g. 'q_proj' or 'model.layers.0.self_attn.q_proj' (no regular expression: as in PEFT, '.' "
                    "matches any character)"
                )
            check(f"{key}[{module!r}]", value)
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise InvalidAdapterConfig(f"target_modules must be a list of module names or a regex, not {targets!r}")
    if isinstance(targets, list):
        vocab = [t for t in targets if t.rsplit(".", 1)[-1] in VOCAB_MODULES]
        if vocab:
            raise UnsupportedAdapter(
                f"target_modules {vocab} would change the embeddings or the output vocabulary; "
                "target only the attention and MLP projections"
            )
        # an entry naming modules that are not Linear layers is judged with the weights, by PEFT's whole rule
        # (exclude_modules, layers_to_transform: PEFT may leave them out): _check_only_linear_adapted
        entries = set(targets)
        named = {name for module in [*base.modules, *base.others] for name in _targeting_names(module)} & entries
        unknown = [t for t in targets if t not in named]
        if unknown:
            raise IncompatibleAdapter(
                f"target_modules {unknown} are not layers of the served base model ({base.architecture}) that take "
                f"LoRA adapters; those are {_linear_names(base)}"
            )
    excluded = config.get("exclude_modules")
    if not (excluded is None or isinstance(excluded, str) or _strings(excluded)):
        raise InvalidAdapterConfig("exclude_modules must be a list of module names or a regex")
    for key in _REGEX_KEYS:
        regex = config.get(key)
        if isinstance(regex, str) and len(regex) > MAX_REGEX_CHARS:
            raise InvalidAdapterConfig(
                f"{key} is a regex of {len(regex)} characters; at most {MAX_REGEX_CHARS} are accepted: list the "
                'module names instead, e.g. ["q_proj", "v_proj"]'
            )
    layers = config.get("layers_to_transform")
    if not (layers is None or _integer(layers) or (isinstance(layers, list) and all(map(_integer, layers)))):
        raise InvalidAdapterConfig("layers_to_transform must be a layer index or a list of them")
    pattern = config.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not (pattern is None or (_strings(patterns) and all(p == "" or _MODULE_PATH.fullmatch(p) for p in patterns))):
        raise InvalidAdapterConfig(
            "layers_pattern must be the name (or a list of names) of the module list holding the layers, e.g. "
            "'layers' (names are not read as regular expressions)"
        )
    # LoraConfig refuses these combinations as it loads (ValueError): PEFT serves no answer for such an adapter
    if isinstance(targets, str) and (layers is not None or pattern is not None):
        raise InvalidAdapterConfig(
            "layers_to_transform and layers_pattern cannot be used with a regex target_modules (PEFT refuses the "
            "config): write the layers into the regex, e.g. 'model\\.layers\\.(0|1)\\..*\\.q_proj', or list the "
            "module names"
        )
    if pattern and layers is None:
        raise InvalidAdapterConfig(
            "layers_pattern needs layers_to_transform (PEFT refuses the config without it): add the layers' "
            "indices, or remove layers_pattern"
        )


def _check_fields_peft_loads(config: dict[str, Any]) -> None:
    """Refuse values of fields that change nothing the adapter computes, but on which PEFT raises as it loads it."""
    bias = config.get("bias", "none")
    if bias not in _BIAS_VALUES:
        raise InvalidAdapterConfig(
            f"bias is {json.dumps(bias)[:80]}, which PEFT cannot load: it must be one of {list(_BIAS_VALUES)}; set it "
            'to "none"'
        )
    dropout = config.get("lora_dropout", 0.0)
    if not (_number(dropout) and dropout <= 1):
        raise InvalidAdapterConfig(
            f"lora_dropout is {json.dumps(dropout)[:80]}, which PEFT cannot load: it must be a probability, e.g. 0.05 "
            "(it only acts in training)"
        )
    task = config.get("task_type")
    # a JSON object or array is unhashable: a set lookup of one raised TypeError (a 500)
    if task is not None and not (isinstance(task, str) and task in _TASK_TYPES):
        raise InvalidAdapterConfig(
            f"task_type is {json.dumps(task)[:80]}, which PEFT cannot load: it must be null or one of "
            f'{sorted(_TASK_TYPES)}, e.g. "CAUSAL_LM"'
        )
    for key in _INIT_SUBCONFIGS:
        if not isinstance(config.get(key, {}), dict | None):
            raise InvalidAdapterConfig(f"{key} must be an object or null, as PEFT writes it (PEFT cannot load others)")
    eva = config.get("eva_config") or {}
    rho, tau = eva.get("rho", 2.0), eva.get("tau", 0.99)
    if not (_number(rho) and rho >= 1 and _number(tau) and 0 <= tau <= 1):
        raise InvalidAdapterConfig(
            "eva_config's rho must be a number of at least 1 and its tau a number from 0 to 1, or PEFT cannot load the "
            "adapter; save it with PEFT's save_pretrained()"
        )


def _lora_init(config: dict[str, Any]) -> LoraInit:
    """What PEFT's initialization under init_lora_weights leaves in a targeted layer for the saved tensors to
    replace: "zero" (B A = 0: true and _ZERO_INITS), "random" (false, and what PEFT reads as false: null, 0, "":
    nn.Linear's random A and B, kept where the file has no tensors), "orthogonal" (B A = 0, at even ranks only) or
    "mica" (B A = 0, at ranks up to min(in_features, out_features) only).
    Refuses the inits under which PEFT runs the adapter on other base weights than the served model's, and the values
    PEFT cannot load."""
    init = config.get("init_lora_weights", True)
    if isinstance(init, str):
        method = _base_changing_init(init)
        if method is not None:
            raise UnsupportedAdapter(f"init_lora_weights is {json.dumps(init)[:80]}: {_BASE_CHANGING_INITS[method]}")
        if init == "orthogonal":
            return "orthogonal"
        if init.lower() == "mica":
            return "mica"
        if init in _ZERO_INITS or init.lower() in _ZERO_INITS_ANY_CASE:
            return "zero"
    if init is True:
        return "zero"
    if not init:
        return "random"
    raise InvalidAdapterConfig(
        f"init_lora_weights is {json.dumps(init)[:80]}, which PEFT cannot load (it raises on it): PEFT writes true, "
        'false or the name of an initialization, e.g. "gaussian"; set it to true'
    )


def _base_changing_init(init: str) -> str | None:
    """The _BASE_CHANGING_INITS key of an init_lora_weights value, told apart as PEFT does (LoraLayer.update_layer)."""
    if init.startswith(("pissa", "corda")):
        return init[:5]
    if init.lower() == "olora" or init == "loftq":
        return init.lower()
    return None


def _peft_targets(config: dict[str, Any], base: BaseFingerprint, regex_matches: dict[str, frozenset[str]]) -> list[str]:
    """The Linear modules of the served base model that PEFT puts a LoRA layer on under this config; a regex's matches
    are `regex_matches`, run on all of them."""
    targets = config["target_modules"]
    every_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    return [
        module
        for module in base.modules
        # PEFT leaves the output embedding out of "all-linear"
        if not (every_linear and module.rsplit(".", 1)[-1] in VOCAB_MODULES)
        and _left_out_by_peft(config, module, regex_matches) is None
    ]


def _check_untrained_modules(
    config: dict[str, Any],
    base: BaseFingerprint,
    weights: LoraWeights,
    regex_matches: dict[str, frozenset[str]],
    init: LoraInit,
) -> None:
    """Refuse what PEFT's initialization leaves on the modules it targets, the file's tensors aside: an odd rank it
    cannot build orthogonally, a rank past a module's smaller dimension it cannot start MiCA from, random A and B on a
    module the file has no tensors for (served unchanged)."""
    targeted = _peft_targets(config, base, regex_matches)
    ranks = {module: pattern_value(config.get("rank_pattern") or {}, module, config["r"]) for module in targeted}
    if init == "mica":
        # PEFT takes B from the base weight's last r singular vectors: there are min(in_features, out_features)
        over = [module for module, rank in ranks.items() if rank > min(base.modules[module])]
        if over:
            more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
            raise InvalidAdapterConfig(
                f"init_lora_weights is {json.dumps(config['init_lora_weights'])} and module {over[0]!r}{more} has the "
                f"rank {ranks[over[0]]} (r, or its rank_pattern entry), over its {min(base.modules[over[0]])} "
                "features (min(in_features, out_features)), the most singular vectors MiCA can start a layer from: "
                "PEFT refuses to load the adapter; set init_lora_weights to true (the saved tensors replace the "
                "initialization), or lower that rank"
            )
        return
    if init == "orthogonal":
        odd = [module for module, rank in ranks.items() if rank % 2]
        if odd:
            more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
            raise InvalidAdapterConfig(
                f'init_lora_weights is "orthogonal" and module {odd[0]!r}{more} has the odd rank {ranks[odd[0]]} (r, '
                "or its rank_pattern entry): PEFT builds orthogonal LoRA layers of even rank only and refuses to load "
                "the adapter; set init_lora_weights to true (the saved tensors replace the initialization)"
            )
        return
    missing = [module for module in targeted if module not in weights.modules]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InvalidAdapterWeights(
            f"init_lora_weights is {json.dumps(config['init_lora_weights'])}: PEFT starts each targeted module with "
            f"random lora_A / lora_B and keeps them where {WEIGHTS_FILE} has none, and it has none for "
            f"{missing[0]!r}{more}, which the config targets: PEFT would change that module at random where the server "
            "leaves it as it is; set init_lora_weights to true (a module without tensors is then unchanged), or save "
            "the tensors of every targeted module"
        )


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _regex_matches(config: dict[str, Any], modules: list[str]) -> dict[str, frozenset[str]]:
    """For target_modules and exclude_modules given as a regex, which of `modules` it matches, as PEFT matches it
    (re.fullmatch): one bounded run of both (adapters.fullmatch), for every module at once."""
    patterns = {key: regex for key in _REGEX_KEYS if isinstance(regex := config.get(key), str)}
    if patterns.get("target_modules", "").lower() == ALL_LINEAR:  # PEFT expands it to the Linear layers' names
        del patterns["target_modules"]
    if not patterns.get("exclude_modules", True):  # PEFT reads an empty exclude_modules as none
        del patterns["exclude_modules"]
    return fullmatches(patterns, modules) if patterns else {}


def _left_out_by_peft(config: dict[str, Any], module: str, regex_matches: dict[str, frozenset[str]]) -> str | None:
    """Why PEFT puts no LoRA layer on `module` under this config (and drops the module's tensors as unexpected
    keys), or None. PEFT's rule (check_target_module_exists); a regex's matches are `regex_matches`
    (_regex_matches)."""

    def named(names: list[str]) -> bool:
        return any(module == name or module.endswith("." + name) for name in names)

    excluded = config.get("exclude_modules")
    if isinstance(excluded, list) and named(excluded):
        return "exclude_modules names it"
    if module in regex_matches.get("exclude_modules", ()):
        return "the exclude_modules regex matches its name"
    targets = config["target_modules"]
    if isinstance(targets, str):
        # "all-linear" has no matches here: it takes every Linear layer, and the weights hold no other (check_weights)
        matched = regex_matches.get("target_modules")
        return None if matched is None or module in matched else "the target_modules regex does not match its name"
    if module in targets:  # a module named in full takes no layer filter
        return None
    if not named(targets):
        return "target_modules does not name it"
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return None
    index = _layer_index(module, config.get("layers_pattern"))
    if index is None or index not in (layers if isinstance(layers, list) else [layers]):
        return f"layers_to_transform leaves out its layer ({index})"
    return None


def _check_only_linear_adapted(
    config: dict[str, Any], base: BaseFingerprint, regex_matches: dict[str, frozenset[str]]
) -> None:
    """Refuse a config under which PEFT puts a LoRA layer on a module that is not a Linear layer (a norm, an
    activation, a container such as 'mlp'): PEFT refuses to load the adapter ("Target module ... is not supported"),
    or adapts an embedding with another kind of layer, which the server does not serve."""
    targets = config["target_modules"]
    if isinstance(targets, str):  # "all-linear" has no matches here: PEFT takes it for the Linear layers' names
        matched = regex_matches.get("target_modules", frozenset()) & base.others
    else:
        entries = set(targets)
        matched = {module for module in base.others if not entries.isdisjoint(_targeting_names(module))}
    adapted = sorted(module for module in matched if _left_out_by_peft(config, module, regex_matches) is None)
    if not adapted:
        return
    if isinstance(targets, str):
        by = "the target_modules regex matches"
    else:
        by = f"target_modules entry {next(n for n in _targeting_names(adapted[0]) if n in targets)!r} names"
    more = f" (and {len(adapted) - 1} more)" if len(adapted) > 1 else ""
    raise IncompatibleAdapter(
        f"{by} {adapted[0]!r}{more}, a module of the served base model ({base.architecture}) that is not a Linear "
        "layer: PEFT cannot put a LoRA layer on it and refuses to load the adapter (an embedding it adapts with "
        f"another kind of layer, which the server does not serve); target only Linear projections, such as "
        f"{_linear_names(base)}"
    )


def _layer_index(module: str, pattern: str | list[str] | None) -> int | None:
    """The layer index PEFT reads from a module's name: the first numeric part after one of `pattern`'s names, or
    after the second part at least with no pattern; it must be followed by another part."""
    parts = module.split(".")
    numbered = [i for i in range(1, len(parts) - 1) if parts[i].isascii() and parts[i].isdigit()]
    if not pattern:
        return next((int(parts[i]) for i in numbered if i >= 2), None)
    for name in [pattern] if isinstance(pattern, str) else pattern:
        found = next((int(parts[i]) for i in numbered if parts[i - 1] == name), None)
        if found is not None:
            return found
    return None


def _check_rank(what: str, rank: Any) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapterConfig(f"{what} must be a positive integer, not {rank!r}")


def _check_alpha(what: str, alpha: Any) -> None:
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise InvalidAdapterConfig(f"{what} must be a number, not {alpha!r}")
    try:
        finite = math.isfinite(alpha)
    except OverflowError:  # an integer, which JSON reads exactly, past float's range
        raise InvalidAdapterConfig(f"{what} is past float's range: it must be a finite number, e.g. 16") from None
    if not finite:
        raise InvalidAdapterConfig(f"{what} is {alpha}: it must be a finite number, e.g. 16")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Check the header by hand first, so a pickle gets a clear refusal, then let safetensors parse it."""
    with path.open("rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    # pickle protocol 2+, or torch.save's zip; a safetensors header's length can start with 0x80 too (its low byte,
    # for one length in 32), but then its JSON starts at byte 8
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise UnsafeAdapterFormat(_pickle_message(path.name))
    (header_len,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (0,)
    if len(head) < 9 or head[8:9] != b"{" or header_len > size - 8:
        raise UnsafeAdapterFormat(
            f"{path.name} is not a safetensors file; save the adapter with save_pretrained() (safetensors)"
        )
    if header_len > _MAX_HEADER:
        raise UnsafeAdapterFormat(
            f"{path.name}'s header takes {header_len} bytes, over the server's bound of {_MAX_HEADER}: an adapter's "
            "is a few KB; save only the adapter (save_pretrained of the PEFT model)"
        )
    with path.open("rb") as f:
        f.seek(8)
        header = f.read(header_len)
    try:
        entries = json.loads(header)  # a flat object, its size bounded above
    except (ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or syntax, or an integer too long
        raise UnsafeAdapterFormat(f"{path.name} is a damaged safetensors file ({exc}); upload it again") from exc
    tensors = len(entries) - ("__metadata__" in entries) if isinstance(entries, dict) else 0
    if tensors > MAX_TENSORS:
        raise UnsafeAdapterFormat(
            f"{path.name} declares {tensors} tensors, over the server's bound of {MAX_TENSORS}: an adapter has two "
            "per adapted layer; save only the adapter (save_pretrained of the PEFT model)"
        )
    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as exc:
        damaged = f"{path.name} is a damaged safetensors file ({reason(exc)}); upload it again"
        raise UnsafeAdapterFormat(damaged) from exc
    except RuntimeError as exc:  # torch maps the file for safetensors, and its error names the file (a server path)
        raise UnsafeAdapterFormat(f"{path.name} could not be mapped into memory; upload it again") from exc


def _module_of(key: str) -> str:
    parsed = split_peft_key(key)
    return parsed[0] if parsed else key


def check_weights(
    state: dict[str, torch.Tensor], config: dict[str, Any], base: BaseFingerprint, limits: AdapterLimits
) -> int:
    """Check every tensor against the base model; return the adapter's largest rank."""
    vocab = sorted({m for m in map(_module_of, state) if m.rsplit(".", 1)[-1] in VOCAB_MODULES})
    if vocab:
        raise UnsupportedAdapter(
            f"the adapter changes {vocab}, i.e. the embeddings or the output vocabulary; "
            "target only the attention and MLP projections"
        )
    _check_no_base_biases(state)
    try:
        weights = lora_weights_from_state(state, config)
    except ValueError as exc:
        raise InvalidAdapterWeights(f"{exc}; save the adapter with PEFT's save_pretrained()") from exc
    check_tensors(state)
    init = _lora_init(config)
    # run on the names of the base model's modules only (a module the base lacks is refused below): the adapter's, and
    # those that are not Linear layers, which no config may adapt; and every Linear one under an init that leaves
    # something on a targeted module the file holds no tensors for (_check_untrained_modules)
    judged = [module for module in weights.modules if module in base.modules] if init == "zero" else list(base.modules)
    ties = bool(config.get("ensure_weight_tying")) and base.tied_embeddings and init == "random"
    # PEFT's own test of whether a regex targets an embedding, run with the modules' (it is a name, not a module)
    tested = list(_PEFT_EMBEDDING_NAMES) if ties and isinstance(config["target_modules"], str) else []
    regex_matches = _regex_matches(config, judged + sorted(base.others) + tested)
    _check_only_linear_adapted(config, base, regex_matches)
    if tested:
        _check_no_tied_embedding_adapted(config, regex_matches)
    for module, lora in weights.modules.items():
        if module not in base.modules:
            raise IncompatibleAdapter(
                f"module {module!r} is not a layer of the served base model ({base.architecture}) that takes LoRA "
                "adapters; was the adapter trained on another model?"
            )
        in_features, out_features = base.modules[module]
        r = lora.rank
        if tuple(lora.a.shape) != (r, in_features) or tuple(lora.b.shape) != (out_features, r):
            raise IncompatibleAdapter(
                f"module {module!r}: lora_A {tuple(lora.a.shape)} / lora_B {tuple(lora.b.shape)} do not fit "
                f"its ({in_features} -> {out_features}) shape in the served base model; "
                "was the adapter trained on another model?"
            )
        left_out = _left_out_by_peft(config, module, regex_matches)
        if left_out is not None:
            raise InvalidAdapterWeights(
                f"module {module!r} has lora_A / lora_B tensors, but {left_out}: PEFT puts no LoRA layer there and "
                "ignores them, so served they would change the answers; fix the config, or save the adapter with "
                "PEFT's save_pretrained()"
            )
        declared = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if r != declared:  # PEFT refuses to load it: its layer is built at the declared rank, the scaling from it
            raise InvalidAdapterWeights(
                f"module {module!r}: lora_A {tuple(lora.a.shape)} / lora_B {tuple(lora.b.shape)} have rank {r}, "
                f"and the config declares {declared} for it (r, or its rank_pattern entry), from which PEFT "
                "builds the layer and its scaling; save the adapter with PEFT's save_pretrained()"
            )
    if init != "zero":
        _check_untrained_modules(config, base, weights, regex_matches, init)
    check_magnitudes(weights)
    if weights.rank > limits.max_rank:
        raise AdapterRankTooLarge(
            f"rank {weights.rank} is over the server's limit of {limits.max_rank} (--max-lora-rank); "
            "retrain with a smaller r or raise the limit"
        )
    return weights.rank


def _check_no_tied_embedding_adapted(config: dict[str, Any], regex_matches: dict[str, frozenset[str]]) -> None:
    """Refuse a regex target_modules that PEFT reads as targeting an embedding, under ensure_weight_tying, on a base
    model whose embeddings are tied, under an init that leaves random weights: PEFT then adds the input embedding to
    the targets and ties the output embedding's adapter to it, both random where the file has no tensors (and an
    embedding's tensors are refused)."""
    named = [name for name in _PEFT_EMBEDDING_NAMES if name in regex_matches.get("target_modules", ())]
    if named:
        raise InvalidAdapterConfig(
            f"ensure_weight_tying is true and the target_modules regex matches {named[0]!r}, which PEFT takes for a "
            "tied embedding of the served base model: PEFT then puts LoRA layers on the input and output embeddings, "
            f"and under init_lora_weights {json.dumps(config.get('init_lora_weights'))} starts them with random "
            f"weights, which {WEIGHTS_FILE} does not replace (embeddings are not adapted here): set "
            "ensure_weight_tying to false, or init_lora_weights to true"
        )


def _check_no_base_biases(state: dict[str, torch.Tensor]) -> None:
    """Refuse the base model's biases, which PEFT saves with an adapter trained with bias "all" or "lora_only" and
    loads over the base model's: the server serves the base model's own."""
    biases = sorted(key for key in state if key.endswith(".bias") and ".lora_" not in key)
    if biases:
        more = f" (and {len(biases) - 1} more)" if len(biases) > 1 else ""
        raise UnsupportedAdapter(
            f"{WEIGHTS_FILE} holds {biases[0]!r}{more}, a bias of the base model, which PEFT saves with an adapter "
            'trained with bias "all" or "lora_only" and loads over the base model\'s bias; the server serves the base '
            'model\'s own: train the adapter with bias="none"'
        )


def content_sha256(config: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """Hash of what the adapter computes, independent of JSON formatting and safetensors layout."""
    canonical = dict(config)
    if isinstance(canonical.get("target_modules"), list):  # PEFT writes a set, in no fixed order
        canonical["target_modules"] = sorted(canonical["target_modules"])
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(f"\n{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
