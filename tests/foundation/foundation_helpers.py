"""Tiny random transformers LLaMA models written to disk, and the variants the parity tests run over."""
from __future__ import annotations

from pathlib import Path

import torch

# Each variant changes one thing that the decoder computes differently when it is wrong.
VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa_theta500k_tied": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True),
    "linear_scaling": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3_scaling": dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
}


def hf_config(**overrides):
    import transformers

    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=112, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=0.1, attn_implementation="sdpa")
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def hf_model(seed: int = 0, **overrides):
    """A random `transformers.LlamaForCausalLM` in eval mode; the wide init spreads logits so argmax ties are rare."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(hf_config(**overrides)).eval()


def save_hf_model(path: Path, seed: int = 0, **overrides):
    model = hf_model(seed, **overrides)
    model.save_pretrained(path)
    return model


def random_ids(batch: int, length: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """Token ids avoiding 0-2 (pad, bos, eos) so nothing stops or pads by accident."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
