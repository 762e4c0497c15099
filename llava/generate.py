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


# ---- continuous batching -------------------------------------------------------------------------------------------

class DecodeRow:
    """One sequence inside a BatchDecoder: its settings, its new ids so far and, once done, why it ended."""

    def __init__(self, config: GenerationConfig, stop_ids: set[int], stream: TextStream | None, key=None):
        self.config, self.stop_ids, self.stream, self.key = config, stop_ids, stream, key
        self.ids: list[int] = []
        self.finish_reason: str | None = None  # "stop" (stop id or stop string) or "length"
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # [1, V] for the repetition penalty

    def take(self, token: int) -> bool:
        """Record the sampled token; True when the row is finished."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return True
        self.ids.append(token)
        if self.stream is not None:
            keep = self.stream.push(self.ids)
            if keep is not None:
                del self.ids[keep:]
                self.finish_reason = "stop"
                return True
        if len(self.ids) >= self.config.max_new_tokens:
            self.finish_reason = "length"
            return True
        return False


class BatchDecoder:
    """Generation step by step for a set of rows that changes between steps (continuous batching).

    `add()` prefills the prompts that arrived since the last step in one forward pass and merges their KV cache into
    the running batch; `step()` picks one token for every row and runs one forward pass for all of them; finished
    rows (and rows given to `remove()`) leave. Each row keeps its own settings (temperature, top-p, seed, stop
    strings, max tokens), so requests with different settings share forward passes.

    Cache layout: every row is `[virtual tokens][left padding][real tokens]` and all rows share one length; the
    attention mask marks the padding and rotary positions count real tokens only, as in `generate`'s batches, so a
    row gets what it gets alone. While no row is padded no mask is passed at all (a single sequence runs the same
    kernels as in `generate`). The cache is rebuilt only when rows join or leave (one copy of it, about the memory
    traffic of one decode step), and then loses the leading columns that are padding for every remaining row.

    Needs `llava.model.Llama` (its KVCache); single-threaded: one owner calls add/step/remove.
    """

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        model_config = getattr(model, "config", None)
        self.eos_id = getattr(model_config, "eos_id", None)
        self.n_virtual = model.num_virtual_tokens() if hasattr(model, "num_virtual_tokens") else 0
        self.device = next(model.parameters()).device
        self.rows: list[DecodeRow] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, real columns] bool: False on left padding
        self.logits: torch.Tensor | None = None  # [rows, V]: each row's next-token logits

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, inputs_embeds: Sequence[torch.Tensor], configs: Sequence[GenerationConfig],
            on_text: Sequence[Callable[[str], None] | None] | None = None, keys: Sequence | None = None
            ) -> list[DecodeRow]:
        """Prefill prompts (`[T_i, dim]` embeddings each) in one forward pass and join them to the batch.

        Their first tokens come at the next `step()`. `on_text[i]` receives prompt i's text as it becomes final;
        `keys[i]` is kept on its row for the caller.
        """
        n = len(inputs_embeds)
        on_text, keys = on_text or [None] * n, keys or [None] * n
        if not n or not len(configs) == len(on_text) == len(keys) == n:
            raise ValueError(f"BatchDecoder.add: {n} prompts need as many configs ({len(configs)}), on_text "
                             f"({len(on_text)}) and keys ({len(keys)})")
        rows = [self._new_row(e, c, t, k) for e, c, t, k in zip(inputs_embeds, configs, on_text, keys)]
        lengths = [e.shape[0] for e in inputs_embeds]
        longest = max(lengths)
        embeds = inputs_embeds[0].new_zeros(n, longest, inputs_embeds[0].shape[-1], device=self.device)
        mask = torch.zeros(n, longest, dtype=torch.bool, device=self.device)
        for i, e in enumerate(inputs_embeds):  # left padding, as `generate` pads a batch
            embeds[i, longest - e.shape[0]:] = e
            mask[i, longest - e.shape[0]:] = True
        cache = self.model.new_cache(n, longest)
        logits = self.model(inputs_embeds=embeds, attention_mask=None if bool(mask.all()) else mask, cache=cache,
                            last_only=True)[:, -1]
        for row in rows:
            if row.config.repetition_penalty != 1.0:
                row.seen = torch.zeros_like(logits[:1], dtype=torch.bool)
        if not self.rows:
            self.rows, self.cache, self.mask, self.logits = rows, cache, mask, logits
            return rows
        columns = max(self.mask.shape[1], longest)
        merged = self._new_cache(len(self.rows) + n, columns)
        self._copy_rows(merged, 0, self.cache, torch.arange(len(self.rows), device=self.device), self.mask.shape[1],
                        columns)
        self._copy_rows(merged, len(self.rows), cache, torch.arange(n, device=self.device), longest, columns)
        self.mask = torch.cat((_left_pad(self.mask, columns), _left_pad(mask, columns)))
        self.rows, self.cache, self.logits = self.rows + rows, merged, torch.cat((self.logits, logits))
        return rows

    def _new_row(self, inputs_embeds: torch.Tensor, config: GenerationConfig, on_text, key) -> DecodeRow:
        if inputs_embeds.ndim != 2 or inputs_embeds.shape[0] == 0:
            raise ValueError(f"BatchDecoder.add: each prompt must be [tokens > 0, dim], got "
                             f"{tuple(inputs_embeds.shape)}")
        if config.max_new_tokens < 1:
            raise ValueError(f"BatchDecoder.add: max_new_tokens={config.max_new_tokens} must be >= 1")
        if (config.stop_strings or on_text is not None) and self.tokenizer is None:
            raise ValueError("BatchDecoder: stop_strings and on_text need a tokenizer to turn ids into text")
        stop_ids = set(config.stop_token_ids) if config.stop_token_ids else ({self.eos_id} - {None})
        stream = None
        if self.tokenizer is not None and (on_text is not None or config.stop_strings):
            stream = TextStream(self.tokenizer.decode, config.stop_strings, on_text)
        row = DecodeRow(config, stop_ids, stream, key)
        if config.seed is not None and config.temperature > 0:
            row.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        return row

    @torch.no_grad()
    def step(self) -> list[DecodeRow]:
        """One token for every row; return the rows that finished (they have left the batch)."""
        if not self.rows:
            return []
        chosen = self.logits.argmax(dim=-1)  # greedy rows without a penalty: one call for all of them
        for i, row in enumerate(self.rows):
            c = row.config
            if c.temperature > 0 or c.repetition_penalty != 1.0:
                chosen[i] = next_tokens(self.logits[i:i + 1], c, row.seen, row.generator)[0]
        finished = []
        for row, token in zip(self.rows, chosen.tolist()):
            if row.seen is not None:
                row.seen[0, token] = True
            if row.take(token):
                finished.append(row)
                if row.stream is not None:
                    row.stream.finish(row.ids)
        if finished:
            keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
            chosen = chosen[keep]
            self._keep(keep)
        if not self.rows:
            return finished
        if self.cache.length == self.cache.max_len:
            self._grow()
        self.mask = torch.cat((self.mask, self.mask.new_ones(len(self.rows), 1)), dim=1)
        mask = None if bool(self.mask.all()) else self.mask
        self.logits = self.model(chosen[:, None], attention_mask=mask, cache=self.cache, last_only=True)[:, -1]
        return finished

    def remove(self, rows: Sequence[DecodeRow]) -> None:
        """Drop rows before they finish (their requester went away); their text streams get nothing more."""
        gone = {id(row) for row in rows}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) != len(self.rows):
            self._keep(keep)

    # ---- cache bookkeeping -------------------------------------------------------------------------------------
    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows at positions `keep`, dropping the leading columns that are padding for all of them."""
        if not keep:
            self.rows, self.cache, self.mask, self.logits = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        columns = mask.shape[1] - int(mask.any(dim=0).long().argmax())  # first column some row uses
        cache = self._new_cache(len(keep), columns, room=self.cache.max_len - self.cache.length)
        self._copy_rows(cache, 0, self.cache, index, self.mask.shape[1], columns)
        self.rows = [self.rows[i] for i in keep]
        self.cache, self.mask, self.logits = cache, mask[:, -columns:], self.logits[index]

    def _grow(self) -> None:
        columns = self.mask.shape[1]
        cache = self._new_cache(len(self.rows), columns, room=max(64, columns))
        self._copy_rows(cache, 0, self.cache, torch.arange(len(self.rows), device=self.device), columns, columns)
        self.cache = cache

    def _new_cache(self, rows: int, columns: int, room: int = 64):
        """A cache holding `columns` real columns (plus virtual tokens), with space for `room` more."""
        cache = self.model.new_cache(rows, columns + room)
        cache.length = self.n_virtual + columns
        return cache

    def _copy_rows(self, dst, dst_start: int, src, src_index: torch.Tensor, src_columns: int,
                   dst_columns: int) -> None:
        """Copy rows of `src` into `dst` from row `dst_start` on: virtual tokens in front, the last
        min(src_columns, dst_columns) real columns right-aligned."""
        nv, n = self.n_virtual, min(src_columns, dst_columns)
        rows = slice(dst_start, dst_start + len(src_index))
        every_row = len(src_index) == src.keys[0].shape[0] and bool((src_index == torch.arange(
            len(src_index), device=src_index.device)).all())  # then copy straight from src, without a gather
        for buffers_dst, buffers_src in ((dst.keys, src.keys), (dst.values, src.values)):
            for d, s in zip(buffers_dst, buffers_src):
                s = s if every_row else s[src_index]
                d[rows, :, :nv] = s[:, :, :nv]
                d[rows, :, nv + dst_columns - n:nv + dst_columns] = s[:, :, nv + src_columns - n:nv + src_columns]


def _left_pad(mask: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.cat((mask.new_zeros(mask.shape[0], columns - mask.shape[1]), mask), dim=1)
