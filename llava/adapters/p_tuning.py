"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): virtual tokens produced by a prompt encoder — an MLP
(Linear, ReLU, Linear, ReLU, Linear) or a bidirectional LSTM followed by an MLP, peft's two encoders — from n learned
input embeddings, so the prompt tokens are trained jointly rather than independently.

Templates (the paper's mixing of continuous prompts with discrete anchor tokens, which peft does not do): pass
`template="[P][P] Look at the picture. [P][P][P] Answer:"` with a `tokenizer` (or the resolved `template_ids`, -1 for
each [P]). Every [P] slot receives one encoder output, the text between slots is embedded with the model's own
(frozen) embedding table, and the interleaved sequence is what gets prepended to the input. Without a template the
n encoder outputs are prepended as they are (peft's behaviour).

At inference the encoder output is computed once and reused (eval mode, no grad, weights unchanged); `fold()` turns
it into a plain tensor and drops the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from llava.adapters.base import Adapter, AdapterError, apply_time_only
from llava.adapters.prompting import StaticPrompt, check_ids, reuse_in_inference, text_token_ids
from llava.adapters.registry import register

SLOT = "[P]"


class PromptEncoder(Adapter):
    def __init__(self, embed_tokens: nn.Embedding, template_ids: list[int], encoder: str, hidden: int,
                 lstm_layers: int, dropout: float):
        super().__init__()
        dim = embed_tokens.embedding_dim
        template = torch.tensor(template_ids)
        n_learned = int((template < 0).sum())
        self.embedding = nn.Parameter(torch.randn(n_learned, dim))  # as peft's nn.Embedding init, N(0, 1)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.lstm_head = None
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))
        self.register_buffer("slot_positions", (template < 0).nonzero().squeeze(1), persistent=False)
        self.register_buffer("anchor_positions", (template >= 0).nonzero().squeeze(1), persistent=False)
        self.register_buffer("anchor_ids", template[template >= 0], persistent=False)
        self.total_tokens = len(template_ids)
        # The model's embedding table, for the anchor tokens; deliberately not registered here (it belongs to the LLM
        # and must not appear twice in state dicts), but called as a module so ZeRO-3 gathers it.
        object.__setattr__(self, "embed_tokens", embed_tokens)

    @property
    def num_tokens(self) -> int:
        return self.total_tokens if self.enabled else 0

    def adapter_params(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.named_parameters())

    def compute(self) -> torch.Tensor:
        """The prompt [total_tokens, dim]: encoder outputs at the [P] slots, anchor-token embeddings elsewhere."""
        hidden = self.embedding[None]
        if self.lstm_head is not None:
            hidden = self.lstm_head(hidden)[0]
        learned = self.mlp_head(hidden)[0]
        if self.anchor_ids.numel() == 0:
            return learned
        anchors = self.embed_tokens(self.anchor_ids).to(learned.dtype)
        prompt = learned.new_zeros(self.total_tokens, learned.shape[1]).index_copy(0, self.slot_positions, learned)
        return prompt.index_copy(0, self.anchor_positions, anchors)

    def forward(self, batch_size: int) -> torch.Tensor:
        sources = [p for p in self.parameters()] + [self.embed_tokens.weight]
        return reuse_in_inference(self, self.compute, sources)[None].expand(batch_size, -1, -1)

    @torch.no_grad()
    def fold(self) -> StaticPrompt:
        return StaticPrompt(self.compute().detach().clone(), trainable=False)


def parse_template(template: str, tokenizer) -> list[int]:
    """"[P][P] text [P]" → [-1, -1, *ids(" text "), -1]."""
    pieces = template.split(SLOT)
    if len(pieces) == 1:
        raise AdapterError(f"p_tuning template {template!r} has no {SLOT} slot")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(-1)
        if piece.strip():
            ids += text_token_ids(piece, tokenizer, None, "p_tuning template")
    return ids


@dataclass
class PTuningOptions:
    num_tokens: int | None = None  # learned [P] tokens; default 20, or the template's slot count
    encoder: str = "mlp"  # "mlp" | "lstm"
    encoder_hidden: int | None = None  # default: the model width (peft's default)
    lstm_layers: int = 2
    dropout: float = 0.0  # between LSTM layers
    template: str | None = None  # "[P]" slots mixed with anchor text; needs `tokenizer`
    template_ids: tuple[int, ...] | None = None  # resolved template: token ids, -1 for each [P] slot (saved)
    tokenizer: object = apply_time_only()
    seed: int | None = 0

    def __post_init__(self):
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"encoder={self.encoder!r} must be 'mlp' or 'lstm'")
        if self.num_tokens is not None and self.num_tokens <= 0:
            raise ValueError(f"num_tokens={self.num_tokens} must be > 0")


@register("p_tuning", PTuningOptions, mergeable=False,
          summary="virtual tokens from an MLP/LSTM prompt encoder, optionally mixed with anchor tokens")
def build_p_tuning(llama: nn.Module, opts: PTuningOptions) -> PTuningOptions:
    if llama.input_prompt is not None:
        raise AdapterError("the model already has an input prompt")
    ids = list(opts.template_ids) if opts.template_ids is not None else \
        parse_template(opts.template, opts.tokenizer) if opts.template is not None else None
    if ids is None:
        ids = [-1] * (opts.num_tokens or 20)
    slots = sum(i < 0 for i in ids)
    if slots == 0:
        raise AdapterError("p_tuning template has no [P] slot")
    if opts.num_tokens is not None and opts.num_tokens != slots:
        raise AdapterError(f"p_tuning num_tokens={opts.num_tokens} but the template has {slots} [P] slots")
    check_ids([i for i in ids if i >= 0], llama.config.vocab_size, "p_tuning template")
    weight = llama.embed_tokens.weight
    encoder = PromptEncoder(llama.embed_tokens, ids, opts.encoder, opts.encoder_hidden or llama.config.dim,
                            opts.lstm_layers, opts.dropout)
    llama.input_prompt = encoder.to(device=weight.device, dtype=weight.dtype)
    return replace(opts, num_tokens=slots, template_ids=tuple(ids), tokenizer=None)
