"""OFT (Qiu et al., 2023; Liu et al., 2024 for the block-diagonal form): rotate the layer's input by a learned
orthogonal matrix, y = W (R x), i.e. the merged weight is W·Rᵀ.

R is block-diagonal with r blocks of size b (r·b = in_features). Each block comes from a skew-symmetric S (only its
b(b−1)/2 upper-triangle entries are parameters, `oft_S` [r, b(b−1)/2]) through the Cayley transform
R = (I + S)(I − S)⁻¹ — exact (a matrix inverse) by default, or peft's truncated Neumann series
I + 2S + 2S² + … + 2S^(k−2) + S^(k−1) with k = `neumann_terms` (`cayley="neumann"`). S = 0 at init, so R = I and the
model is unchanged.

COFT (`coft=True`) keeps each block's S inside a Frobenius ball of radius eps/√r (peft's `_project_batch`). peft
overwrites the parameter inside the forward; here the projection is part of the forward's parametrisation and the
stored parameter is never written, which keeps it safe under DeepSpeed ZeRO-3 and gives the same output.

Note on peft: its exact path computes (I − S)(I + S)⁻¹ while its Neumann path approximates (I + S)(I − S)⁻¹, the
transpose; peft's exact mode therefore equals ours with S negated (the oracle test uses that).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava.adapters.base import PROJECTIONS, LinearAdapter, wrap_linears
from llava.adapters.registry import register


class OFTLinear(LinearAdapter):
    def __init__(self, linear: nn.Linear, block_size: int, cayley: str = "exact", neumann_terms: int = 5,
                 coft: bool = False, eps: float = 6e-5):
        super().__init__(linear)
        block_size = nearest_divisor(self.in_features, block_size)
        self.block_size, self.n_blocks = block_size, self.in_features // block_size
        self.cayley, self.neumann_terms, self.coft, self.eps = cayley, neumann_terms, coft, eps
        w = linear.weight
        self.oft_S = nn.Parameter(torch.zeros(self.n_blocks, block_size * (block_size - 1) // 2,
                                              dtype=w.dtype, device=w.device))
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=w.device)
        self.register_buffer("triu_rows", rows, persistent=False)
        self.register_buffer("triu_cols", cols, persistent=False)

    def adapter_params(self) -> tuple[str, ...]:
        return ("oft_S",)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.n_blocks}x{self.block_size}, cayley={self.cayley}"

    def skew(self) -> torch.Tensor:
        """The r skew-symmetric blocks [r, b, b] (COFT-projected when enabled)."""
        upper = self.oft_S.new_zeros(self.n_blocks, self.block_size, self.block_size)
        upper[:, self.triu_rows, self.triu_cols] = self.oft_S
        skew = upper - upper.transpose(1, 2)
        if self.coft:
            radius = self.eps / self.n_blocks ** 0.5
            norm = torch.linalg.matrix_norm(skew, keepdim=True)
            skew = torch.where(norm <= radius, skew, skew * (radius / norm.clamp(min=1e-30)))
        return skew

    def rotation(self) -> torch.Tensor:
        """The r orthogonal blocks [r, b, b] (float32)."""
        skew = self.skew().float()
        eye = torch.eye(self.block_size, device=skew.device).expand_as(skew)
        if self.cayley == "exact":
            # (I + S)(I − S)⁻¹; a batched inverse of small blocks is far faster than a batched solve on CPU.
            return (eye + skew) @ torch.linalg.inv(eye - skew)
        rotation, power = eye + 2 * skew, skew
        for k in range(2, self.neumann_terms):
            power = power @ skew
            rotation = rotation + (1 if k == self.neumann_terms - 1 else 2) * power
        return rotation

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        rotation = self.rotation().to(x.dtype)
        blocks = x.reshape(*x.shape[:-1], self.n_blocks, self.block_size)
        rotated = torch.einsum("...rk,rkc->...rc", blocks, rotation).reshape(x.shape)
        return self.base_forward(rotated)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        blocks = weight.view(self.out_features, self.n_blocks, self.block_size)
        return torch.einsum("ork,rck->orc", blocks, self.rotation()).reshape_as(weight)  # W·Rᵀ per block

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # Solve W·Rᵀ = W' block by block (the Neumann rotation is only approximately orthogonal, so no transpose).
        blocks = weight.view(self.out_features, self.n_blocks, self.block_size).transpose(0, 1)  # [r, out, b]
        return torch.linalg.solve(self.rotation().transpose(1, 2), blocks, left=False).transpose(0, 1) \
            .reshape_as(weight)


def nearest_divisor(n: int, wanted: int) -> int:
    """The divisor of n closest to `wanted` (ties go to the smaller), as peft adjusts `oft_block_size`: blocks must
    tile the input exactly, and layers of one model have different widths."""
    if wanted >= n:
        return n
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - wanted), d))


@dataclass
class OftOptions:
    block_size: int = 32  # peft's default; per layer, the nearest divisor of its in_features is used
    cayley: str = "exact"  # "exact" (solve) or "neumann" (truncated series, cheaper)
    neumann_terms: int = 5
    coft: bool = False  # constrained OFT: keep each block near the identity
    eps: float = 6e-5  # COFT radius (before the 1/√r per-block scaling)
    targets: tuple[str, ...] = PROJECTIONS
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be >= 2")
        if self.cayley not in ("exact", "neumann"):
            raise ValueError(f"cayley={self.cayley!r} must be 'exact' or 'neumann'")
        if self.neumann_terms < 2:
            raise ValueError(f"neumann_terms={self.neumann_terms} must be >= 2")


@register("oft", OftOptions, mergeable=True, summary="block-diagonal orthogonal rotation (Cayley) of each input")
def build_oft(llama: nn.Module, opts: OftOptions) -> None:
    wrap_linears(llama, opts.targets, opts.layers, lambda path, linear: OFTLinear(
        linear, opts.block_size, opts.cayley, opts.neumann_terms, opts.coft, opts.eps))
