"""Prompt tuning (Lester et al., 2021): n trainable virtual token embeddings prepended to every input (before the
image and the conversation); the language model itself is frozen.

Init (`init`): "vocab" — embeddings of n token ids drawn uniformly from the vocabulary (the paper's recommended
start); "text" — the embeddings of a text's tokens, repeated or cut to n (peft's TEXT init; pass `init_text` with a
`tokenizer`, or `init_token_ids`); "random" — N(0, σ²) with σ the embedding table's own standard deviation (peft uses
N(0, 1), far off the scale of a trained embedding table).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from llava.adapters.base import AdapterError, apply_time_only
from llava.adapters.prompting import StaticPrompt, check_ids, repeat_to, sample_vocab_ids, text_token_ids
from llava.adapters.registry import register


@dataclass
class PromptTuningOptions:
    num_tokens: int = 20
    init: str = "vocab"  # "vocab" | "text" | "random"
    init_text: str | None = None
    init_token_ids: tuple[int, ...] | None = None  # the text's token ids (saved; `init_text` is resolved into these)
    tokenizer: object = apply_time_only()  # anything with .encode(text) -> list[int]
    seed: int | None = 0

    def __post_init__(self):
        if self.num_tokens <= 0:
            raise ValueError(f"num_tokens={self.num_tokens} must be > 0")
        if self.init not in ("vocab", "text", "random"):
            raise ValueError(f"init={self.init!r} must be 'vocab', 'text' or 'random'")
        if self.init == "text" and self.init_text is None and self.init_token_ids is None:
            raise ValueError("init='text' needs init_text (with a tokenizer) or init_token_ids")


def initial_embeddings(embed_tokens: nn.Embedding, n: int, init: str, token_ids: list[int] | None) -> torch.Tensor:
    table = embed_tokens.weight.detach()
    if init == "random":
        return torch.randn(n, table.shape[1], device=table.device).to(table.dtype) * table.float().std().to(table.dtype)
    ids = repeat_to(token_ids, n) if init == "text" else sample_vocab_ids(n, table.shape[0])
    check_ids(ids, table.shape[0], f"{init} init")
    return table[torch.tensor(ids, device=table.device)].clone()


@register("prompt_tuning", PromptTuningOptions, mergeable=False,
          summary="trainable virtual tokens before the input")
def build_prompt_tuning(llama: nn.Module, opts: PromptTuningOptions) -> PromptTuningOptions:
    if llama.input_prompt is not None:
        raise AdapterError("the model already has an input prompt")
    ids = text_token_ids(opts.init_text, opts.tokenizer, opts.init_token_ids, "prompt_tuning init_text")
    llama.input_prompt = StaticPrompt(initial_embeddings(llama.embed_tokens, opts.num_tokens, opts.init, ids))
    return replace(opts, init_token_ids=tuple(ids) if ids is not None else None, tokenizer=None)
