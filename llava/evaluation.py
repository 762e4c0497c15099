"""Evaluation on LLaVA question files: read and check them, answer them with a loaded model (batched greedy
generation), write LLaVA's answer files and score exact match per category. The training loop's held-out eval
(`make_eval_callback`) and `llava-pipeline eval` (pipeline/evaluate.py) both use it.

Question lines: `{"question_id", "image", "text", "category"?, "answer"?}` (`answer` a string or a list of accepted
strings). Answer lines: `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}`, the format of
LLaVA's `model_vqa`, so its downstream scripts read our files and ours read theirs.

Scoring is exact match after normalisation (case, punctuation, articles, number words to digits). The chance baseline
of a category is 1 / (number of distinct reference answers in that category): the accuracy of a guesser that knows
the answer set but not the image.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from llava.io import atomic_write_text, jsonl_lines, parse_json_line

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
UNCATEGORISED = "default"


class QuestionFileError(ValueError):
    """A question/answer line is wrong; the message names file:line and the key."""


# ---- normalisation and exact match -------------------------------------------------------------------------------

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
}
_NOT_DECIMAL_POINT = re.compile(r"(?<!\d)\.|\.(?!\d)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PUNCTUATION = re.compile(r"[^\w\s.]")


def normalize_answer(text: str) -> str:
    """Fold what does not change a short answer's meaning: "The Three." and "3" both become "3".

    Lower-case; apostrophes dropped ("it's" -> "its"); other punctuation to spaces (a decimal point between digits and
    a thousands comma are kept as numbers); articles removed; number words zero..twenty to digits; spaces collapsed.
    """
    text = text.lower().replace("\u2019", "'").replace("'", "")
    text = _THOUSANDS_COMMA.sub("", text)
    text = _NOT_DECIMAL_POINT.sub(" ", text)
    text = _PUNCTUATION.sub(" ", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def accepted_answers(reference: str | Sequence[str]) -> frozenset[str]:
    references = [reference] if isinstance(reference, str) else list(reference)
    return frozenset(normalize_answer(r) for r in references)


def exact_match(prediction: str, reference: str | Sequence[str]) -> bool:
    """True when the normalised prediction equals the normalised reference (or any one of a list of them)."""
    return normalize_answer(prediction) in accepted_answers(reference)


# ---- question and answer files -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    question_id: str | int
    text: str
    image: str | None = None
    category: str | None = None
    answer: str | tuple[str, ...] | None = None
    context: str | None = None  # captions of the image, for a GPT judge (LLaVA-Bench's context.jsonl)


def read_jsonl_objects(path: Path, kind: str) -> Iterable[tuple[str, dict]]:
    if not path.is_file():
        raise QuestionFileError(f"{kind} file not found: {path}")
    for where, line in jsonl_lines(path):
        obj = parse_json_line(line, where, QuestionFileError)
        if not isinstance(obj, dict):
            raise QuestionFileError(f"{where}: a line must be a JSON object")
        yield where, obj


def _question_id(obj: dict, where: str) -> str | int:
    qid = obj.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid).strip() == "":
        raise QuestionFileError(f"{where}: key 'question_id' must be a non-empty string or an integer, got {qid!r}")
    return qid


def read_questions(path: str | Path) -> list[Question]:
    """Read and check a LLaVA question file; every error names file:line and the key."""
    path = Path(path)
    questions: list[Question] = []
    seen: dict[str, str] = {}
    for where, obj in read_jsonl_objects(path, "question"):
        qid = _question_id(obj, where)
        if str(qid) in seen:
            raise QuestionFileError(f"{where}: question_id {qid!r} repeats {seen[str(qid)]}; ids must be unique")
        seen[str(qid)] = where
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise QuestionFileError(f"{where}: key 'text' must be the question as a non-empty string, got {text!r}")
        image = obj.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            raise QuestionFileError(f"{where}: key 'image' must be a path relative to --image-folder, got {image!r}")
        category = obj.get("category")
        if category is not None and not isinstance(category, str):
            raise QuestionFileError(f"{where}: key 'category' must be a string, got {category!r}")
        answer = obj.get("answer")
        if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
            answer = tuple(answer)
        elif answer is not None and not isinstance(answer, str):
            raise QuestionFileError(f"{where}: key 'answer' must be a string or a non-empty list of strings (the "
                                    f"accepted reference answers), got {answer!r}")
        context = obj.get("context", obj.get("caption"))
        if isinstance(context, list):
            context = "\n".join(str(c) for c in context)
        questions.append(Question(qid, text, image, category, answer, context if isinstance(context, str) else None))
    if not questions:
        raise QuestionFileError(f"{path}: no questions (expected JSON lines with question_id, image, text)")
    return questions


def read_answers(path: str | Path) -> dict[str, dict]:
    """An answer file as {str(question_id): line}."""
    answers = {}
    for where, obj in read_jsonl_objects(Path(path), "answers"):
        qid = _question_id(obj, where)
        if not isinstance(obj.get("text"), str):
            raise QuestionFileError(f"{where}: key 'text' (the model's answer) must be a string")
        answers[str(qid)] = obj
    return answers


def answer_id(model_id: str, question_id: str | int, prompt: str, text: str) -> str:
    """A stable id (LLaVA uses a random one): the same model, question and answer give the same file twice."""
    digest = hashlib.sha256(f"{model_id}\0{question_id}\0{prompt}\0{text}".encode()).hexdigest()
    return digest[:22]


def answer_line(question: Question, prompt: str, text: str, model_id: str) -> dict:
    return {"question_id": question.question_id, "prompt": prompt, "text": text,
            "answer_id": answer_id(model_id, question.question_id, prompt, text), "model_id": model_id,
            "metadata": {}}


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---- scoring -----------------------------------------------------------------------------------------------------

def score_answers(questions: Sequence[Question], predictions: dict[str, str]) -> dict:
    """Exact-match accuracy and chance baseline per category and overall, over the questions with a reference.

    Returns {"categories": {name: {count, correct, accuracy, chance}}, "overall": {...}, "missing": n}; `missing`
    counts referenced questions without a prediction (they count as wrong).
    """
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        if q.answer is not None:
            by_category.setdefault(q.category or UNCATEGORISED, []).append(q)
    categories = {}
    total = correct_total = missing = 0
    chance_mass = 0.0
    for name in sorted(by_category):
        group = by_category[name]
        distinct = {accepted_answers(q.answer) for q in group}
        chance = 1.0 / len(distinct)
        correct = 0
        for q in group:
            prediction = predictions.get(str(q.question_id))
            if prediction is None:
                missing += 1
            elif exact_match(prediction, q.answer):
                correct += 1
        categories[name] = {"count": len(group), "correct": correct, "accuracy": correct / len(group),
                            "chance": chance}
        total += len(group)
        correct_total += correct
        chance_mass += chance * len(group)
    overall = {"count": total, "correct": correct_total, "accuracy": correct_total / total if total else 0.0,
               "chance": chance_mass / total if total else 0.0}
    return {"categories": categories, "overall": overall, "missing": missing}


def format_score_table(scores: dict) -> str:
    lines = ["exact match after normalisation; chance = 1 / distinct reference answers in the category",
             f"{'category':<22} {'n':>5} {'correct':>8} {'accuracy':>9} {'chance':>7}"]
    rows = list(scores["categories"].items()) + [("overall", scores["overall"])]
    for name, row in rows:
        lines.append(f"{name:<22} {row['count']:>5} {row['correct']:>8} {100 * row['accuracy']:>8.1f}% "
                     f"{100 * row['chance']:>6.1f}%")
    if scores.get("missing"):
        lines.append(f"({scores['missing']} referenced questions had no answer and count as wrong)")
    return "\n".join(lines)


# ---- answering with a model --------------------------------------------------------------------------------------

def question_turns(question: Question) -> list[dict]:
    """The question as a one-turn conversation; the image tag goes first, as LLaVA's model_vqa puts it."""
    from llava.constants import DEFAULT_IMAGE_TOKEN

    value = f"{DEFAULT_IMAGE_TOKEN}\n{question.text}" if question.image else question.text
    return [{"from": "human", "value": value}]


