"""What an adapter must match in the base model: its architecture, the shapes of its Linear layers and the names of
its other modules."""

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adapters.lora import PEFT_PREFIX


class BaseFingerprint(BaseModel):
    model_config = ConfigDict(frozen=True)

    architecture: str  # the model class, e.g. "LlamaForCausalLM"
    modules: dict[str, tuple[int, int]]  # full module name -> (in_features, out_features)
    # Full names of the modules that are not Linear layers (norms, activations, embeddings, containers such as
    # "model.layers.0.mlp"): PEFT matches target_modules against every module's name, a regex against the whole name,
    # and refuses to load an adapter that matches one of these, or (an embedding) adapts it with another kind of layer.
    # Six a decoder layer, fewer than its Linear ones: 761 names, 20 KB, for a 126-layer Llama (883 Linear). Only the
    # served model's record holds them, to judge configs with: never written (a manifest records the Linear modules
    # an adapter touches, restrict()), so stored records are as before, and one read back has none.
    others: frozenset[str] = Field(default=frozenset(), exclude=True)
    # Whether the output embedding shares the input embedding's weight: PEFT's ensure_weight_tying then adapts both
    # (adapters.validate). The served model's record only, as `others`.
    tied_embeddings: bool = Field(default=False, exclude=True)

    def restrict(self, names: Iterable[str], keep_others: bool = False) -> "BaseFingerprint":
        """The record of the Linear modules `names` alone: the part an adapter touches, what its manifest records; or,
        `keep_others`, the served model's record of the layers it serves LoRA on."""
        return BaseFingerprint(
            architecture=self.architecture,
            modules={n: self.modules[n] for n in names},
            others=self.others if keep_others else frozenset(),
            tied_embeddings=self.tied_embeddings and keep_others,
        )

    def mismatch(self, part: "BaseFingerprint") -> str | None:
        """Why `part` (a stored adapter's fingerprint) does not fit this base, or None if it does."""
        if part.architecture != self.architecture:
            return f"it was made for a {part.architecture}, the served base model is a {self.architecture}"
        for name, shape in part.modules.items():
            if name not in self.modules:
                return f"module {name!r} is not a layer of the served base model that takes LoRA adapters"
            if self.modules[name] != shape:
                return f"module {name!r} is {self.modules[name]} in the served base model, {shape} in the adapter's"
        return None


def base_fingerprint(model: nn.Module) -> BaseFingerprint:
    """Fingerprint of a base model: a plain or NF4 (bitsandbytes Linear4bit subclasses nn.Linear) model,
    or a PeftModel wrapping one (training records the fingerprint of the model it trained)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules: dict[str, tuple[int, int]] = {}
    names: set[str] = set()
    for full_name, module in base.named_modules():
        # inside a PeftModel the original Linear sits at '<module>.base_layer', next to lora_A / lora_B
        if ".lora_" in full_name:
            continue
        name = full_name.removeprefix(PEFT_PREFIX).removesuffix(".base_layer")
        if isinstance(module, nn.Linear):
            modules[name] = (module.in_features, module.out_features)
        names.add(name)
    # PEFT ties the adapters of the embeddings only where the checkpoint ties them (tie_word_embeddings), which is
    # where transformers made the output embedding share the input embedding's weight
    inputs = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    outputs = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    tied = inputs is not None and outputs is not None and outputs.weight is inputs.weight
    # the root ("") is no module PEFT matches; a LoRA layer of a PeftModel has its base layer's name
    return BaseFingerprint(
        architecture=type(base).__name__, modules=modules, others=names - modules.keys() - {""}, tied_embeddings=tied
    )
