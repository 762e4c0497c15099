"""LLaVA-Bench-style judging of free-form answers: a judge scores a reference answer and the model's answer 1–10 each,
and the report is the model's mean score relative to the reference's (per category, as LLaVA-Bench prints it).

Two judges share one interface, `score(context, question, reference, answer) -> Review`:
- `OpenAIJudge`: a GPT model through the `openai` client (any OpenAI-compatible server via `base_url`), given the image
  context (captions), the question and both answers, asked for the two scores on its first line, as LLaVA-Bench does.
- `OfflineJudge`: a deterministic word-overlap scorer for tests and quick regressions without a key or network:
  token F1 of the model answer against the reference, mapped to 1 + 9·F1 (the reference scores 10 against itself).
  It measures shared words, not meaning; it is a cheap proxy, not a substitute for a GPT judge.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_INSTRUCTION = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "displayed above. The user asks the question on observing an image. For your reference, the visual content in the "
    "image is represented with a few sentences describing the image.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an "
    "overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment."
)


class JudgeError(RuntimeError):
    """The judge cannot run (no key, no model); the message says what to set."""


@dataclass(frozen=True)
class Review:
    reference_score: float | None  # None when the judge's reply could not be read
    answer_score: float | None
    content: str


class Judge(Protocol):
    name: str

    def score(self, context: str, question: str, reference: str, answer: str) -> Review: ...


def judge_prompt(context: str, question: str, reference: str, answer: str) -> str:
    """The user message LLaVA-Bench sends: context, question, Assistant 1 = reference, Assistant 2 = model."""
    return (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n"
            f"[System]\n{JUDGE_INSTRUCTION}\n\n")


_SCORE_PAIR = re.compile(r"^\s*\(?\s*(\d+(?:\.\d+)?)\s*[,\s]\s*(\d+(?:\.\d+)?)\s*\)?\s*$")


def parse_score_pair(reply: str) -> tuple[float, float] | None:
    """The two scores on the first line of a judge reply ("8 6", "8, 6", "(8, 6)"), or None if it is not that."""
    lines = reply.strip().splitlines()
    match = _SCORE_PAIR.match(lines[0]) if lines else None
    if match is None:
        return None
    first, second = float(match.group(1)), float(match.group(2))
    if not (0 <= first <= 10 and 0 <= second <= 10):
        return None
    return first, second


class OpenAIJudge:
    """GPT judge through the openai client; the key comes from OPENAI_API_KEY (never from a file or a flag)."""

    def __init__(self, model: str, base_url: str | None = None, temperature: float = 0.2, max_tokens: int = 512,
                 max_retries: int = 5, timeout: float = 120.0):
        import openai

        api_key = os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise JudgeError("the openai judge needs a key: export OPENAI_API_KEY=... (for a local OpenAI-compatible "
                               "server any non-empty value works), or use --judge offline")
        self.name = f"openai:{model}"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout)

    def score(self, context: str, question: str, reference: str, answer: str) -> Review:
        response = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": JUDGE_SYSTEM},
                      {"role": "user", "content": judge_prompt(context, question, reference, answer)}],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        content = response.choices[0].message.content or ""
        pair = parse_score_pair(content)
        return Review(pair[0] if pair else None, pair[1] if pair else None, content)


def _tokens(text: str) -> list[str]:
    from llava.evaluation import normalize_answer

    return normalize_answer(text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 on normalised words (case, punctuation, articles and number words folded)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class OfflineJudge:
    """Deterministic word-overlap judge: answer score 1 + 9·F1(answer, reference); the reference scores 10."""

    name = "offline:token-f1"

    def score(self, context: str, question: str, reference: str, answer: str) -> Review:
        f1 = token_f1(answer, reference)
        answer_score = round(1 + 9 * f1, 2)
        return Review(10.0, answer_score, f"10 {answer_score}\nOffline judge: token F1 {f1:.3f} against the reference.")


def review_all(judge: Judge, items: list[dict], workers: int = 4,
               on_done: Callable[[int, Review], None] | None = None) -> list[Review]:
    """Score `items` (dicts with context, question, reference, answer) in order, `workers` requests at a time."""
    def one(item: dict) -> Review:
        return judge.score(item["context"], item["question"], item["reference"], item["answer"])

    reviews: list[Review] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, review in enumerate(pool.map(one, items)):
            reviews.append(review)
            if on_done is not None:
                on_done(index, review)
    return reviews


def relative_scores(rows: Iterable[tuple[str, Review]]) -> dict[str, dict]:
    """Per category and "all": mean reference score, mean model score (both ×10 of 1–10, as LLaVA-Bench prints), the
    relative score 100·model/reference, and how many reviews could not be read (left out of the means)."""
    groups: dict[str, list[Review]] = {}
    for category, review in rows:
        groups.setdefault(category, []).append(review)
        groups.setdefault("all", []).append(review)
    table = {}
    for category in sorted(groups, key=lambda c: (c == "all", c)):
        reviews = groups[category]
        good = [r for r in reviews if r.reference_score is not None and r.answer_score is not None]
        ref_mean = sum(r.reference_score for r in good) / len(good) if good else 0.0
        ans_mean = sum(r.answer_score for r in good) / len(good) if good else 0.0
        table[category] = {
            "count": len(reviews),
            "unreadable": len(reviews) - len(good),
            "reference": round(ref_mean * 10, 1),
            "answer": round(ans_mean * 10, 1),
            "relative": round(100 * ans_mean / ref_mean, 1) if ref_mean > 0 else 0.0,
        }
    return table


def format_relative_table(table: dict[str, dict], judge_name: str) -> str:
    lines = [f"judge {judge_name}: relative score = 100 × mean(model score) / mean(reference score)",
             f"{'category':<20} {'n':>5} {'relative':>9} {'reference':>10} {'model':>7} {'unreadable':>11}"]
    for category, row in table.items():
        lines.append(f"{category:<20} {row['count']:>5} {row['relative']:>9.1f} {row['reference']:>10.1f} "
                     f"{row['answer']:>7.1f} {row['unreadable']:>11}")
    return "\n".join(lines)
