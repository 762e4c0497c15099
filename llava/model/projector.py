"""The projector from vision features to LLM embeddings, built exactly as LLaVA builds it so its state dict keys match
LLaVA's files (`model.mm_projector.0.weight`, `model.mm_projector.2.weight`, ... or `model.mm_projector.weight`).

- `linear`: one nn.Linear (keys `weight`, `bias`), LLaVA-1's projector;
- `mlp{N}x_gelu`: nn.Sequential(Linear, GELU, Linear, GELU, ..., Linear) with N linears (keys `0.*`, `2.*`, ...),
  LLaVA-1.5 uses `mlp2x_gelu`;
- `identity`: no parameters; the vision width must equal the LLM width.
"""
from __future__ import annotations

import re

from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")
PROJECTOR_TYPES = ("linear", "mlp{N}x_gelu (e.g. mlp2x_gelu)", "identity")


def build_projector(projector_type: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if projector_type == "linear":
        return nn.Linear(vision_dim, llm_dim)
    if projector_type == "identity":
        if vision_dim != llm_dim:
            raise ValueError(f"projector 'identity' needs the vision width ({vision_dim}) to equal the LLM width "
                             f"({llm_dim}); use 'linear' or 'mlp2x_gelu'")
        return nn.Identity()
    match = _MLP.match(projector_type)
    if match and int(match.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        for _ in range(int(match.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector type {projector_type!r}; valid: {', '.join(PROJECTOR_TYPES)}")
