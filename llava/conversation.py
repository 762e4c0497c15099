"""Conversation templates (`plain`, `vicuna_v1`, `llava_v1`, `llama_2`) and tokenization with exact label masks.

Renders equal LLaVA's reference strings byte for byte (its `Conversation.get_prompt` and the training-time
`preprocess_plain`), including LLaVA's `<image>` normalisation: a turn's single `<image>` tag is moved to the front as
`"<image>\\n" + text`.

A template turns a conversation into *segments*: pieces of the rendered string that are either all trained on
(assistant answers and their `</s>`) or all masked (system, user turns, role prefixes). The rendered string is the
concatenation of the segments' text, and the token ids are the concatenation of each segment's tokens, so the label
mask comes from the very tokens the model sees. The reference instead re-tokenizes pieces of the prompt to find
lengths, and masks the whole sample ("tokenization mismatch") when they disagree; that cannot happen here.

Tokenizing segment by segment follows LLaVA's `tokenizer_image_token`, which encodes the text between `<image>` tags
one chunk at a time: every chunk starts a new word (SentencePiece's dummy prefix "▁"), as after a special token in
the LLaMA tokenizer. The space that separates an answer from its role prefix ("ASSISTANT: answer") is that "▁", so
the answer's first token is "▁answer" as in the reference, and a generation prompt ends in "ASSISTANT:".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX

HUMAN, GPT = "human", "gpt"


class ConversationError(ValueError):
    """A conversation cannot be rendered (wrong roles, empty turns, no answer); the message names the sample."""


class Segment(NamedTuple):
    text: str  # exactly as it appears in the rendered string
    supervised: bool  # trained on: assistant answers and their end of sequence
    special: str | None = None  # "bos" or "eos": one control token; `text` is how the render spells it


def _where(sample_id) -> str:
    return "conversation" if sample_id is None else f"sample {sample_id!r}"


def check_turns(conversations, sample_id=None, *, need_answer: bool = False, generation: bool = False) -> None:
    """Raise ConversationError unless turns alternate human, gpt, human, ... with non-empty string values."""
    where = _where(sample_id)
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ConversationError(f"{where}: 'conversations' must be a non-empty list of turns, got {conversations!r}")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"{where}: turn {i} must be an object with 'from' and 'value', got {turn!r}")
        expected = HUMAN if i % 2 == 0 else GPT
        if turn["from"] not in (HUMAN, GPT):
            raise ConversationError(f"{where}: turn {i} has from={turn['from']!r}; valid roles are 'human' and 'gpt'")
        if turn["from"] != expected:
            raise ConversationError(f"{where}: turn {i} is from {turn['from']!r} but {expected!r} was expected "
                                    "(turns must alternate human, gpt, human, ... starting with human)")
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            raise ConversationError(f"{where}: turn {i} ({turn['from']}) has an empty or non-string value")
    last = conversations[-1]["from"]
    if generation and last != HUMAN:
        raise ConversationError(f"{where}: a generation prompt needs the conversation to end with a human turn")
    if need_answer and last != GPT:
        raise ConversationError(f"{where}: the last turn is a human turn with no answer (every question needs a "
                                "gpt turn after it)" if len(conversations) > 1 else
                                f"{where}: no assistant (gpt) turn to train on")


def normalize_image_tags(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA's `preprocess_multimodal`: a turn holding one `<image>` becomes `"<image>\\n" + rest.strip()`.

    Turns with several tags (interleaved multi-image samples, which LLaVA-1.5 does not have) keep them in place.
    """
    out = []
    for turn in conversations:
        value = turn["value"]
        if value.count(DEFAULT_IMAGE_TOKEN) == 1:
            value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
        out.append({**turn, "value": value})
    return out


