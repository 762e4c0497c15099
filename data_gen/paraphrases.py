"""Short-answer questions asked in other words: the same fact (category, subject, answer), another template.

Two template sets use this, kept apart on purpose:
- `CORPUS_TEMPLATES` (here) add phrasings to the tiny LLM's pretraining text (data_gen.corpus), so that the LLM
  learns to read a question rather than match one wording;
- `data_gen/prompts/eval_paraphrases.json` is written only for evaluation: its wordings appear in no training text
  (neither data_gen.vqa's templates nor the corpus's; tests/stages/test_bases_recipe.py checks it), so a score on them
  cannot come from memorised wording.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

from data_gen.prompting import stable_rng
from data_gen.records import read_captions
from data_gen.vqa import CATEGORIES, SHORT_ANSWER_SUFFIX, QuestionDealer, ShortQuestion
from data_gen.world import Vocabulary, plural, with_article
from llava.io import atomic_write_text

EVAL_PARAPHRASES_FILE = Path(__file__).parent / "prompts" / "eval_paraphrases.json"
# One slot per kind: {ref} (the object referred to), {things} (plural noun phrase), {thing} (with its article).
KINDS = ("color", "shape", "count", "exist", "horizontal", "vertical")

CORPUS_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("Which colour does the {ref} have?", "The {ref} is what color?", "Name the color of the {ref}.",
              "What color does the {ref} have?"),
    "shape": ("What is the {ref}?", "Name the shape of the {ref}.", "The {ref} is which shape?",
              "What shape does the {ref} have?"),
    "count": ("Count the {things}.", "How many {things} does the image show?", "Number of {things}?",
              "How many {things} are visible?"),
    "exist": ("Is {thing} present?", "Do you see {thing}?", "Is {thing} shown?", "Does the picture have {thing}?"),
    "horizontal": ("Left, center or right: where is the {ref}?", "Is the {ref} left, center or right?",
                   "On which side is the {ref}: left, center or right?"),
    "vertical": ("Top, middle or bottom: where is the {ref}?", "Is the {ref} top, middle or bottom?",
                 "How high is the {ref}: top, middle or bottom?"),
}


def kind_and_slots(question: ShortQuestion) -> tuple[str, dict[str, str]]:
    """The template kind of a question and the values of its slots, read back from its fact."""
    category, subject = question.fact
    if category == "position":
        ref, axis = subject.rsplit(" ", 1)
        return ("horizontal" if axis == "horizontally" else "vertical"), {"ref": ref}
    if category == "count":
        return "count", {"things": plural(subject)}
    if category == "exist":
        return "exist", {"thing": with_article(subject)}
    return category, {"ref": subject}


def rephrase(question: ShortQuestion, templates: dict[str, tuple[str, ...] | list[str]],
             rng: random.Random) -> ShortQuestion:
    kind, slots = kind_and_slots(question)
    return ShortQuestion(question.category, rng.choice(templates[kind]).format(**slots), question.answer,
                         question.subject)


def check_paraphrase_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"short-answer paraphrase fraction must be a number between 0 and 1, got {fraction!r}")
    return float(fraction)


def training_rewording(fraction: float) -> Callable[[ShortQuestion, random.Random], ShortQuestion] | None:
    """The `reword` of data_gen.vqa.short_answer_turns that asks `fraction` of the questions in a CORPUS_TEMPLATES
    wording (as a GPT writer varies its wording; the evaluation-only paraphrases stay unseen); None for 0."""
    if not check_paraphrase_fraction(fraction):
        return None

    def reword(question: ShortQuestion, rng: random.Random) -> ShortQuestion:
        return rephrase(question, CORPUS_TEMPLATES, rng) if rng.random() < fraction else question
    return reword


def eval_templates(path: str | os.PathLike = EVAL_PARAPHRASES_FILE) -> dict[str, list[str]]:
    """The evaluation-only paraphrases: {kind: [templates]}, checked (every kind, its one slot)."""
    templates = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [k for k in KINDS if not templates.get(k)]
    if missing:
        raise ValueError(f"{path}: no templates for {', '.join(missing)}; every kind of {KINDS} needs some")
    slot = {"color": "{ref}", "shape": "{ref}", "count": "{things}", "exist": "{thing}", "horizontal": "{ref}",
            "vertical": "{ref}"}
    for kind, texts in templates.items():
        for text in texts:
            if text.count(slot[kind]) != 1:
                raise ValueError(f"{path}: {kind}: template {text!r} must contain {slot[kind]} exactly once")
    return templates


def make_paraphrase_file(captions_jsonl: str | os.PathLike, out_jsonl: str | os.PathLike, seed: int = 0,
                         per_image: int = 3, templates_file: str | os.PathLike = EVAL_PARAPHRASES_FILE) -> dict:
    """An eval question file like data_gen.vqa.make_question_file's (categories round-robin, exist answers
    alternating), every question worded by the evaluation-only paraphrases. Returns counts per category."""
    templates = eval_templates(templates_file)
    records, _ = read_captions(captions_jsonl)
    vocabulary = Vocabulary.from_boxes(b for r in records for b in r.boxes)
    lines, counts = [], {c: 0 for c in CATEGORIES}
    dealer = QuestionDealer(vocabulary)
    for record in records:
        rng = stable_rng(seed, record.id, "paraphrase-file")
        for k, (category, question) in enumerate(dealer.deal(record, rng, per_image)):
            counts[category] += 1
            question = rephrase(question, templates, rng)
            lines.append(json.dumps({"question_id": f"{record.id}_p{k}", "image": record.image,
                                     "text": question.question + SHORT_ANSWER_SUFFIX, "category": category,
                                     "answer": question.answer}))
    atomic_write_text(out_jsonl, "".join(line + "\n" for line in lines))
    return {"images": len(records), "questions": len(lines), **counts}
