"""Shared fixtures for the adapter tests: a tiny GQA LLaMA and one small configuration per method (and variant)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llava.model import Llama, LlamaConfig

TINY = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=256, max_seq_len=128)


def tiny_llama(seed: int = 0) -> Llama:
    return Llama(TINY).init_weights(seed=seed).eval()


@dataclass
class Case:
    id: str
    method: str
    options: dict = field(default_factory=dict)
    identity_at_init: bool = True
    mergeable: bool = True
    # trainable parameter count for TINY, from the method's formula
    count: int = 0


C = TINY
L, D, F, KV = C.n_layers, C.dim, C.ffn_hidden, C.n_kv_heads * C.head_dim
# (in, out) of each projection of one layer
SHAPES = {"q_proj": (D, D), "k_proj": (D, KV), "v_proj": (D, KV), "o_proj": (D, D), "gate_proj": (D, F),
          "up_proj": (D, F), "down_proj": (F, D)}


def _lora_count(r, names=SHAPES):
    return L * sum(r * (i + o) for i, o in (SHAPES[n] for n in names))


def _oft_count(block):
    # per target: (in / b) blocks of b(b-1)/2; TINY's widths are all divisible by 16
    return L * sum((i // block) * block * (block - 1) // 2 for i, _ in SHAPES.values())


def _kron_count():
    # A: (a_out, a_in), B: (b_out, b_in) with a = largest divisor <= sqrt: 64 -> 8x8, 32 -> 4x8, 96 -> 8x12
    split = {64: (8, 8), 32: (4, 8), 96: (8, 12)}
    total = 0
    for i, o in SHAPES.values():
        (ao, bo), (ai, bi) = split[o], split[i]
        total += ao * ai + bo * bi
    return L * total


CASES = [
    Case("lora", "lora", dict(r=4, alpha=8), count=_lora_count(4)),
    Case("lora_rslora_qv", "lora", dict(r=4, alpha=8, rslora=True, targets=["q_proj", "v_proj"], layers=[1]),
         count=4 * (D + D) + 4 * (D + KV)),
    Case("adalora", "adalora", dict(init_r=6, target_r=3), count=L * sum(6 * (i + o) + 6 for i, o in SHAPES.values())),
    Case("loftq_nf4", "loftq", dict(r=4, alpha=8), identity_at_init=False, count=_lora_count(4)),
    Case("loftq_int8", "loftq", dict(r=4, alpha=4, bits=8, targets=["q_proj", "down_proj"]), identity_at_init=False,
         count=_lora_count(4, ["q_proj", "down_proj"])),
    Case("oft", "oft", dict(block_size=16), count=_oft_count(16)),
    Case("oft_neumann_coft", "oft", dict(block_size=16, cayley="neumann", coft=True, eps=1e-1), count=_oft_count(16)),
    Case("ia3", "ia3", {}, count=L * (KV + KV + F)),
    Case("krona", "krona", {}, count=_kron_count()),
    Case("krona_ffn_res", "krona", dict(variant="ffn_res", scale=2.0), mergeable=False,
         count=L * (8 * 8 + 8 * 8 + 1)),
    Case("prompt_tuning", "prompt_tuning", dict(num_tokens=5), identity_at_init=False, mergeable=False, count=5 * D),
    Case("p_tuning_mlp", "p_tuning", dict(num_tokens=4, encoder_hidden=32), identity_at_init=False, mergeable=False,
         count=4 * D + (D * 32 + 32) + (32 * 32 + 32) + (32 * D + D)),
    Case("p_tuning_lstm_template", "p_tuning", dict(template_ids=[-1, 17, 18, -1, -1, 5], encoder="lstm",
                                                    encoder_hidden=16, lstm_layers=1),
         identity_at_init=False, mergeable=False,
         count=3 * D + 2 * 4 * 16 * (D + 16 + 2) + (32 * 32 + 32) + (32 * D + D)),
    Case("prefix_tuning", "prefix_tuning", dict(num_tokens=3, encoder_hidden=32), identity_at_init=False,
         mergeable=False, count=3 * D + (D * 32 + 32) + L * (32 * 2 * KV + 2 * KV)),
    Case("prefix_tuning_v2", "prefix_tuning_v2", dict(num_tokens=3), identity_at_init=False, mergeable=False,
         count=L * 2 * 3 * KV),
]


def case_ids(cases):
    return [c.id for c in cases]


def batch(seed: int = 1, batch_size: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))


def perturb_adapter(model, scale: float = 0.05, seed: int = 3) -> None:
    """Move every adapter tensor away from its init, so that comparisons exercise a non-trivial adapter."""
    from llava.adapters import trainable_parameters

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