@dataclass(frozen=True)
class Template:
    name: str
    style: str  # "plain", "two" (vicuna/llava v1: sep " " after user turns, "</s>" after answers) or "llama_2"
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")

    def render(self, conversations: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The prompt string exactly as LLaVA renders it (answers end in "</s>" for v1 / llama_2 templates)."""
        return "".join(s.text for s in self.segments(conversations, add_generation_prompt))

    def segments(self, conversations: Sequence[dict], add_generation_prompt: bool = False, *,
                 sample_id=None, need_answer: bool = False) -> list[Segment]:
        check_turns(conversations, sample_id, need_answer=need_answer, generation=add_generation_prompt)
        turns = normalize_image_tags(conversations)
        if self.style == "plain":
            return self._plain(turns, sample_id)
        if self.style == "two":
            return self._two(turns, add_generation_prompt)
        return self._llama_2(turns)

    def _plain(self, turns: list[dict], sample_id) -> list[Segment]:
        # preprocess_plain: the user turn is replaced by its image tag(s); the caption plus "\n" is the answer.
        if len(turns) > 2:
            raise ConversationError(f"{_where(sample_id)}: the plain template takes one (image, caption) pair, "
                                    f"got {len(turns)} turns")
        n_images = turns[0]["value"].count(DEFAULT_IMAGE_TOKEN)
        if n_images == 0:
            raise ConversationError(f"{_where(sample_id)}: the plain template needs an <image> in the first turn")
        segments = [Segment("", False, "bos"), Segment(DEFAULT_IMAGE_TOKEN * n_images, False)]
        if len(turns) == 2:
            segments.append(Segment(turns[1]["value"] + "\n", True))
        return segments

    def _two(self, turns: list[dict], add_generation_prompt: bool) -> list[Segment]:
        user, assistant = self.roles
        segments = [Segment("", False, "bos")]
        prompt = self.system + " "
        for turn in turns:
            if turn["from"] == HUMAN:
                prompt += f"{user}: {turn['value']} "
            else:
                segments.append(Segment(prompt + f"{assistant}:", False))
                segments.append(Segment(" " + turn["value"], True))
                segments.append(Segment("</s>", True, "eos"))
                prompt = ""
        if add_generation_prompt:
            prompt += f"{assistant}:"
        if prompt:
            segments.append(Segment(prompt, False))
        return segments

    def _llama_2(self, turns: list[dict]) -> list[Segment]:
        segments = [Segment("", False, "bos")]  # the reference strips the leading "<s>" from the string
        for i, turn in enumerate(turns):
            if turn["from"] == HUMAN:
                message = turn["value"]
                if i == 0:
                    message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{message}"
                else:
                    segments.append(Segment("<s>", False, "bos"))
                segments.append(Segment(f"[INST] {message} [/INST]", False))
            else:
                segments.append(Segment(f" {turn['value']} ", True))
                segments.append(Segment("</s>", True, "eos"))
        return segments


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                         "content that the user provides, and assist the user with a variety of tasks using natural "
                         "language.")

TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain"),
    "vicuna_v1": Template("vicuna_v1", "two", _VICUNA_SYSTEM),
    "llava_v1": Template("llava_v1", "two", _LLAVA_SYSTEM),
    "llama_2": Template("llama_2", "llama_2", _LLAVA_LLAMA_2_SYSTEM),
}


def get_template(name: str | Template) -> Template:
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; valid templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# ---- tokenization --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _has_dummy_prefix(model_file: str) -> bool:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model_file).encode("x", out_type=str)[0].startswith("▁")


def _text_chunks(text: str, drop_leading_space: bool) -> list[str | None]:
    """Split a segment at `<image>` tags: text chunks to encode, None where an image placeholder goes."""
    out: list[str | None] = []
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i:
            out.append(None)
        if drop_leading_space and chunk.startswith(" "):
            chunk = chunk[1:]  # the dummy prefix "▁" already stands for it
        if chunk:
            out.append(chunk)
    return out


def _segment_ids(segment: Segment, tokenizer, drop_leading_space: bool, encoded: dict[str, list[int]]) -> list[int]:
    if segment.special == "bos":
        return [tokenizer.bos_id]
    if segment.special == "eos":
        return [tokenizer.eos_id]
    ids: list[int] = []
    for chunk in _text_chunks(segment.text, drop_leading_space):
        if chunk is None:
            ids.append(IMAGE_TOKEN_INDEX)
        else:
            ids += encoded[chunk]
    return ids


def tokenize_conversation(conversations: Sequence[dict], tokenizer, template: str | Template,
                          max_len: int | None = None, *, sample_id=None,
                          add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids (with IMAGE_TOKEN_INDEX per `<image>`) and labels (IGNORE_INDEX where not trained on).

    For training (the default) the conversation must end with an answer; with `add_generation_prompt` it must end
    with a question, which gets the assistant's role prefix (masked, like every prompt token). `max_len` cuts both
    lists (the model cuts again after the image splice, where each placeholder becomes many positions).
    """
    template = get_template(template)
    segments = template.segments(conversations, add_generation_prompt, sample_id=sample_id,
                                 need_answer=not add_generation_prompt)
    drop = _has_dummy_prefix(str(tokenizer.model_file))
    texts = {c for s in segments if s.special is None for c in _text_chunks(s.text, drop) if c is not None}
    encoded = {t: tokenizer.encode(t) for t in texts}
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        ids = _segment_ids(segment, tokenizer, drop, encoded)
        input_ids += ids
        labels += [IGNORE_INDEX if (not segment.supervised or t == IMAGE_TOKEN_INDEX) else t for t in ids]
    if max_len is not None:
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    return input_ids, labels


def length_profile(segments: Sequence[Segment]) -> tuple[int, int]:
    """(control + image placeholder tokens, characters of text): what a cheap token-count estimate needs."""
    fixed = chars = 0
    for segment in segments:
        if segment.special is not None:
            fixed += 1
        else:
            n_images = segment.text.count(DEFAULT_IMAGE_TOKEN)
            fixed += n_images
            chars += len(segment.text) - n_images * len(DEFAULT_IMAGE_TOKEN)
    return fixed, chars


def token_lengths(samples: Sequence[Sequence[dict]], tokenizer, template: str | Template,
                  num_threads: int = 0) -> list[int]:
    """Token counts of many conversations (image placeholders count 1) in one batched SentencePiece call.

    Used to group samples by length without tokenizing them one by one; equals len(tokenize_conversation(...)[0]).
    """
    template = get_template(template)
    drop = _has_dummy_prefix(str(tokenizer.model_file))
    per_sample: list[tuple[int, list[str]]] = []
    for conversations in samples:
        fixed, texts = 0, []
        for segment in template.segments(conversations, need_answer=True):
            if segment.special is not None:
                fixed += 1
                continue
            for chunk in _text_chunks(segment.text, drop):
                if chunk is None:
                    fixed += 1
                else:
                    texts.append(chunk)
        per_sample.append((fixed, texts))
    flat = [t for _, texts in per_sample for t in texts]
    counts = iter(len(ids) for ids in tokenizer.sp.encode(flat, num_threads=num_threads or None)) if flat else iter(())
    return [fixed + sum(next(counts) for _ in texts) for fixed, texts in per_sample]
