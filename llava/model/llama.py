"""LLaMA decoder in one file: RMSNorm pre-norm, SwiGLU MLP, rotary embeddings, grouped-query attention through
`scaled_dot_product_attention`, a static KV cache, and Hugging Face checkpoints in and out.

Module names follow the Hugging Face layout (`layers.N.self_attn.q_proj`, `layers.N.mlp.gate_proj`, ...) so that adapter
targets, peft exports and checkpoint maps read the same everywhere; the map to HF keys is still written out explicitly in
`hf_key` below.

Rotary layout: HF checkpoints store q/k rows in "rotate-half" order (the first half of each head's dimensions pairs with
the second half). That is the layout used here, so HF weights load unchanged. Meta's original consolidated checkpoints
use interleaved pairs (dims 2i, 2i+1); converting those needs the row permutation that transformers'
`convert_llama_weights_to_hf.py` applies. We only read HF-layout directories.

Extension points used by the adapters (llava/adapters) — both None by default and free when unused:
- `Llama.input_prompt`: a module called as `input_prompt(batch_size)` that returns `[batch, n, dim]` virtual token
  embeddings prepended to the input (prompt tuning, P-tuning). Their logits are dropped from the output; they live in
  the KV cache like real tokens.
- `Attention.kv_prefix`: a module called as `kv_prefix(batch_size)` that returns `(k, v)`, each
  `[batch, n_kv_heads, p, head_dim]`, prepended to this layer's keys/values and never stored in the cache (prefix
  tuning). Real tokens' positions shift by p, as in peft.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded; the message names the file and key."""


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    vocab_size: int = 32000
    ffn_hidden: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: int | None = 1
    eos_id: int | None = 2
    pad_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("linear", "llama3", "default"):
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported (supported: linear, llama3); got {self.rope_scaling}"
                )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown LLaMA preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return replace(PRESETS[name], **overrides)

    # ---- Hugging Face config.json -------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict, where: str = "config.json") -> "LlamaConfig":
        """Read a transformers LlamaConfig dict; anything this decoder would compute differently is an error."""
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise CheckpointError(f"{where}: model_type {model_type!r} is not supported (only 'llama')")
        for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if key in hf and hf[key] != expected:
                raise CheckpointError(f"{where}: {key}={hf[key]!r} is not supported (expected {expected!r})")
        missing = [k for k in ("hidden_size", "num_attention_heads") if k not in hf]
        if missing:
            raise CheckpointError(f"{where}: missing required key {missing[0]!r}")
        dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, dim // n_heads):
            raise CheckpointError(f"{where}: head_dim={hf['head_dim']} != hidden_size/num_attention_heads is not supported")
        # transformers >= 5 nests theta and scaling in `rope_parameters`; older configs use top-level keys.
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("linear", "llama3", "default"):
                raise CheckpointError(f"{where}: rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
            scaling = None if kind == "default" else {
                **{k: v for k, v in scaling.items() if k not in ("rope_type", "rope_theta")}, "type": kind}
        try:
            return cls(
                dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads, vocab_size=hf["vocab_size"],
                ffn_hidden=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta, rope_scaling=scaling,
                max_seq_len=hf.get("max_position_embeddings", 2048),
                tie_embeddings=hf.get("tie_word_embeddings", False),
                bos_id=hf.get("bos_token_id", 1), eos_id=_first(hf.get("eos_token_id", 2)), pad_id=hf.get("pad_token_id"),
            )
        except KeyError as e:
            raise CheckpointError(f"{where}: missing required key {e.args[0]!r}") from None
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None

    def to_hf_config(self, dtype: torch.dtype = torch.float32) -> dict:
        scaling = None
        if self.rope_scaling is not None:
            scaling = {k: v for k, v in self.rope_scaling.items() if k != "type"}
            scaling["rope_type"] = self.rope_scaling["type"]
        # Both spellings: transformers < 5 reads rope_theta/rope_scaling, >= 5 reads rope_parameters.
        rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": self.rope_theta}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "vocab_size": self.vocab_size, "intermediate_size": self.ffn_hidden,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "rope_scaling": scaling,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id,
            "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
        }


def _first(value):
    return value[0] if isinstance(value, list) else value


