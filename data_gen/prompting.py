"""Prompts for the GPT backend and the reply contract every backend meets.

The editable text lives in data_gen/prompts/: a shared `context_intro.txt`, then per response type a system message
(`<type>_system.txt`) and hand-written few-shot examples (`<type>_examples.json`: captions, boxes, [question], turns),
and `detail_questions.txt`, the list detail requests are drawn from (the offline backend draws from it too);
`brief_questions.txt` holds LLaVA's brief-description instructions, asked by `caption` samples.
A reply is `{"turns": [{"question": str, "answer": str}, ...]}`: detail and reasoning have exactly one turn,
conversation at least one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from pathlib import Path

from data_gen.records import Box, CaptionRecord

PROMPT_DIR = Path(__file__).parent / "prompts"
GPT_TYPES = ("conversation", "detail", "reasoning")
RULE_TYPES = ("short_answer", "caption")  # made by rules from the record itself, whatever the backend
RESPONSE_TYPES = GPT_TYPES + RULE_TYPES


class InvalidReply(ValueError):
    """A reply that does not meet the contract; the message says what is wrong (it is sent back when re-asking)."""


def stable_rng(*parts: object) -> random.Random:
    """A random generator that depends only on `parts`, not on process, order of work or Python's hash seed."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@functools.lru_cache(maxsize=None)
def system_message(response_type: str) -> str:
    if response_type not in GPT_TYPES:
        raise ValueError(f"no prompt for response type {response_type!r}; GPT types are {', '.join(GPT_TYPES)}")
    intro = (PROMPT_DIR / "context_intro.txt").read_text(encoding="utf-8").strip()
    task = (PROMPT_DIR / f"{response_type}_system.txt").read_text(encoding="utf-8").strip()
    return f"{intro}\n\n{task}"


@functools.lru_cache(maxsize=None)
def few_shot_examples(response_type: str) -> tuple[dict, ...]:
    path = PROMPT_DIR / f"{response_type}_examples.json"
    examples = json.loads(path.read_text(encoding="utf-8"))
    for i, example in enumerate(examples):
        for key in ("captions", "boxes", "turns"):
            if key not in example:
                raise ValueError(f"{path}: example {i} lacks key {key!r}")
        validate_turns(example["turns"], response_type)
    return tuple(examples)


@functools.lru_cache(maxsize=None)
def detail_questions() -> tuple[str, ...]:
    return _prompt_lines("detail_questions.txt")


@functools.lru_cache(maxsize=None)
def brief_questions() -> tuple[str, ...]:
    return _prompt_lines("brief_questions.txt")


def _prompt_lines(name: str) -> tuple[str, ...]:
    lines = (PROMPT_DIR / name).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def pick_detail_question(seed: int, image_id: str) -> str:
    """The detail request for an image: fixed by (seed, id) so a resumed run asks exactly what the first run would."""
    return stable_rng(seed, image_id, "detail-question").choice(detail_questions())


def format_context(captions: list[str] | tuple[str, ...], boxes: list[Box] | tuple[Box, ...],
                   detail_question: str | None = None) -> str:
    """The symbolic view of an image: captions, then `label: [x1, y1, x2, y2]` with 2-decimal coordinates; a crowd
    region reads `person (a crowd of many): [...]`, so the model does not count it as one person."""
    lines = ["Captions:"] + [f"- {c}" for c in captions]
    lines += ["", "Objects (label: [x1, y1, x2, y2]):"]
    lines += [f"{b.label}{' (a crowd of many)' if b.crowd else ''}: [{', '.join(f'{v:.2f}' for v in b.bbox)}]"
              for b in boxes] or ["(none listed)"]
    if detail_question is not None:
        lines += ["", f"Request: {detail_question}"]
    return "\n".join(lines)


def build_messages(record: CaptionRecord, response_type: str, detail_question: str | None = None) -> list[dict]:
    """System message, few-shot examples as user/assistant pairs, then the record's context."""
    messages = [{"role": "system", "content": system_message(response_type)}]
    for example in few_shot_examples(response_type):
        boxes = [Box(b["label"], tuple(b["bbox"])) for b in example["boxes"]]
        messages.append({"role": "user", "content": format_context(example["captions"], boxes,
                                                                   example.get("question"))})
        messages.append({"role": "assistant", "content": json.dumps({"turns": example["turns"]}, ensure_ascii=False)})
    messages.append({"role": "user", "content": format_context(record.captions, record.boxes, detail_question)})
    return messages


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_reply(text: str | None, response_type: str) -> list[dict]:
    """Decode and validate a model reply; raises InvalidReply saying what is wrong.

    A Markdown code fence around the JSON is accepted: endpoints without a JSON mode often add one.
    """
    if not text or not text.strip():
        raise InvalidReply("the reply was empty")
    fenced = _FENCE.match(text)
    try:
        obj = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as e:
        raise InvalidReply(f"the reply is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(obj, dict) or "turns" not in obj:
        raise InvalidReply('the reply must be a JSON object with a "turns" list')
    return validate_turns(obj["turns"], response_type)


def validate_turns(turns: object, response_type: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise InvalidReply('"turns" must be a non-empty list of {"question", "answer"} objects')
    if response_type in ("detail", "reasoning") and len(turns) != 1:
        raise InvalidReply(f'a {response_type} reply must have exactly one turn, got {len(turns)}')
    clean = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidReply(f"turn {i} must be an object with string keys question and answer")
        question, answer = turn.get("question"), turn.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise InvalidReply(f'turn {i}: "question" must be a non-empty string')
        if not isinstance(answer, str) or not answer.strip():
            raise InvalidReply(f'turn {i}: "answer" must be a non-empty string')
        clean.append({"question": question.strip(), "answer": answer.strip()})
    return clean
