"""The trainable model: LoRA on an NF4 base, and the loss module that the training loop calls."""

import contextlib
import math
import warnings
from collections.abc import Iterator

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from training.config import TrainConfig
from training.data import IGNORE

LOSS_CHUNK = 1024  # positions per logits chunk: bounds [chunk, vocab] float32 logits (0.5 GB at 128k vocab)


def add_lora(
    model: PreTrainedModel, config: TrainConfig, *, gradient_checkpointing: bool, compute_dtype: torch.dtype
) -> PeftModel:
    """prepare_model_for_kbit_training + LoRA on config.target_modules ("all-linear": all but the head); with
    `gradient_checkpointing`, config.checkpoint_share of the decoder layers recompute their activations."""
    with _quiet_peft():
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if gradient_checkpointing:
        keep_activations(model, config.checkpoint_share)
    # prepare_model_for_kbit_training upcasts every frozen non-4-bit weight to float32, a guard for fp16
    # training. In bf16 it only costs: the embedding and head (2 x 0.5 B weights at a 128k vocab) double in
    # memory, and float32 norm weights promote the whole residual stream to float32 (twice the activation
    # memory, slower elementwise work). So the base goes back to the dtype it runs in when serving; LoRA
    # weights stay float32 (PEFT casts around them), which is where precision matters.
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On AVX512-BF16 CPUs, bitsandbytes repacks the weight for inference the first time the layer runs
            # in eval mode without grad (our eval loss), and from then on takes a kernel without autograd:
            # gradients would silently stop flowing through every base layer for the rest of training.
            module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False  # the KV cache is for generation; in training it only holds memory
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    with _quiet_peft():
        peft_model = get_peft_model(model, lora)
    # PEFT keeps the resolved targets as a set and writes it to adapter_config.json in set order, which
    # changes from process to process (string hashes are salted); sorted, the same run writes the same file.
    resolved = peft_model.peft_config["default"]
    resolved.target_modules = sorted(resolved.target_modules)
    return peft_model


def keep_activations(model: nn.Module, share: float) -> None:
    """Leave checkpointing on in the first ceil(share x layers) decoder layers of a model that has it on in all
    (transformers checks each layer's flag at every forward), off in the rest.
    A layer that recomputes keeps only its input, one that does not keeps every activation its backward reads:
    the memory and the time of a step go between the two ends with the share."""
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    recomputed = math.ceil(share * len(layers))
    for layer in layers[recomputed:]:
        layer.gradient_checkpointing = False


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    # PEFT reads a transformers 5 property that warns of its own deprecation on every run: noise a user can't act on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def target_module_names(model: PeftModel) -> list[str]:
    """The module suffixes LoRA was put on (e.g. "all-linear" -> down_proj, gate_proj, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name in model.peft_config["default"].target_modules})


class CausalLMLoss(nn.Module):
    """(sum of token losses, trained tokens) for a batch; the module the loop wraps for DDP.

    Logits are computed only at positions that carry a label, in chunks that are recomputed in backward,
    so the [batch, seq, vocab] float32 logits tensor, the largest activation of a big-vocabulary model,
    never exists, and prompt and padding positions cost no head matmul at all.
    """

    def __init__(self, model: PeftModel) -> None:
        super().__init__()
        self.model = model
        causal_lm = model.get_base_model()
        self.softcap: float | None = getattr(causal_lm.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No attention mask, on purpose: rows are right-padded and attention is causal, so a real token
        # never sees the padding after it, and padding positions carry no label. Without a mask, SDPA
        # runs its flash kernel with is_causal instead of materialising a [B, 1, T, T] mask.
        # (tests/training check that real positions come out identical with and without the mask.)
        causal_lm = self.model.get_base_model()
        hidden = causal_lm.get_decoder()(input_ids=input_ids).last_hidden_state
        # hidden: [B, T, H]; position t predicts labels[t + 1]
        targets = labels[:, 1:]
        keep = targets != IGNORE
        hidden, targets = hidden[:, :-1][keep], targets[keep]  # [N, H], [N]
        head = causal_lm.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for h, t in zip(hidden.split(LOSS_CHUNK), targets.split(LOSS_CHUNK), strict=True):
            total = total + checkpoint(self._chunk_loss, head, h, t, use_reentrant=False)
        return total, keep.sum()

    def _chunk_loss(self, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).float()  # [n, vocab]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return nn.functional.cross_entropy(logits, targets, reduction="sum")
