"""Text generation on the KV cache: greedy or sampled (temperature, top-k, top-p), repetition penalty, stop tokens and
stop strings, streaming, and batches of prompts of different lengths (left padding).

Works with `llava.model.Llama` and with any module that has the same `forward(input_ids=None, *, inputs_embeds,
attention_mask, cache, last_only)` and `new_cache(batch_size, max_len)`, such as the multimodal model, which passes
its spliced image+text embeddings as `inputs_embeds`.

The logits processors follow transformers' definitions and order exactly (repetition penalty, then temperature,
top-k, top-p: RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), so
settings mean the same in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the prompt or the answer
    stop_token_ids: tuple[int, ...] = ()  # empty: stop at the model's eos id
    stop_strings: tuple[str, ...] = ()  # needs a tokenizer; the answer ends before the token where one starts
    seed: int | None = None  # fixes sampling; None uses torch's global generator

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        if any(not s for s in self.stop_strings):
            problems.append("stop_strings must not contain an empty string")
        if problems:
            raise ValueError("GenerationConfig: " + "; ".join(problems))


# ---- logits processors (same definitions as transformers) ---------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive logits (multiply negative ones) by `penalty` for tokens marked in the boolean `seen` [B, V].

    Equals transformers' RepetitionPenaltyLogitsProcessor on the ids that set `seen`; a mask instead of an id list
    keeps the per-step cost constant and lets padding stay out of it.
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth_best = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (always at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, V]` fp32 scores after the repetition penalty and, when sampling, temperature, top-k and top-p."""
    logits = logits.float()
    if seen is not None and config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.temperature == 0:
        return logits
    logits = logits / config.temperature
    if config.top_k:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return logits


def next_tokens(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from `[B, V]` logits: the argmax when greedy, else a sample."""
    scores = process_logits(logits, config, seen)
    if config.temperature == 0:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


# ---- streaming text ----------------------------------------------------------------------------------------------

class TextStream:
    """Follows one row's growing ids and releases text only once it is final.

    Text is released a whole token prefix at a time: `decode(ids[:k])` for the longest `k` whose text does not end in
    an unfinished byte sequence (U+FFFD from byte-fallback pieces) and does not reach into a tail that could still
    become a stop string. When a stop string appears, the row keeps the longest token prefix whose text ends before
    it. So the released pieces always concatenate to `decode(final ids)`.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = (),
                 emit: Callable[[str], None] | None = None):
        self.decode, self.stop_strings, self.emit = decode, tuple(stop_strings), emit
        self.longest_stop = max((len(s) for s in self.stop_strings), default=0)
        self.released_tokens = 0
        self.released_text = ""

    def push(self, ids: list[int]) -> int | None:
        """Take the row's ids so far; return how many to keep if a stop string appeared, else None."""
        text = self.decode(ids)
        starts = [i for i in (text.find(s, max(0, len(self.released_text) - self.longest_stop))
                              for s in self.stop_strings) if i >= 0]
        if starts:
            cut = min(starts)
            keep = len(ids)
            while keep > self.released_tokens and not self._fits(self.decode(ids[:keep]), text, cut):
                keep -= 1
            return keep
        limit = self._held_back_from(text)
        for k in range(len(ids), self.released_tokens, -1):
            piece = text if k == len(ids) else self.decode(ids[:k])
            if self._fits(piece, text, limit) and not piece.endswith("\ufffd"):
                self._release(piece, k)
                break
        return None

    def finish(self, ids: list[int]) -> None:
        """Release whatever is left of the final text (unfinished byte sequences included)."""
        self._release(self.decode(ids), len(ids))

    def _held_back_from(self, text: str) -> int:
        """Start of the shortest tail of `text` that is the beginning of a stop string (len(text) if none)."""
        for start in range(max(0, len(text) - self.longest_stop + 1), len(text)):
            tail = text[start:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return start
        return len(text)

    @staticmethod
    def _fits(piece: str, text: str, limit: int) -> bool:
        return len(piece) <= limit and text.startswith(piece)

    def _release(self, piece: str, n_tokens: int) -> None:
        if len(piece) > len(self.released_text) and piece.startswith(self.released_text):
            delta = piece[len(self.released_text):]
            self.released_text, self.released_tokens = piece, n_tokens
            if self.emit is not None:
                self.emit(delta)


# ---- generation ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, prompts: list[list[int]] | None = None, *, inputs_embeds: list[torch.Tensor] | None = None,
             config: GenerationConfig = GenerationConfig(), tokenizer=None,
             on_text: Callable[[int, str], None] | None = None) -> list[list[int]]:
    """Generate up to `config.max_new_tokens` ids after each prompt; return the new ids per prompt.

    Stop tokens are not returned; with a stop string the ids end before the token that starts it. `on_text(i, delta)`
    receives prompt i's text as it becomes final. Prompts of different lengths are left-padded into one batch; rows
    that finish leave the batch, so they stop costing compute.
    """
    if (prompts is None) == (inputs_embeds is None):
        raise ValueError("generate: pass exactly one of prompts (token ids) or inputs_embeds")
    if (config.stop_strings or on_text is not None) and tokenizer is None:
        raise ValueError("generate: stop_strings and on_text need a tokenizer to turn ids into text")
    rows = prompts if prompts is not None else inputs_embeds
    lengths = [len(r) for r in rows]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"generate: prompt {i} is empty (it needs at least one token, e.g. bos)")
    if not rows or config.max_new_tokens == 0:
        return [[] for _ in rows]
    return _generate(model, prompts, inputs_embeds, lengths, config, tokenizer, on_text)


