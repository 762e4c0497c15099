"""`llava-pipeline eval`: answer a LLaVA question file with batched greedy generation, write LLaVA's answer file, and
score it when the questions carry reference answers.

Question lines: `{"question_id", "image", "text", "category"?, "answer"?}` (`answer` a string or a list of accepted
strings). Answer lines: `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}`, the format of
LLaVA's `model_vqa`, so its downstream scripts read our files and ours read theirs.

Scoring is exact match after normalisation (case, punctuation, articles, number words to digits). The chance baseline
of a category is 1 / (number of distinct reference answers in that category): the accuracy of a guesser that knows
the answer set but not the image. `--judge openai|offline` adds LLaVA-Bench-style relative scores (pipeline.judge).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from llava.io import atomic_write_json, atomic_write_text

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


def _read_jsonl(path: Path, kind: str) -> Iterable[tuple[str, dict]]:
    if not path.is_file():
        raise QuestionFileError(f"{kind} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuestionFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
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
    for where, obj in _read_jsonl(path, "question"):
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
    for where, obj in _read_jsonl(Path(path), "answers"):
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
        from pipeline.loading import LoadedModel

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


# ---- judging -----------------------------------------------------------------------------------------------------

def _read_context_file(path: str | Path) -> dict[str, str]:
    """LLaVA-Bench's context.jsonl: {"image", "caption"} per line (caption a string or a list of sentences)."""
    contexts = {}
    for where, obj in _read_jsonl(Path(path), "context"):
        image, caption = obj.get("image"), obj.get("caption")
        if not isinstance(image, str) or not isinstance(caption, (str, list)):
            raise QuestionFileError(f"{where}: a context line needs 'image' (string) and 'caption' (string or list)")
        contexts[image] = caption if isinstance(caption, str) else "\n".join(map(str, caption))
    return contexts


def judge_answers(judge, questions: Sequence[Question], answers: dict[str, dict], *,
                  references: dict[str, dict] | None = None, contexts: dict[str, str] | None = None,
                  reviews_file: str | Path | None = None, workers: int = 4) -> dict[str, dict]:
    """Review every answered question that has a reference answer; write the reviews; return the relative table."""
    from pipeline.judge import relative_scores, review_all

    items, keep = [], []
    for q in questions:
        key = str(q.question_id)
        reference = references[key]["text"] if references and key in references else q.answer
        if key not in answers or reference is None:
            continue
        if not isinstance(reference, str):
            reference = reference[0]
        context = (contexts or {}).get(q.image or "", q.context or "")
        items.append({"context": context, "question": q.text, "reference": reference,
                      "answer": answers[key]["text"]})
        keep.append(q)
    if not items:
        raise QuestionFileError("nothing to judge: no answered question has a reference answer (an 'answer' key in "
                                "the question file, or --reference-answers FILE)")
    reviews = review_all(judge, items, workers=workers)
    if reviews_file is not None:
        write_jsonl(reviews_file, [
            {"question_id": q.question_id, "category": q.category or UNCATEGORISED, "judge": judge.name,
             "content": r.content, "tuple": [r.reference_score, r.answer_score]}
            for q, r in zip(keep, reviews)])
    return relative_scores((q.category or UNCATEGORISED, r) for q, r in zip(keep, reviews))


def make_judge(name: str, model: str | None, base_url: str | None):
    from pipeline.judge import JudgeError, OfflineJudge, OpenAIJudge

    if name == "offline":
        return OfflineJudge()
    if not model:
        raise JudgeError("--judge openai needs --judge-model (the GPT model that reviews, e.g. gpt-4o-mini)")
    return OpenAIJudge(model=model, base_url=base_url)


# ---- command line ------------------------------------------------------------------------------------------------

def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + suffix)


