"""Decode-step fusions across the HF modules of a decoder layer, with the fused kernels installed: the LoRA shrink
of a group of wrapped layers made by the kernel that makes their input (the norms, the gated MLP's activation),
and each residual add made by the kernel of the projection it follows (o_proj, down_proj).

Each wrapper runs its module unchanged outside decode steps with the kernels, and computes what the module
computes, in the same roundings.
"""

import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaMLP
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2MLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3MLP

from server.engine.attention import OUTPUT_SHRINK
from server.engine.multilora import SHARED_INPUTS, LoraContext, MultiLoraLinear, ShrinkGroup

# The norm of a decoder layer whose output those layers take: (its name, the module holding them, the group)
NORM_INPUTS = (
    ("input_layernorm", "self_attn", SHARED_INPUTS[0]),
    ("post_attention_layernorm", "mlp", SHARED_INPUTS[1]),
)
# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)): the activation makes down's input
GATED_MLPS = (LlamaMLP, MistralMLP, Qwen2MLP, Qwen3MLP, GemmaMLP)
# Decoder layer classes whose forward is h = x + self_attn(input_layernorm(x)); h + mlp(post_attention_layernorm(h))
RESIDUAL_LAYERS = (LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer, GemmaDecoderLayer)


class NormShrink(nn.Module):
    """A decoder layer's norm whose output a shrink group takes (NORM_INPUTS): in a decode step with the fused
    kernels, the norm and the group's shrink run as one kernel, and the group takes that shrink."""

    def __init__(self, norm: nn.Module, group: ShrinkGroup, context: LoraContext) -> None:
        super().__init__()
        self.norm, self.group, self.context = norm, group, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [1, N, D] (the step's flat tokens) -> [1, N, D]
        context, kernels = self.context, self.context.decode_kernels
        if context.use_kernels and kernels is not None:
            fused = kernels.norm_shrink(self.norm, x, self.group.a, context.slot_ids, context.ranks, self.group.size)
            if fused is not None:
                self.group.prime(*fused)
                return fused[0]
        return self.norm(x)


class GatedMlpShrink(nn.Module):
    """A gated MLP (GATED_MLPS) whose down projection is a wrapped layer: in a decode step with the fused kernels,
    its activation, the product with up and down's shrink run as one kernel where the kernels have one for its
    act_fn, and down's group takes that shrink."""

    def __init__(self, mlp: nn.Module, group: ShrinkGroup, context: LoraContext) -> None:
        super().__init__()
        self.mlp, self.group, self.context = mlp, group, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [1, N, D] (the step's flat tokens) -> [1, N, D]
        context, kernels, mlp = self.context, self.context.decode_kernels, self.mlp
        if not (context.use_kernels and kernels is not None):
            return mlp(x)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        fused = kernels.act_shrink(mlp.act_fn, gate, up, self.group.a, context.slot_ids, context.ranks)
        if fused is None:
            return mlp.down_proj(mlp.act_fn(gate) * up)
        self.group.prime(*fused)
        return mlp.down_proj(fused[0])


class AttentionShrink:
    """o_proj's shrink (a wrapped layer alone in its group), made by the attention's merge kernel from the output it
    writes in decode steps with the fused kernels whose KV ranges the attention splits: one launch fewer a layer.
    wrap_fusions sets it on the attention module (attention.OUTPUT_SHRINK), where static_cache_attention finds it."""

    def __init__(self, group: ShrinkGroup, context: LoraContext) -> None:
        self.group, self.context = group, context

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The shrink's A view [S+1, r, in], slots [N] and ranks [N], in a step with the fused kernels; else None."""
        context = self.context
        if not (context.use_kernels and context.decode_kernels is not None):
            return None
        return self.group.a, context.slot_ids, context.ranks

    def prime(self, x: torch.Tensor, shrunk: tuple[torch.Tensor, int] | None) -> None:
        """The attention's output x [N, in] and its shrink, or None where the attention made none."""
        self.group.prime(x, shrunk)


class ResidualEpilogues(nn.Module):
    """A decoder layer (RESIDUAL_LAYERS) whose o_proj and down_proj are wrapped layers alone in their shrink groups:
    in a decode step with the fused kernels, each residual add is made by the projection it follows (nf4_mma
    adds it in its epilogue), not by a kernel of its own: two launches fewer a layer."""

    def __init__(self, layer: nn.Module, o_proj: MultiLoraLinear, down_proj: MultiLoraLinear, context: LoraContext):
        super().__init__()
        self.layer, self.o_proj, self.down_proj, self.context = layer, o_proj, down_proj, context
        if hasattr(layer, "attention_type"):  # some models' forward picks a layer's mask by it
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        # hidden_states: [1, N, D] (the step's flat tokens) -> [1, N, D]; the model passes the rest by keyword
        layer, context = self.layer, self.context
        if args or not (context.use_kernels and context.decode_kernels is not None):
            return layer(hidden_states, *args, **kwargs)
        try:
            self.o_proj.add_to_next_output(hidden_states)
            hidden_states, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
            self.down_proj.add_to_next_output(hidden_states)
            return layer.mlp(layer.post_attention_layernorm(hidden_states))
        finally:  # a step that failed before a projection took its residual must not hand it to the next step's
            self.o_proj.add_to_next_output(None)
            self.down_proj.add_to_next_output(None)


def wrap_fusions(model: nn.Module, context: LoraContext) -> None:
    """Wrap the modules of `model`'s decoder layers for the decode-step fusions: every norm whose output wrapped
    layers take (NORM_INPUTS) in a NormShrink for their group (the group of the first of those layers: q/k/v and
    gate/up are one group each where their A columns are adjacent), every gated MLP whose down projection is
    wrapped in a GatedMlpShrink, and in every decoder layer (RESIDUAL_LAYERS: their attention's output is o_proj's
    input, unchanged) the attention module given an AttentionShrink where o_proj is wrapped alone in its group, and
    the layer wrapped in a ResidualEpilogues where o_proj and down_proj are, each alone in its group."""
    for module in list(model.modules()):
        for norm_name, holder_name, members in NORM_INPUTS:
            norm, holder = getattr(module, norm_name, None), getattr(module, holder_name, None)
            layers = [getattr(holder, member, None) for member in members] if holder is not None else []
            layer = next((layer for layer in layers if isinstance(layer, MultiLoraLinear)), None)
            if norm is not None and layer is not None:
                setattr(module, norm_name, NormShrink(norm, layer.group, context))
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, GATED_MLPS) and isinstance(mlp.down_proj, MultiLoraLinear):
            module.mlp = GatedMlpShrink(mlp, mlp.down_proj.group, context)
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if not isinstance(layer, RESIDUAL_LAYERS):
                continue
            mlp = layer.mlp.mlp if isinstance(layer.mlp, GatedMlpShrink) else layer.mlp
            o_proj, down_proj = getattr(layer.self_attn, "o_proj", None), getattr(mlp, "down_proj", None)
            if isinstance(o_proj, MultiLoraLinear) and o_proj.group.size == 1:  # its input: the attention's output
                setattr(layer.self_attn, OUTPUT_SHRINK, AttentionShrink(o_proj.group, context))
            if all(isinstance(p, MultiLoraLinear) and p.group.size == 1 for p in (o_proj, down_proj)):
                setattr(parent, name, ResidualEpilogues(layer, o_proj, down_proj, context))
