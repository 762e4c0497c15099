"""LoRA (Hu et al., 2021): y = W x + s · B A dropout(x), with A Kaiming-uniform, B = 0 (so the model is unchanged at
init) and s = alpha / r, or alpha / √r with rsLoRA (Kalajdzievski, 2023). Same math, names and shapes as peft's LoRA
(`lora_A` [r, in], `lora_B` [out, r]), which is what makes `export_peft` a renaming."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llava.adapters.base import PROJECTIONS, LinearAdapter, lora_init_, wrap_linears
from llava.adapters.registry import register


class LoRALinear(LinearAdapter):
    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(linear)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        w = linear.weight
        self.lora_A = nn.Parameter(lora_init_(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_params(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B")

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)  # scale the narrow [.., r] tensor

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


@dataclass
class LoraOptions:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale by alpha/√r instead of alpha/r (keeps the update size stable as r grows)
    targets: tuple[str, ...] = PROJECTIONS
    layers: tuple[int, ...] | None = None  # None: every layer
    seed: int | None = 0  # seeds the A init; None uses torch's global random stream

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


@register("lora", LoraOptions, mergeable=True, summary="low-rank update B·A on the chosen projections")
def build_lora(llama: nn.Module, opts: LoraOptions) -> None:
    wrap_linears(llama, opts.targets, opts.layers,
                 lambda path, linear: LoRALinear(linear, opts.r, opts.alpha, opts.dropout, opts.rslora))