def answer_questions(loaded, questions: Sequence[Question], image_folder: str | Path | None, *,
                     batch_size: int = 8, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                     template_name: str | None = None,
                     on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    """Answers to `questions` in order, `batch_size` prompts per left-padded generate call (greedy by default)."""
    from llava.generate import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop_token_ids=loaded.stop_token_ids, stop_strings=loaded.stop_strings(template_name))
    texts: list[str] = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        images = [loaded.open_image(_image_path(image_folder, q)) if q.image else None for q in batch]
        texts += loaded.generate_texts([question_turns(q) for q in batch], images, config, template=template_name)
        if on_batch is not None:
            on_batch(len(texts), len(questions))
    return texts


def _image_path(image_folder: str | Path | None, question: Question) -> Path:
    """The question's image; with an image folder, a path that stays inside it (as training data paths do)."""
    path = Path(question.image)
    if image_folder is not None:
        from llava.data.instruct import check_image_path

        where = f"question {question.question_id!r}"
        try:
            check_image_path(question.image, where)
        except ValueError as e:
            raise QuestionFileError(str(e)) from None
        root = Path(image_folder).resolve()
        path = (root / path).resolve()
        if not path.is_relative_to(root):
            raise QuestionFileError(f"{where}: image path {question.image!r} resolves to {path}, outside the "
                                    f"image folder {root}")
    if not path.is_file():
        hint = "" if image_folder else " (pass --image-folder, the folder the question file's image paths start from)"
        raise QuestionFileError(f"question {question.question_id!r}: image not found: {path}{hint}")
    return path