_LLAMA2_7B = LlamaConfig(max_seq_len=4096, norm_eps=1e-5)
_LLAMA2_13B = LlamaConfig(dim=5120, n_layers=40, n_heads=40, ffn_hidden=13824, max_seq_len=4096, norm_eps=1e-5)
PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": LlamaConfig(norm_eps=1e-6),
    "llama2-7b": _LLAMA2_7B,
    "llama2-13b": _LLAMA2_13B,
    "llama2-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672, max_seq_len=4096),
    "vicuna-7b-v1.5": _LLAMA2_7B,
    "vicuna-13b-v1.5": _LLAMA2_13B,
    "llama3-8b": LlamaConfig(n_kv_heads=8, ffn_hidden=14336, vocab_size=128256, rope_theta=500000.0, max_seq_len=8192,
                             bos_id=128000, eos_id=128001),
    "llama3.1-8b": LlamaConfig(
        n_kv_heads=8, ffn_hidden=14336, vocab_size=128256, rope_theta=500000.0, max_seq_len=131072,
        bos_id=128000, eos_id=128001,
        rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
    # ~1.1B LLaMA-shaped model for GPU benchmarks (LLaMA-2 vocabulary).
    "llama-1b": LlamaConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden=5632, max_seq_len=2048),
    # Tiny sizes for tests and the CPU demo.
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=176, vocab_size=512, max_seq_len=256),
    "small": LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=688, vocab_size=2048, max_seq_len=512),
}


# ---- rotary embeddings --------------------------------------------------------------------------------------------

def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies, with linear or llama3-style scaling applied (same formulas as transformers)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    scaling = config.rope_scaling
    if scaling is None or scaling["type"] == "default":
        return inv_freq
    if scaling["type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sign-folded sin `[length, head_dim]` for positions 0..length-1 in rotate-half layout.

    The first half of sin is negated, so `apply_rope` rotates with one `roll` instead of a negate and a concatenate;
    the products are the same floats as transformers' `x * cos + rotate_half(x) * sin`.
    """
    freqs = torch.arange(length, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq.float()
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# ---- KV cache ------------------------------------------------------------------------------------------------------

class KVCache:
    """Static per-layer key/value buffers `[batch, n_kv_heads, max_len, head_dim]`; `length` tokens are filled.

    Preallocation keeps decode free of concatenations; `Llama.forward` advances `length` after all layers ran.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (used when finished sequences leave a batch)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]


