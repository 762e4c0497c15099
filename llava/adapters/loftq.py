"""LoftQ (Li et al., 2023): LoRA on a quantised base, with the LoRA factors chosen so that Q + s·B·A approximates the
full-precision weight W better than Q alone.

Alternating init (peft's `loftq_init`): target ← W; repeat `iterations` times: Q = dequant(quant(target)),
L·R = rank-r SVD of W − Q, target ← W − L·R. The last Q is the base, and B, A = L, R divided by √s each so that the
LoRA scaling s is honoured (peft ignores it, an open bug). `iterations=0` is plain quantisation with the usual LoRA init
(B = 0, QLoRA-style), the baseline LoftQ improves on.

The base weight is stored quantised — uint8 codes and per-block absmax buffers (see llava/adapters/quant.py) — and the
float weight is freed, so memory really drops; it is dequantised on the fly in each forward and again in the
backward (so training does not keep a float copy per layer either). Merging materialises
Q + s·B·A as a float weight (kept until unmerge, which simply drops it again).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llava.adapters.base import PROJECTIONS, wrap_linears
from llava.adapters.lora import LoRALinear
from llava.adapters.quant import Quantized, code_book, dequantize, dequantize_tensors, quantize
from llava.adapters.registry import register


@torch.no_grad()
def loftq_init(weight: torch.Tensor, bits: int, block_size: int, r: int, iterations: int
               ) -> tuple[Quantized, torch.Tensor | None, torch.Tensor | None]:
    """(quantised base, L [out, r], R [r, in]) with W ≈ dequant(Q) + L·R; L, R are None when iterations == 0."""
    weight = weight.float()
    q, left, right = quantize(weight, bits, block_size), None, None
    target = weight
    for _ in range(iterations):
        q = quantize(target, bits, block_size)
        u, s, vh = torch.linalg.svd(weight - dequantize(q), full_matrices=False)
        root = s[:r].sqrt()
        left, right = u[:, :r] * root, root[:, None] * vh[:r]
        target = weight - left @ right
    return q, left, right


class QuantizedMatmul(torch.autograd.Function):
    """x·Wᵀ with W dequantised on the fly — in the backward too, so autograd keeps the compact codes rather than a
    float copy of W per layer (what bitsandbytes' 4-bit matmul does; the base weight gets no gradient)."""

    @staticmethod
    def forward(ctx, x, codes, absmax, book, shape, block_size):
        ctx.save_for_backward(codes, absmax, book)
        ctx.shape, ctx.block_size = shape, block_size
        return F.linear(x, dequantize_tensors(codes, absmax, book, shape, block_size, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        codes, absmax, book = ctx.saved_tensors
        weight = dequantize_tensors(codes, absmax, book, ctx.shape, ctx.block_size, grad.dtype)
        return grad @ weight, None, None, None, None, None


class LoftQLinear(LoRALinear):
    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool, bits: int,
                 block_size: int, iterations: int):
        super().__init__(linear, r, alpha, dropout, rslora)
        q, left, right = loftq_init(linear.weight, bits, block_size, r, iterations)
        if left is not None:
            root = math.sqrt(self.scaling)
            self.lora_B.data.copy_(left / root)
            self.lora_A.data.copy_(right / root)
        self.compute_dtype = linear.weight.dtype
        self.weight_shape, self.bits, self.block_size = q.shape, bits, block_size
        del self.weight  # the float weight is gone; only the quantised copy remains
        self.register_buffer("quant_codes", q.codes)
        self.register_buffer("quant_absmax", q.absmax)
        self.register_buffer("code_book", code_book(bits, q.codes.device), persistent=False)

    def adapter_buffers(self) -> tuple[str, ...]:
        # The quantised base is part of the adapted model: LoftQ's B·A only make sense on this exact Q.
        return ("quant_codes", "quant_absmax")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, block_size={self.block_size}"

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_tensors(self.quant_codes, self.quant_absmax, self.code_book, self.weight_shape,
                                  self.block_size, dtype or self.compute_dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        out = QuantizedMatmul.apply(x, self.quant_codes, self.quant_absmax, self.code_book, self.weight_shape,
                                    self.block_size)
        return out if self.bias is None else out + self.bias

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            merged = self.dequantized_weight(torch.float32) + self.delta_weight()
            self.weight = nn.Parameter(merged.to(self.compute_dtype), requires_grad=False)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            del self.weight
            self.merged = False


@dataclass
class LoftQOptions:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    bits: int = 4  # 4: NF4, 8: int8
    block_size: int = 64
    iterations: int = 1  # alternating steps; 0 = plain quantisation + zero-init LoRA (QLoRA-style)
    targets: tuple[str, ...] = PROJECTIONS
    layers: tuple[int, ...] | None = None
    seed: int | None = 0

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be > 0")
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits} is not supported (4: NF4, 8: int8)")
        if self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"block_size={self.block_size} must be a positive even number")
        if self.iterations < 0:
            raise ValueError(f"iterations={self.iterations} must be >= 0")


@register("loftq", LoftQOptions, mergeable=True, summary="LoRA on an NF4/int8-quantised base, LoftQ-initialised",
          loading_overrides={"iterations": 0})
def build_loftq(llama: nn.Module, opts: LoftQOptions) -> None:
    wrap_linears(llama, opts.targets, opts.layers, lambda path, linear: LoftQLinear(
        linear, opts.r, opts.alpha, opts.dropout, opts.rslora, opts.bits, opts.block_size, opts.iterations))
