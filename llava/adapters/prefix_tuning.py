"""Prefix tuning (Li & Liang, 2021): key/value prefixes at every layer, produced during training by a
reparametrisation MLP — Embedding(n, dim) → Linear(dim, hidden) → Tanh → Linear(hidden, 2·L·kv_dim), peft's
`prefix_projection=True` encoder — because optimising the prefixes directly is unstable.

The shared trunk (embedding, first Linear, Tanh) lives at `llama.prefix_trunk`; the last Linear is split by layer,
each layer's slice at `layers.N.self_attn.kv_prefix.out_proj` (the same map as one Linear to 2·L·kv_dim, computed only
for the layer that needs it). At inference the MLP output is computed once and reused (eval mode, no grad, weights
unchanged), and `fold()` (llava.adapters.fold_adapter) replaces the MLP by the plain prefix tensors — the P-Tuning v2
form (llava/adapters/prefix_tuning_v2.py) — and drops it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava.adapters.base import Adapter
from llava.adapters.prefix_tuning_v2 import KVPrefix, attention_modules, expand_kv
from llava.adapters.prompting import reuse_in_inference
from llava.adapters.registry import register


class PrefixTrunk(Adapter):
    """tanh(Linear(E)) for the n prefix embeddings E, shared by every layer."""

    def __init__(self, num_tokens: int, dim: int, hidden: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(num_tokens, dim))  # as peft's nn.Embedding init, N(0, 1)
        self.linear = nn.Linear(dim, hidden)

    def adapter_params(self) -> tuple[str, ...]:
        return ("embedding", "linear.weight", "linear.bias")

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.linear(self.embedding))

    def fold(self) -> None:
        """Nothing is left to compute once every layer holds its prefix."""
        return None


class PrefixProjection(Adapter):
    def __init__(self, trunk: PrefixTrunk, hidden: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.out_proj = nn.Linear(hidden, 2 * n_kv_heads * head_dim)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        object.__setattr__(self, "trunk", trunk)  # shared, registered once on the Llama

    @property
    def num_tokens(self) -> int:
        return self.trunk.embedding.shape[0] if self.enabled else 0

    def adapter_params(self) -> tuple[str, ...]:
        return ("out_proj.weight", "out_proj.bias")

    def compute(self) -> torch.Tensor:
        """[2, n_kv_heads, n, head_dim]"""
        kv = self.out_proj(self.trunk())
        return kv.view(-1, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return expand_kv(self.out_proj.weight.new_zeros(2, self.n_kv_heads, 0, self.head_dim), batch_size)
        sources = list(self.parameters()) + list(self.trunk.parameters())
        return expand_kv(reuse_in_inference(self, self.compute, sources), batch_size)

    @torch.no_grad()
    def fold(self) -> KVPrefix:
        return KVPrefix(self.compute().detach().contiguous(), trainable=False)


@dataclass
class PrefixOptions:
    num_tokens: int = 20
    encoder_hidden: int = 512  # width of the reparametrisation MLP (Li & Liang use 512-800)
    seed: int | None = 0

    def __post_init__(self):
        if self.num_tokens <= 0 or self.encoder_hidden <= 0:
            raise ValueError(f"num_tokens={self.num_tokens} and encoder_hidden={self.encoder_hidden} must be > 0")


@register("prefix_tuning", PrefixOptions, mergeable=False,
          summary="per-layer key/value prefixes from a reparametrisation MLP (foldable for inference)")
def build_prefix(llama: nn.Module, opts: PrefixOptions) -> None:
    attns = attention_modules(llama)
    cfg, weight = llama.config, llama.embed_tokens.weight
    llama.prefix_trunk = PrefixTrunk(opts.num_tokens, cfg.dim, opts.encoder_hidden).to(weight.device, weight.dtype)
    for attn in attns:
        projection = PrefixProjection(llama.prefix_trunk, opts.encoder_hidden, cfg.n_kv_heads, cfg.head_dim)
        attn.kv_prefix = projection.to(weight.device, weight.dtype)
