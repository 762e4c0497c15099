"""`llava-pipeline eval`: answer a LLaVA question file with batched greedy generation, write LLaVA's answer file, and
score it: exact match per category when questions carry references (llava.evaluation), POPE and CHAIR for object
hallucination (data_gen.hallucination), and LLaVA-Bench-style relative scores with `--judge openai|offline`
(pipeline.judge).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from llava.evaluation import (UNCATEGORISED, Question, QuestionFileError, read_jsonl_objects, evaluate_model,
                              format_score_table, read_answers, read_questions, score_answers, write_jsonl)
from llava.io import atomic_write_json


# ---- judging -----------------------------------------------------------------------------------------------------

def _read_context_file(path: str | Path) -> dict[str, str]:
    """LLaVA-Bench's context.jsonl: {"image", "caption"} per line (caption a string or a list of sentences)."""
    contexts = {}
    for where, obj in read_jsonl_objects(Path(path), "context"):
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
            from llava.loading import load_model

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