# ---- modules -------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both branches compute transformers' formula in its order (normalise in fp32, cast, then scale), so outputs
        # match it bit for bit; in fp32 the fused op does it with one dispatch instead of seven.
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.kv_prefix: nn.Module | None = None

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.kv_prefix is not None:
            pk, pv = self.kv_prefix(B)
            k, v = torch.cat((pk.to(k.dtype), k), dim=2), torch.cat((pv.to(v.dtype), v), dim=2)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None and T > 1 and k.shape[2] == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # mask None with T == 1: a single new token sees every key
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._rope_cache: tuple | None = None  # (inv_freq, dtype, cos, sin), see _rope_tables
        self.input_prompt: nn.Module | None = None
        self.gradient_checkpointing = False

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "Llama":
        return cls(LlamaConfig.from_name(name, **overrides))

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "Llama":
        """Random init as transformers does (normal(0, std) for linears and embeddings, ones for norms)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        return self

    def num_params(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                total += p.numel()
        return total

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for `max_len` real tokens per row (room for `input_prompt`'s virtual tokens is added)."""
        w = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len + self.num_virtual_tokens(), device=w.device, dtype=w.dtype)

    def num_virtual_tokens(self) -> int:
        return 0 if self.input_prompt is None else int(self.input_prompt.num_tokens)

    def num_kv_prefix(self) -> int:
        kv_prefix = self.layers[0].self_attn.kv_prefix
        return 0 if kv_prefix is None else int(kv_prefix.num_tokens)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits `[batch, seq, vocab]` (or `[batch, 1, vocab]` with `last_only`, or the final hidden states).

        `attention_mask` ([batch, past + seq], 1 = real token) is needed for left padding and cached decoding of
        padded batches. Right-padded training batches need none: causal masking already hides trailing pads from
        every real token, and leaving it out keeps the fused causal kernel.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = 0 if cache is None else cache.length
        n_virtual, n_prefix = self.num_virtual_tokens(), self.num_kv_prefix()
        prepend = n_virtual > 0 and past == 0
        if prepend:
            x = torch.cat((self.input_prompt(B).to(x.dtype), x), dim=1)

        # Rotary positions. Virtual tokens come first (after the p prefix slots, which shift everything by p, as in
        # peft); real tokens are counted through the mask so left padding does not shift them. Without a mask the
        # positions are one contiguous run starting at past + p, and cos/sin are a slice of the tables (no gather).
        if attention_mask is None:
            cos, sin = self._rope_tables(past + n_prefix + x.shape[1], x.dtype)
            cos, sin = (t[past + n_prefix:past + n_prefix + x.shape[1]][None, None] for t in (cos, sin))
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:] + n_virtual + n_prefix
            if prepend:
                virtual_pos = torch.arange(n_prefix, n_prefix + n_virtual, device=x.device).expand(B, n_virtual)
                positions = torch.cat((virtual_pos, positions), dim=1)
            cos, sin = self._rope_tables(attention_mask.shape[1] + n_virtual + n_prefix, x.dtype)
            cos, sin = cos[positions][:, None], sin[positions][:, None]
        mask = self._attention_mask(attention_mask, B, x.shape[1], past, n_virtual, n_prefix, x.device)

        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += x.shape[1]
        if prepend:
            x = x[:, n_virtual:]
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def _rope_tables(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin `[>= length, head_dim]` in `dtype`, kept between calls and grown on demand.

        Values are computed in fp32 and then cast, as transformers does per call. The tables follow `inv_freq` (they
        are rebuilt when it is replaced or moved, e.g. by `from_hf` or `.to(device)`).
        """
        cached = self._rope_cache
        if cached is None or cached[0] is not self.inv_freq or cached[1] != dtype or cached[2].shape[0] < length:
            length = max(length, 256, 0 if cached is None else 2 * cached[2].shape[0])
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable by autograd later
                cos, sin = rope_tables(self.inv_freq, length)
                cached = self._rope_cache = (self.inv_freq, dtype, cos.to(dtype), sin.to(dtype))
        return cached[2], cached[3]

    @staticmethod
    def _attention_mask(attention_mask, B, T, past, n_virtual, n_prefix, device) -> torch.Tensor | None:
        """Boolean `[B, 1, T, keys]` mask, or None when plain causal attention (or a single new token) is exact."""
        if attention_mask is None and n_prefix == 0 and (past == 0 or T == 1):
            return None
        n_keys = n_prefix + past + T
        query_idx = torch.arange(n_prefix + past, n_keys, device=device)
        key_idx = torch.arange(n_keys, device=device)
        allowed = (key_idx[None, :] <= query_idx[:, None])[None, None]  # [1, 1, T, keys]
        if attention_mask is not None:
            lead = torch.ones(B, n_prefix + n_virtual, dtype=torch.bool, device=device)
            key_valid = torch.cat((lead, attention_mask.bool()), dim=1)
            if key_valid.shape[1] != n_keys:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens but the cache and input hold "
                    f"{n_keys - n_prefix - n_virtual} real tokens")
            # Every query may see itself, so fully padded rows stay finite (their outputs are never used).
            allowed = (allowed & key_valid[:, None, None, :]) | (key_idx[None, :] == query_idx[:, None])[None, None]
        return allowed.expand(B, 1, T, n_keys) if allowed.shape[0] == 1 else allowed

    # ---- Hugging Face checkpoints -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | Path, dtype: torch.dtype | None = None, *, ignore_prefixes: tuple[str, ...] = (),
                device: str | torch.device = "cpu") -> "Llama":
        """Load a Hugging Face LLaMA directory (config.json + safetensors, sharded or not, or pytorch_model*.bin).

        The model is built on the meta device and each tensor is assigned as it is read, so the weights are never held
        twice. Keys starting with one of `ignore_prefixes` (e.g. LLaVA's `model.mm_projector.`) are skipped.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: not found (expected a Hugging Face LLaMA directory)")
        hf_config = json.loads(config_file.read_text())
        config = LlamaConfig.from_hf_config(hf_config, where=str(config_file))
        if dtype is None:
            name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
            dtype = getattr(torch, str(name), torch.float32)
        with torch.device("meta"):
            model = cls(config)
        expected = {name: p for name, p in model.named_parameters()}
        loaded: set[str] = set()
        for key, tensor, source in iter_hf_tensors(path):
            if key.startswith(ignore_prefixes) or _IGNORED_HF_KEY.search(key):
                continue
            name = hf_to_ours(key)
            if name == "lm_head.weight" and config.tie_embeddings:
                continue  # tied: the embedding is the head (some tied checkpoints still store a copy)
            if name is None or name not in expected:
                raise CheckpointError(f"{source}: unexpected key {key!r} (not a LLaMA weight; "
                                      f"pass ignore_prefixes to skip extra modules)")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(f"{source}: key {key!r} has shape {tuple(tensor.shape)}, "
                                      f"config.json implies {tuple(expected[name].shape)}")
            _assign(model, name, tensor.to(device=device, dtype=dtype))
            loaded.add(name)
        wanted = set(expected) - ({"lm_head.weight"} if config.tie_embeddings else set())
        missing = sorted(wanted - loaded)
        if missing:
            raise CheckpointError(f"{path}: missing weights {', '.join(hf_key(m) for m in missing[:5])}"
                                  f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(config, device=device)
        return model.eval()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        # Only the decoder's own weights: adapter tensors (e.g. `q_proj.lora_A`) are not part of a HF LLaMA.
        with torch.device("meta"):
            base = {name for name, _ in Llama(self.config).named_parameters(remove_duplicate=False)}
        state = {hf_key(name): p for name, p in self.named_parameters(remove_duplicate=False) if name in base}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def save_hf(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json + safetensors (sharded with an index above `max_shard_bytes`) that transformers loads."""
        from llava.io import atomic_save_safetensors, atomic_write_json

        path = Path(path)
        state = self.hf_state_dict()
        dtype = next(iter(state.values())).dtype
        # config.json is written last and marks the directory complete: remove an old one first, so a save that
        # fails half way over an earlier model never loads as a mix of old and new shards.
        (path / "config.json").unlink(missing_ok=True)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes
        if len(shards) == 1:
            atomic_save_safetensors(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                atomic_save_safetensors(shard, path / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            atomic_write_json(path / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": weight_map})
        atomic_write_json(path / "config.json", self.config.to_hf_config(dtype))


# ---- HF key map ----------------------------------------------------------------------------------------------------
# Ours                                   Hugging Face
# embed_tokens.weight                    model.embed_tokens.weight
# layers.N.<...>                         model.layers.N.<...>   (same sub-names: self_attn.{q,k,v,o}_proj, mlp.*, norms)
# norm.weight                            model.norm.weight
# lm_head.weight                         lm_head.weight
_IGNORED_HF_KEY = re.compile(r"rotary_emb\.inv_freq$")  # old transformers versions saved this buffer


def hf_key(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def hf_to_ours(key: str) -> str | None:
    if key == "lm_head.weight":
        return key
    return key.removeprefix("model.") if key.startswith("model.") else None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=getattr(module, attr).requires_grad))


def iter_hf_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield (key, tensor, file) from a HF directory one tensor at a time (safetensors) or one shard at a time (.bin).

    `.bin` files are read with `weights_only=True`: a pickle cannot run code on load.
    """
    path = Path(path)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid index file ({e})") from None
            files = list(dict.fromkeys(weight_map.values()))
            for name in files:
                if not (path / name).is_file():
                    raise CheckpointError(f"{index}: shard {name} is listed but missing from {path}")
            break
        if (path / single).is_file():
            files = [single]
            break
    else:
        raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                              "or pytorch_model.bin.index.json found")
    for name in files:
        file = path / name
        if name.endswith(".safetensors"):
            for key, tensor in read_safetensors(file):
                yield key, tensor, str(file)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is reported with the file name
                raise CheckpointError(f"{file}: cannot load with weights_only=True ({type(e).__name__}: {e})") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
            for key in list(state):
                yield key, state.pop(key), str(file)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of a .safetensors file, each read straight from the file into its own memory.

    Plain reads instead of a memory map: the loaded weights do not depend on the file staying unchanged (rewriting a
    mapped checkpoint in place would change or crash the model), and a dtype conversion does not keep mapped file
    pages resident beside the converted copy.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        try:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            entries = sorted((int(info["data_offsets"][0]), int(info["data_offsets"][1]), key, info["dtype"],
                              [int(n) for n in info["shape"]]) for key, info in header.items())
        except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors header ({type(e).__name__}: {e}); "
                                  "the file is corrupt or not a safetensors file") from None
        data_start = 8 + header_len
        for begin, end, key, dtype_name, shape in entries:
            dtype = _SAFETENSORS_DTYPES.get(dtype_name)
            if dtype is None:
                raise CheckpointError(f"{file}: key {key!r} has dtype {dtype_name!r}, which is not a weight dtype "
                                      f"(supported: {', '.join(_SAFETENSORS_DTYPES)})")
            n_bytes = math.prod(shape) * dtype.itemsize
            if end - begin != n_bytes or data_start + end > size:
                raise CheckpointError(f"{file}: key {key!r} ({dtype_name} {shape}) needs bytes {begin}..{end} "
                                      f"of the data section, but the file has {size - data_start}; it is truncated "
                                      "or corrupt")
            buffer = torch.empty(n_bytes, dtype=torch.uint8)
            f.seek(data_start + begin)
            if n_bytes and f.readinto(memoryview(buffer.numpy())) != n_bytes:
                raise CheckpointError(f"{file}: key {key!r}: file ended while reading; it is truncated")
            yield key, buffer.view(dtype).reshape(shape)
