"""P-Tuning v2 (Liu et al., 2022) — deep prompt tuning: trainable key/value prefixes at every layer, the raw form of
prefix tuning (peft's prefix tuning with `prefix_projection=False`).

Each layer's `Attention.kv_prefix` holds a tensor [2, n_kv_heads, n, head_dim] (keys, values): sized by the key/value
heads, so grouped-query attention is handled; prepended after the rotary embedding of the real keys and never written
to the KV cache. The real tokens' positions start at n and the mask gets n leading ones (as in peft), which the Llama
hook does.

Init (`init`): "vocab" (default) or "text" — the keys and values the frozen model itself computes for n sampled
vocabulary tokens or a text (repeated or cut to n): at init the adapted model behaves exactly as if that text were
prepended, a stable start that Li & Liang found better than random; "random" — N(0, 1), peft's init.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from llava.adapters.base import Adapter, AdapterError, apply_time_only, set_tensor
from llava.adapters.prompting import check_ids, repeat_to, sample_vocab_ids, text_token_ids
from llava.adapters.registry import register


class KVPrefix(Adapter):
    """One layer's key/value prefix [2, n_kv_heads, n, head_dim]; a buffer once folded (`trainable=False`)."""

    def __init__(self, prefix: torch.Tensor, trainable: bool = True):
        super().__init__()
        self.trainable = trainable
        set_tensor(self, "prefix", prefix, trainable)

    @property
    def num_tokens(self) -> int:
        return self.prefix.shape[2] if self.enabled else 0

    def adapter_params(self) -> tuple[str, ...]:
        return ("prefix",) if self.trainable else ()

    def adapter_buffers(self) -> tuple[str, ...]:
        return () if self.trainable else ("prefix",)

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self.prefix if self.enabled else self.prefix[:, :, :0]
        return expand_kv(prefix, batch_size)


def expand_kv(prefix: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, heads, n, head_dim] → (keys, values), each [batch, heads, n, head_dim] (a view, no copy)."""
    return prefix[0][None].expand(batch_size, -1, -1, -1), prefix[1][None].expand(batch_size, -1, -1, -1)


def attention_modules(llama: nn.Module) -> list[nn.Module]:
    attns = [layer.self_attn for layer in llama.layers]
    if any(a.kv_prefix is not None for a in attns):
        raise AdapterError("the model already has key/value prefixes")
    return attns


@torch.no_grad()
def token_kv(llama: nn.Module, token_ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the keys/values [2, n_kv_heads, n, head_dim] the model computes for `token_ids` (positions 0..n-1)."""
    ids = torch.tensor([token_ids], device=llama.embed_tokens.weight.device)
    cache = llama.new_cache(1, len(token_ids))
    llama(ids, cache=cache)
    return [torch.stack((k[0], v[0])) for k, v in zip(cache.keys, cache.values)]


@dataclass
class PrefixV2Options:
    num_tokens: int = 20
    init: str = "vocab"  # "vocab" | "text" | "random"
    init_text: str | None = None
    init_token_ids: tuple[int, ...] | None = None
    tokenizer: object = apply_time_only()
    seed: int | None = 0

    def __post_init__(self):
        if self.num_tokens <= 0:
            raise ValueError(f"num_tokens={self.num_tokens} must be > 0")
        if self.init not in ("vocab", "text", "random"):
            raise ValueError(f"init={self.init!r} must be 'vocab', 'text' or 'random'")
        if self.init == "text" and self.init_text is None and self.init_token_ids is None:
            raise ValueError("init='text' needs init_text (with a tokenizer) or init_token_ids")


@register("prefix_tuning_v2", PrefixV2Options, mergeable=False,
          summary="trainable key/value prefixes at every layer (P-Tuning v2)")
def build_prefix_v2(llama: nn.Module, opts: PrefixV2Options) -> PrefixV2Options:
    attns = attention_modules(llama)
    cfg, weight = llama.config, llama.embed_tokens.weight
    ids = text_token_ids(opts.init_text, opts.tokenizer, opts.init_token_ids, "prefix_tuning_v2 init_text")
    if opts.init == "random":
        shape = (2, cfg.n_kv_heads, opts.num_tokens, cfg.head_dim)
        prefixes = [torch.randn(shape, device=weight.device).to(weight.dtype) for _ in attns]
    else:
        init_ids = repeat_to(ids, opts.num_tokens) if opts.init == "text" else \
            sample_vocab_ids(opts.num_tokens, cfg.vocab_size)
        check_ids(init_ids, cfg.vocab_size, f"prefix_tuning_v2 {opts.init} init")
        prefixes = token_kv(llama, init_ids)
    for attn, prefix in zip(attns, prefixes):
        attn.kv_prefix = KVPrefix(prefix.clone())
    return replace(opts, init_token_ids=tuple(ids) if ids is not None else None, tokenizer=None)