def hallucination_scores(args, questions: Sequence[Question], answers: dict[str, dict]) -> dict:
    """POPE (--pope) and CHAIR (--chair-captions) of the answers, printed and returned for the scores file."""
    from data_gen import hallucination as h
    from data_gen.records import read_captions

    result: dict = {}
    texts = {str(q.question_id): answers[str(q.question_id)]["text"] for q in questions}
    if args.pope:
        labels = {qid: label for qid, label in h.read_pope_labels(args.question_file).items() if qid in texts}
        result["pope"] = scores = h.pope_scores(labels, texts)
        print("POPE        accuracy   precision  recall     F1         yes-ratio  questions")
        for split, s in scores.items():
            print(f"{split:<11} {s['accuracy']:<10.4f} {s['precision']:<10.4f} {s['recall']:<10.4f} {s['f1']:<10.4f} "
                  f"{s['yes_ratio']:<10.4f} {s.get('n', '')}")
    if args.chair_captions:
        vocabulary = h.ChairVocabulary.named(args.chair_vocabulary)
        objects = h.image_objects(read_captions(args.chair_captions)[0], vocabulary)
        described = [(q.image, texts[str(q.question_id)]) for q in questions]
        result["chair"] = scores = h.chair_scores(described, objects, vocabulary)
        print(f"CHAIR ({vocabulary.name}): CHAIR-i {scores['chair_i']:.4f} ± {scores['chair_i_se']:.4f} "
              f"({scores['hallucinated_mentions']}/{scores['mentions']} mentions), CHAIR-s {scores['chair_s']:.4f} "
              f"± {scores['chair_s_se']:.4f} ({scores['descriptions']} descriptions)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-pipeline eval",
        description="Answer a LLaVA question file (batched, greedy by default), write the answer file, and score it: "
                    "exact match per category when questions carry an 'answer', LLaVA-Bench relative scores with "
                    "--judge. Without --model, the existing --answers-file is scored.",
        epilog="Reads: the model directory (--model), the question file and its images (--image-folder). Writes: the "
               "answer file (--answers-file, JSONL, atomically) and the scores JSON beside it (--scores-file); with "
               "--judge, the reviews (--reviews-file).")
    parser.add_argument("--model", "--model-path", dest="model", help="trained model dir (full, adapter, merged, or a "
                        "LLaVA-1.5 HF dir)")
    parser.add_argument("--model-base", help="base model dir for an adapter dir that does not record its base")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--image-folder", help="folder the questions' image paths are relative to")
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--conv-mode", help="template name (default: the one saved with the model)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    parser.add_argument("--limit", type=int, help="answer only the first N questions")
    parser.add_argument("--model-id", help="model_id written to each answer line (default: the model dir's name)")
    parser.add_argument("--scores-file", help="where to write the scores JSON (default: next to the answers file)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--judge", choices=["none", "openai", "offline"], default="none",
                        help="LLaVA-Bench-style review of each answer against a reference answer")
    parser.add_argument("--judge-model", help="the GPT model that judges (with --judge openai)")
    parser.add_argument("--judge-base-url", help="OpenAI-compatible endpoint (default: the openai client's)")
    parser.add_argument("--judge-workers", type=int, default=4)
    parser.add_argument("--reference-answers", help="answer file with the reference answers (e.g. LLaVA-Bench's "
                        "answers_gpt4.jsonl); default: the questions' 'answer' key")
    parser.add_argument("--context", help="LLaVA-Bench context.jsonl ({image, caption}) for the judge")
    parser.add_argument("--reviews-file", help="where to write the judge's reviews (default: next to the answers)")
    hallucination = parser.add_argument_group("object hallucination (data_gen.hallucination)")
    hallucination.add_argument("--pope", action="store_true", help="the question file is POPE's ({question_id, image, "
                               "text, label}): accuracy, precision, recall, F1 and yes-ratio per split")
    hallucination.add_argument("--chair-captions", help="captions JSONL with the evaluated images' boxes: CHAIR-i and "
                               "CHAIR-s of the answers (ask open descriptions)")
    hallucination.add_argument("--chair-vocabulary", default="coco", help="scene | coco | a synonyms file "
                               "('category, synonym, ...' per line, CHAIR's synonyms.txt format); default coco")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be >= 1")

    from data_gen.hallucination import HallucinationError
    from data_gen.records import InputError
    from pipeline.judge import JudgeError

    answers_file = Path(args.answers_file)
    try:
        questions = read_questions(args.question_file)[:args.limit]
        if args.model:
            from pipeline.loading import load_model

            loaded = load_model(args.model, base=args.model_base, device=args.device, dtype=args.dtype)
            print(f"model {loaded.model_id} ({loaded.source}); template {args.conv_mode or loaded.template}; "
                  f"{len(questions)} questions", file=sys.stderr)
            started = time.perf_counter()
            rows, scores = evaluate_model(
                loaded, args.question_file, args.image_folder, answers_file, limit=args.limit,
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, template_name=args.conv_mode, model_id=args.model_id, progress=True)
            print(f"wrote {len(rows)} answers to {answers_file} in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
            answers = {str(row["question_id"]): row for row in rows}
        else:
            answers = read_answers(answers_file)
            scores = None
            if any(q.answer is not None for q in questions):
                scores = score_answers(questions, {k: v["text"] for k, v in answers.items()})
        result: dict = {"question_file": str(args.question_file), "answers_file": str(answers_file)}
        if scores is not None:
            print(format_score_table(scores))
            result["exact_match"] = scores
        result.update(hallucination_scores(args, questions, answers))
        if args.judge != "none":
            judge = make_judge(args.judge, args.judge_model, args.judge_base_url)
            references = read_answers(args.reference_answers) if args.reference_answers else None
            contexts = _read_context_file(args.context) if args.context else None
            reviews_file = Path(args.reviews_file) if args.reviews_file else _sibling(answers_file, ".reviews.jsonl")
            from pipeline.judge import format_relative_table

            table = judge_answers(judge, questions, answers, references=references, contexts=contexts,
                                  reviews_file=reviews_file, workers=args.judge_workers)
            print(format_relative_table(table, judge.name))
            result["judge"] = {"name": judge.name, "reviews_file": str(reviews_file), "scores": table}
        if len(result) > 2:
            scores_file = Path(args.scores_file) if args.scores_file else _sibling(answers_file, ".scores.json")
            atomic_write_json(scores_file, result)
    except (QuestionFileError, JudgeError, HallucinationError, InputError) as e:
        print(f"llava-pipeline eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
