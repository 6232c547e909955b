"""What a base projection's kernel needs to add each row's LoRA delta in its epilogue."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraEpilogue:
    """The expand half of each row's LoRA delta, added to a projection's output in the same kernel."""

    partial: torch.Tensor  # [rows, CHUNKS_PAD, R_PAD] fp32: one layer's part of lora_shrink's output
    chunks: int  # chunks of `partial` written
    b: torch.Tensor  # [S+1, R, N] view of the B store (scaling folded in), unit column stride
    slots: torch.Tensor  # [rows] long
    ranks: torch.Tensor  # [rows] int32: each row's adapter rank (B rows past it are not read)
