"""What the prompt-type methods share: the static prompt tensor, reuse of an encoder's output at inference, and
turning text / a tokenizer / sampled vocabulary into token ids for initialisation.

They plug into the two hooks of `llava.model.Llama`: `input_prompt` (virtual token embeddings prepended to the input;
their logits are dropped, so labels need no change) and `Attention.kv_prefix` (per-layer key/value prefixes). Both
read `num_tokens`, which is 0 while the adapter is disabled.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llava.adapters.base import Adapter, AdapterError, set_tensor


class StaticPrompt(Adapter):
    """Virtual token embeddings [n, dim] held as one tensor: prompt tuning's parameters, or a folded encoder output
    (then a buffer, `trainable=False`)."""

    def __init__(self, embeddings: torch.Tensor, trainable: bool = True):
        super().__init__()
        self.trainable = trainable
        set_tensor(self, "embeddings", embeddings, trainable)

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0] if self.enabled else 0

    def adapter_params(self) -> tuple[str, ...]:
        return ("embeddings",) if self.trainable else ()

    def adapter_buffers(self) -> tuple[str, ...]:
        return () if self.trainable else ("embeddings",)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeddings[None].expand(batch_size, -1, -1)


def reuse_in_inference(module: nn.Module, compute: Callable[[], torch.Tensor], sources: list[torch.Tensor]):
    """`compute()`, computed once and reused while the module is in eval mode under no_grad and none of `sources`
    changed (in-place updates bump a tensor's version). Training and anything that needs gradients recompute."""
    if module.training or torch.is_grad_enabled():
        return compute()
    key = tuple((t.data_ptr(), t._version) for t in sources)
    cached = getattr(module, "_inference_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        module._inference_cache = cached
    return cached[1]


def text_token_ids(text: str | None, tokenizer, token_ids, what: str) -> list[int] | None:
    """Token ids given directly, or `tokenizer.encode(text)` (without BOS: the ids are spliced into a sequence)."""
    if token_ids is not None:
        return [int(i) for i in token_ids]
    if text is None:
        return None
    if tokenizer is None:
        raise AdapterError(f"{what}: a text needs a tokenizer (pass tokenizer=...) or pass its token ids instead")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise AdapterError(f"{what}: text {text!r} tokenizes to nothing")
    return [int(i) for i in ids]


def repeat_to(ids: list[int], n: int) -> list[int]:
    """Repeat or cut `ids` to length n (peft's text init)."""
    return (ids * (n // len(ids) + 1))[:n]


def sample_vocab_ids(n: int, vocab_size: int) -> list[int]:
    return torch.randint(0, vocab_size, (n,)).tolist()


def check_ids(ids: list[int], vocab_size: int, what: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise AdapterError(f"{what}: token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})")