def _generate(model, prompts, inputs_embeds, lengths, config, tokenizer, on_text) -> list[list[int]]:
    model_config = getattr(model, "config", None)
    eos_id, pad_id = getattr(model_config, "eos_id", None), getattr(model_config, "pad_id", None)
    stop_ids = set(config.stop_token_ids) if config.stop_token_ids else ({eos_id} - {None})
    device = next(model.parameters()).device
    batch, longest, max_new = len(lengths), max(lengths), config.max_new_tokens

    if prompts is not None:
        input_ids = torch.full((batch, longest), pad_id or 0, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        first_input = {"input_ids": input_ids.to(device)}
    else:
        embeds = inputs_embeds[0].new_zeros(batch, longest, inputs_embeds[0].shape[-1], device=device)
        for i, e in enumerate(inputs_embeds):
            embeds[i, longest - e.shape[0]:] = e
        first_input = {"inputs_embeds": embeds}
    # Padding needs a mask for the whole run; without padding plain causal attention is exact and cheaper.
    mask = None
    if min(lengths) != longest:
        mask = torch.ones(batch, longest + max_new, dtype=torch.long, device=device)
        for i, n in enumerate(lengths):
            mask[i, :longest - n] = 0

    cache = model.new_cache(batch, longest + max_new)
    logits = model(**first_input, attention_mask=None if mask is None else mask[:, :longest], cache=cache,
                   last_only=True)[:, -1]

    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=device)
        for i, prompt in enumerate(prompts or ()):
            seen[i, torch.tensor(prompt, dtype=torch.long, device=device)] = True
    generator = None
    if config.seed is not None and config.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    streams = None
    if tokenizer is not None and (on_text is not None or config.stop_strings):
        streams = [TextStream(tokenizer.decode, config.stop_strings,
                              None if on_text is None else (lambda delta, i=i: on_text(i, delta)))
                   for i in range(batch)]

    outputs: list[list[int]] = [[] for _ in range(batch)]
    batch_rows = list(range(batch))  # prompt index of each row still in the batch
    alive = [True] * batch
    can_shrink = hasattr(cache, "reorder")
    for step in range(max_new):
        chosen = next_tokens(logits, config, seen, generator)
        for position, token in enumerate(chosen.tolist()):
            row = batch_rows[position]
            if not alive[row]:
                continue
            if token in stop_ids:
                alive[row] = False
                continue
            outputs[row].append(token)
            if streams is not None:
                keep = streams[row].push(outputs[row])
                if keep is not None:
                    del outputs[row][keep:]
                    alive[row] = False
        if step == max_new - 1 or not any(alive):
            break
        if seen is not None:
            seen.scatter_(1, chosen[:, None], True)
        if can_shrink and not all(alive[r] for r in batch_rows):
            keep_positions = [p for p, r in enumerate(batch_rows) if alive[r]]
            index = torch.tensor(keep_positions, device=device)
            batch_rows = [batch_rows[p] for p in keep_positions]
            cache.reorder(index)
            chosen = chosen[index]
            mask = None if mask is None else mask[index]
            seen = None if seen is None else seen[index]
        past = longest + step + 1
        logits = model(chosen[:, None], attention_mask=None if mask is None else mask[:, :past], cache=cache,
                       last_only=True)[:, -1]

    if streams is not None:
        for row, stream in enumerate(streams):
            stream.finish(outputs[row])
    return outputs