def evaluate_model(loaded, question_file: str | Path, image_folder: str | Path | None, answers_file: str | Path | None,
                   *, limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, template_name: str | None = None,
                   model_id: str | None = None, progress: bool = False) -> tuple[list[dict], dict | None]:
    """Answer a question file (its first `limit` questions), write the answer file atomically, and score it."""
    questions = read_questions(question_file)[:limit]
    started = time.perf_counter()

    def report(done: int, total: int) -> None:
        if progress:
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"\r  answered {done}/{total} ({rate:.1f} questions/s)", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    texts = answer_questions(loaded, questions, image_folder, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, template_name=template_name, on_batch=report)
    model_id = model_id or loaded.model_id
    rows = [answer_line(q, q.text, text, model_id) for q, text in zip(questions, texts)]
    if answers_file is not None:
        write_jsonl(answers_file, rows)
    scores = None
    if any(q.answer is not None for q in questions):
        scores = score_answers(questions, {str(q.question_id): t for q, t in zip(questions, texts)})
    return rows, scores


def make_eval_callback(question_file: str | Path, image_folder: str | Path | None, every: int,
                       limit: int | None = None, *, batch_size: int = 16, max_new_tokens: int = 32,
                       tokenizer=None, template: str | None = None) -> Callable[..., dict]:
    """A held-out evaluation for the training loop: `callback(model, step)` answers the first `limit` questions of
    `question_file` greedily and returns {"accuracy", "chance", <category>: accuracy, ...} (the trainer logs them as
    `eval/<key>` with the training metrics).

    `every` is the schedule, exposed as `callback.every` for the trainer's `eval_every`; the callback itself measures
    whenever it is called (the trainer also calls it after the last step). Tokenizer and template default to the
    model's own. The model is put in eval mode for the measurement and its mode restored afterwards.
    """
    if every <= 0:
        raise ValueError(f"make_eval_callback: every={every} must be a positive number of steps")
    questions = [q for q in read_questions(question_file) if q.answer is not None][:limit]
    if not questions:
        raise QuestionFileError(f"{question_file}: no question has an 'answer'; a periodic eval needs references")

    def callback(model, step: int) -> dict:
        from llava.loading import LoadedModel

        loaded = LoadedModel(model=model, tokenizer=tokenizer or model.load_tokenizer(),
                             template=template or model.config.template, model_id=f"step-{step}")
        was_training = model.training
        model.eval()
        try:
            texts = answer_questions(loaded, questions, image_folder, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens)
        finally:
            model.train(was_training)
        scores = score_answers(questions, {str(q.question_id): t for q, t in zip(questions, texts)})
        metrics = {"accuracy": scores["overall"]["accuracy"], "chance": scores["overall"]["chance"]}
        metrics.update({name: row["accuracy"] for name, row in scores["categories"].items()})
        return metrics

    callback.every = every
    return callback
