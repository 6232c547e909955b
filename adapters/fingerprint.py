"""What an adapter must match in the base model: its architecture and the shapes of its Linear layers."""

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict
from torch import nn

from adapters.lora import PEFT_PREFIX


class BaseFingerprint(BaseModel):
    model_config = ConfigDict(frozen=True)

    architecture: str  # the model class, e.g. "LlamaForCausalLM"
    modules: dict[str, tuple[int, int]]  # full module name -> (in_features, out_features)

    def restrict(self, names: Iterable[str]) -> "BaseFingerprint":
        """The part an adapter touches; what its manifest records."""
        return BaseFingerprint(architecture=self.architecture, modules={n: self.modules[n] for n in names})

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
    modules = {}
    for name, module in base.named_modules():
        # inside a PeftModel the original Linear sits at '<module>.base_layer', next to lora_A / lora_B
        if isinstance(module, nn.Linear) and ".lora_" not in name:
            modules[name.removeprefix(PEFT_PREFIX).removesuffix(".base_layer")] = (
                module.in_features,
                module.out_features,
            )
    return BaseFingerprint(architecture=type(base).__name__, modules=modules)
