"""KronA (Edalati et al., 2022): ΔW = s·(A ⊗ B) with A [a_out, a_in], B [b_out, b_in], out = a_out·b_out,
in = a_in·b_in — a full-rank update from a_out·a_in + b_out·b_in parameters.

ΔW is never built in the forward: with x reshaped to X [a_in, b_in] (row-major), (A ⊗ B)·x = vec(A · X · Bᵀ), two
small matmuls. Factor shapes: `factor` rows/columns for A when given (as peft LoKr's `decompose_factor`), else the
divisor pair closest to √dim with A the smaller one. Init: A = 0, B Kaiming-uniform (peft LoKr's), so ΔW = 0 at init.

Variants (`variant`):
- "linear": KronA on the chosen projections (mergeable: W ← W + s·A⊗B).
- "ffn": KronA^B, parallel to each layer's whole MLP: Y = FFN(X) + s·(A⊗B)X.
- "ffn_res": KronA^B_res, adds a learnable residual scale: Y = FFN(X) + s·(A⊗B)X + s_res·X, s_res starting at 0 so the
  model is unchanged at init. The FFN variants sit beside a non-linear block and cannot be merged into weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llava.adapters.base import PROJECTIONS, Adapter, AdapterError, LinearAdapter, lora_init_, wrap_linears
from llava.adapters.registry import register


def split_dim(dim: int, factor: int | None) -> tuple[int, int]:
    """(a, b) with a·b = dim: a = factor when given, else the largest divisor <= √dim."""
    if factor is not None:
        if dim % factor:
            raise AdapterError(f"krona factor {factor} does not divide dimension {dim}")
        return factor, dim // factor
    a = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return a, dim // a


def kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A ⊗ B) applied to the last dimension of x, without forming A ⊗ B: vec(A · X · Bᵀ) per row, as two plain 2-D
    matmuls (batched broadcasting would make autograd build a per-row copy of A's and B's gradients)."""
    lead, (a_out, a_in), (b_out, b_in) = x.shape[:-1], a.shape, b.shape
    rows = x.reshape(-1, b_in).to(a.dtype) @ b.T  # X·Bᵀ: [N·a_in, b_out]
    n = rows.shape[0] // a_in
    rows = rows.view(n, a_in, b_out).transpose(1, 2).reshape(n * b_out, a_in) @ a.T  # (A·X·Bᵀ)ᵀ: [N·b_out, a_out]
    return rows.view(n, b_out, a_out).transpose(1, 2).reshape(*lead, a_out * b_out)


class KronFactors(Adapter):
    """The trainable pair (A, B); shared by the projection and the FFN-parallel forms."""

    def _init_factors(self, out_features: int, in_features: int, factor: int | None, scale: float,
                      like: torch.Tensor) -> None:
        (a_out, b_out), (a_in, b_in) = split_dim(out_features, factor), split_dim(in_features, factor)
        kw = dict(dtype=like.dtype, device=like.device)
        self.scale = scale
        self.krona_A = nn.Parameter(torch.zeros(a_out, a_in, **kw))
        self.krona_B = nn.Parameter(lora_init_(torch.empty(b_out, b_in, **kw)))

    def adapter_params(self) -> tuple[str, ...]:
        return ("krona_A", "krona_B")

    def kron_forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(x, self.krona_A * self.scale, self.krona_B)  # scaling the small factor is cheaper


class KronALinear(LinearAdapter, KronFactors):
    def __init__(self, linear: nn.Linear, factor: int | None, scale: float):
        super().__init__(linear)
        self._init_factors(self.out_features, self.in_features, factor, scale, linear.weight)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kron_forward(x)

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.krona_A.float(), self.krona_B.float()) * self.scale


class KronAParallelFFN(KronFactors):
    """KronA^B(_res) beside an MLP. It lives at `mlp.krona` and a forward hook on the MLP adds its output, so the
    MLP's own parameter names (and the base checkpoint layout) do not change."""

    def __init__(self, mlp: nn.Module, dim: int, factor: int | None, scale: float, residual: bool):
        super().__init__()
        like = next(mlp.parameters())
        self._init_factors(dim, dim, factor, scale, like)
        self.residual = residual
        if residual:
            self.residual_scale = nn.Parameter(torch.zeros((), dtype=like.dtype, device=like.device))

    def adapter_params(self) -> tuple[str, ...]:
        return super().adapter_params() + (("residual_scale",) if self.residual else ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kron_forward(x)
        return out + self.residual_scale * x if self.residual else out


def _add_parallel_branch(mlp: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    branch = mlp.krona
    return output + branch(inputs[0]).to(output.dtype) if branch.enabled else output


@dataclass
class KronaOptions:
    variant: str = "linear"  # "linear" | "ffn" (KronA^B) | "ffn_res" (KronA^B_res)
    factor: int | None = None  # rows/columns of A; None: closest divisor pair to √dim
    scale: float = 1.0  # s
    targets: tuple[str, ...] | None = None  # "linear" only; None: every attention and MLP projection
    layers: tuple[int, ...] | None = None
    seed: int | None = 0

    def __post_init__(self):
        if self.variant not in ("linear", "ffn", "ffn_res"):
            raise ValueError(f"variant={self.variant!r} must be 'linear', 'ffn' or 'ffn_res'")
        if self.variant != "linear" and self.targets is not None:
            raise ValueError(f"targets apply to variant 'linear' only; variant {self.variant!r} attaches to each "
                             "layer's MLP (choose layers with `layers`)")


@register("krona", KronaOptions, mergeable=True,
          summary="Kronecker-product update s·(A⊗B), or KronA^B(_res) beside the FFN")
def build_krona(llama: nn.Module, opts: KronaOptions) -> None:
    if opts.variant == "linear":
        wrap_linears(llama, opts.targets or PROJECTIONS, opts.layers,
                     lambda path, linear: KronALinear(linear, opts.factor, opts.scale))
        return
    n_layers = len(llama.layers)
    if opts.layers is not None and any(not 0 <= i < n_layers for i in opts.layers):
        raise AdapterError(f"layers {list(opts.layers)} out of range: the model has layers 0..{n_layers - 1}")
    for i, layer in enumerate(llama.layers):
        if opts.layers is None or i in opts.layers:
            layer.mlp.krona = KronAParallelFFN(layer.mlp, llama.config.dim, opts.factor, opts.scale,
                                               opts.variant == "ffn_res")
            layer.mlp.register_forward_hook(_add_parallel_branch)
