"""Preference pairs against hallucination: a prompt about an image, a grounded answer (chosen) and one that carries a
controlled hallucination (rejected), for DPO (stages/prefer.py).

Record format (a JSON list, or JSONL), LLaVA rows plus two strings:

    {"id": "scene_000007_pref_description0", "image": "scene_000007.png",
     "conversations": [{"from": "human", "value": "<image>\\nDescribe the image in detail."}],
     "chosen": "The image shows two shapes ...", "rejected": "The image shows three shapes ...",
     "kind": "object"}

`conversations` are the prompt turns and end with a human turn; `kind` (optional) tags the hallucination in the
rejected answer: object | colour | count | position (| omission: the rejected answer denies a present object).
`read_pairs` also takes the TRL-style layout `{"prompt", "chosen", "rejected", "image" | "images"}`, where prompt is a
string or a list of `{"role", "content"}` messages and chosen/rejected are strings or one assistant message.

Backends (both resumable through data_gen.driver's cache: rerun the same command after a kill):
- offline: the chosen answer is written from the boxes by the offline generator; the rejected one is the same
  generator's answer for a perturbed copy of the boxes — an object replaced by one that is not there, recoloured,
  duplicated or moved. Replacement objects and colours are drawn from the data set's co-occurrence statistics
  (data_gen.hallucination.KindStats), as POPE's adversarial negatives are. Short-answer pairs ask the training set's own questions (data_gen.vqa) with a
  wrong answer of the same kind.
- openai: the GPT model gets captions + boxes and a hallucination kind, and replies with a JSON object
  `{"question", "chosen", "rejected"}`: a faithful answer and a subtly unfaithful one.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from data_gen import world
from data_gen.driver import CacheError, GenerationCache, Outcome, _run, leak_reason
from data_gen.hallucination import KindStats, record_kinds
from data_gen.offline import OfflineBackend
from data_gen.openai_backend import ItemFailed, OpenAIBackend, OpenAIConfig
from data_gen.prompting import InvalidReply, format_context, pick_detail_question, stable_rng
from data_gen.records import Box, CaptionRecord, read_captions
from data_gen.vqa import SHORT_ANSWER_SUFFIX, ask
from data_gen.world import Vocabulary, with_article
from llava.io import atomic_write_json, atomic_write_text

PAIR_TYPES = ("description", "short")
KINDS = ("object", "colour", "count", "position")
IMAGE_TAG = "<image>"


class PairError(ValueError):
    """A preference record is wrong; the message names the file, the entry and the key."""


# ---- reading both layouts ----------------------------------------------------------------------------------------

def _text_of(value, where: str, key: str) -> str:
    """A string, or the text of one message / list of content parts (TRL's conversational layout)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")
    if isinstance(value, list):
        value = "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(value, str) or not value.strip():
        raise PairError(f"{where}: key {key!r} must be a non-empty string (or one message with text content), "
                        f"got {value!r}")
    return value.strip()


def _prompt_turns(prompt, has_image: bool, where: str) -> list[dict]:
    """TRL's prompt (a string or a list of {role, content} messages) as LLaVA turns, image tag first."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = prompt
    else:
        raise PairError(f"{where}: key 'prompt' must be a string or a list of {{role, content}} messages")
    roles = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}
    turns = []
    for i, message in enumerate(messages):
        if message.get("role") == "system":
            continue
        if message.get("role") not in roles:
            raise PairError(f"{where}: prompt[{i}].role must be user or assistant, got {message.get('role')!r}")
        turns.append({"from": roles[message["role"]], "value": _text_of(message.get("content"), where,
                                                                        f"prompt[{i}].content")})
    if not turns or turns[-1]["from"] != "human":
        raise PairError(f"{where}: the prompt must end with a user turn (the answers follow it)")
    if has_image and not any(IMAGE_TAG in t["value"] for t in turns):
        turns[0]["value"] = f"{IMAGE_TAG}\n{turns[0]['value']}"
    return turns


def normalise_pair(entry, where: str) -> dict:
    """One record in our layout (see the module docstring), from ours or TRL's; raises PairError."""
    if not isinstance(entry, dict):
        raise PairError(f"{where}: expected an object with chosen and rejected, got {type(entry).__name__}")
    image = entry.get("image")
    if image is None and isinstance(entry.get("images"), list):
        if len(entry["images"]) != 1:
            raise PairError(f"{where}: key 'images' must hold exactly one image path, got {entry['images']!r}")
        image = entry["images"][0]
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise PairError(f"{where}: key 'image' must be a path relative to the image folder, got {image!r}")
    if "conversations" in entry:
        turns = entry["conversations"]
        if (not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns)
                or turns[-1].get("from") != "human"):
            raise PairError(f"{where}: key 'conversations' must be the prompt turns, ending with a human turn")
    elif "prompt" in entry:
        turns = _prompt_turns(entry["prompt"], image is not None, where)
    else:
        raise PairError(f"{where}: missing 'conversations' (LLaVA layout) or 'prompt' (TRL layout)")
    chosen, rejected = _text_of(entry.get("chosen"), where, "chosen"), _text_of(entry.get("rejected"), where,
                                                                                "rejected")
    if chosen == rejected:
        raise PairError(f"{where}: chosen and rejected are the same text; a pair must differ")
    pair = {"id": str(entry.get("id", where.rsplit(" ", 1)[-1])), "conversations": turns, "chosen": chosen,
            "rejected": rejected}
    if image is not None:
        pair["image"] = image
    if entry.get("kind") is not None:
        pair["kind"] = str(entry["kind"])
    return pair


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """Preference records from a JSON list or a JSONL file, in either layout, checked entry by entry."""
    path = Path(path)
    if not path.is_file():
        raise PairError(f"preference data not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            entries = [(f"{path}: entry {i}", e) for i, e in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise PairError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    else:
        entries = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append((f"{path}:{line_no}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PairError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    pairs = [normalise_pair(entry, where) for where, entry in entries]
    if not pairs:
        raise PairError(f"{path}: no preference records")
    return pairs


# ---- offline pairs ------------------------------------------------------------------------------------------------

CELLS = [(c, r) for r in range(3) for c in range(3)]  # ninths of the image, as world's position phrases name them


def _free_cell(boxes: list[Box], rng: random.Random) -> tuple[float, float] | None:
    """The centre of a ninth no box covers, so a duplicated or moved object never overlaps a real one."""
    def covered(cx, cy):
        return any(b.bbox[0] - 0.1 < cx < b.bbox[2] + 0.1 and b.bbox[1] - 0.1 < cy < b.bbox[3] + 0.1 for b in boxes)

    free = [((c + 0.5) / 3, (r + 0.5) / 3) for c, r in CELLS if not covered((c + 0.5) / 3, (r + 0.5) / 3)]
    return rng.choice(free) if free else None


def _box_at(label: str, centre: tuple[float, float], side: float) -> Box:
    half = side / 2
    return Box(label, (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half))


def perturb(record: CaptionRecord, kind: str, stats: KindStats, rng: random.Random) -> list[Box] | None:
    """The record's boxes with one hallucination of `kind`, or None when this image offers none."""
    boxes = list(record.boxes)
    objects = world.read_objects(boxes)
    if kind == "object":  # replaced, not added: the rejected answer is as long as the chosen one, so length is
        new = stats.draw_absent(record_kinds(record), rng, record.captions)  # no shortcut to a DPO margin
        if new is None or not boxes:
            return None
        i = rng.randrange(len(boxes))
        size = world.parse_scene_label(boxes[i].label)[0]
        label = f"{size} {new}" if size and world.parse_scene_label(new)[2] else new
        return boxes[:i] + [replace(boxes[i], label=label)] + boxes[i + 1:]  # a crowd stays a crowd
    if kind == "count":
        centre = _free_cell(boxes, rng)
        if not boxes or centre is None:
            return None
        source = rng.choice(boxes)
        return boxes + [_box_at(source.label, centre, min(source.bbox[2] - source.bbox[0], 0.3))]
    if kind == "colour":
        options = [i for i, o in enumerate(objects) if o.colour]
        if not options:
            return None
        i = rng.choice(options)
        size, colour, shape = world.parse_scene_label(boxes[i].label)
        present = record_kinds(record)
        absent = [c for c in world.SCENE_COLOURS
                  if f"{c} {shape}" not in present and not world.mentions(record.captions, f"{c} {shape}")]
        if not absent:
            return None
        weights = [stats.cooccurrence(f"{c} {shape}", present) + 1 for c in absent]
        recoloured = " ".join(w for w in (size, rng.choices(absent, weights=weights)[0], shape) if w)
        return boxes[:i] + [replace(boxes[i], label=recoloured)] + boxes[i + 1:]
    if kind == "position":  # a crowd region has no position to move
        single = [i for i, box in enumerate(boxes) if not box.crowd]
        if not single:
            return None
        i = rng.choice(single)
        others = boxes[:i] + boxes[i + 1:]
        centre = _free_cell(others, rng)
        moved = _box_at(boxes[i].label, centre, min(boxes[i].bbox[2] - boxes[i].bbox[0], 0.3)) if centre else None
        if moved is None or world.read_object(moved).location == world.read_object(boxes[i]).location:
            return None
        return others[:i] + [moved] + others[i:]
    raise ValueError(f"unknown hallucination kind {kind!r}; kinds: {', '.join(KINDS)}")


def _description(boxes: list[Box], record: CaptionRecord, vocabulary: Vocabulary) -> str:
    """The offline generator's detailed description of the image as if these were its boxes."""
    turns = OfflineBackend(vocabulary).generate(CaptionRecord(record.id, record.image, record.captions, tuple(boxes)),
                                                "detail")
    return turns[0]["answer"]


def _pair(record: CaptionRecord, name: str, question: str, chosen: str, rejected: str, kind: str) -> dict:
    return {"id": f"{record.id}_pref_{name}", "image": record.image,
            "conversations": [{"from": "human", "value": f"{IMAGE_TAG}\n{question}"}], "chosen": chosen,
            "rejected": rejected, "kind": kind}


def description_pair(record: CaptionRecord, stats: KindStats, vocabulary: Vocabulary, seed: int, k: int
                     ) -> dict | None:
    """A detailed description against the description of the image with one hallucination added."""
    rng = stable_rng(seed, record.id, "pref-description", k)
    chosen = _description(list(record.boxes), record, vocabulary)
    for kind in rng.sample(KINDS, len(KINDS)):
        boxes = perturb(record, kind, stats, rng)
        if boxes is not None:
            rejected = _description(boxes, record, vocabulary)
            if rejected != chosen:
                return _pair(record, f"description{k}", pick_detail_question(seed + k, record.id), chosen, rejected,
                             kind)
    return None


def short_pair(record: CaptionRecord, stats: KindStats, vocabulary: Vocabulary, seed: int, k: int) -> dict | None:
    """One of the training set's short-answer questions with a wrong answer of the same kind: an absent object said
    to be there, a present one denied, a wrong colour, count or position."""
    rng = stable_rng(seed, record.id, "pref-short", k)
    present = record_kinds(record)
    for category in rng.sample(("exist", "color", "count", "position"), 4):
        if category == "exist":
            if rng.random() < 0.5:
                absent = stats.draw_absent(present, rng, record.captions)
                if absent is None:
                    continue
                question = f"Is there {with_article(absent)} in the image?"
                return _pair(record, f"short{k}", question + SHORT_ANSWER_SUFFIX, "No", "Yes", "object")
            if not present:
                continue
            question = f"Is there {with_article(rng.choice(present))} in the image?"
            return _pair(record, f"short{k}", question + SHORT_ANSWER_SUFFIX, "Yes", "No", "omission")
        asked = ask(category, record, vocabulary, rng)
        if asked is None:
            continue
        if category == "color":
            wrong = [c for c in world.SCENE_COLOURS if c != asked.answer]
            kind = "colour"
        elif category == "count":
            wrong = [str(int(asked.answer) + 1)] + ([str(int(asked.answer) - 1)] if int(asked.answer) > 0 else [])
            kind = "count"
        else:
            words = world.COLUMNS if asked.answer in world.COLUMNS else world.ROWS
            wrong = [w for w in words if w != asked.answer]
            kind = "position"
        return _pair(record, f"short{k}", asked.text, asked.answer, rng.choice(wrong), kind)
    return None


MAKERS = {"description": description_pair, "short": short_pair}


class OfflinePairs:
    source = "offline-pairs"

    def __init__(self, records: list[CaptionRecord], seed: int = 0):
        self.stats = KindStats.from_records(records)
        self.vocabulary = Vocabulary.from_boxes(b for r in records for b in r.boxes)
        self.seed = seed

    def generate(self, record: CaptionRecord, item: str) -> list[dict]:
        pair_type, k = item.split(":")[1], int(item.split(":")[2])
        pair = MAKERS[pair_type](record, self.stats, self.vocabulary, self.seed, k)
        return [pair] if pair is not None else []


# ---- GPT pairs ---------------------------------------------------------------------------------------------------

PAIR_SYSTEM = """You write training data that teaches a visual assistant not to hallucinate. You are given the \
captions and object boxes of one image (label: [x1, y1, x2, y2], coordinates normalised 0-1; you cannot see the \
image itself). Write one question a user might ask about the image, then two answers written as if looking at the \
image: "chosen" is faithful (only what the captions and boxes support), "rejected" reads just as fluently but \
contains exactly one {kind} hallucination: {what}. Never mention captions, boxes or coordinates. Reply with only \
the JSON object {{"question": "...", "chosen": "...", "rejected": "..."}}."""
KIND_WHAT = {
    "object": "an object that is not in the image, one that often appears with the objects that are",
    "colour": "a wrong colour for an object that is in the image",
    "count": "a wrong number of some kind of object",
    "position": "a wrong position or spatial relation for an object that is in the image",
}


def parse_pair_reply(text: str | None) -> dict:
    if not text or not text.strip():
        raise InvalidReply("the reply was empty")
    body = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise InvalidReply(f"the reply is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(obj, dict):
        raise InvalidReply('the reply must be a JSON object {"question", "chosen", "rejected"}')
    for key in ("question", "chosen", "rejected"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise InvalidReply(f'"{key}" must be a non-empty string')
    if obj["chosen"].strip() == obj["rejected"].strip():
        raise InvalidReply('"chosen" and "rejected" are identical; the rejected answer must contain the '
                           "hallucination")
    return {k: obj[k].strip() for k in ("question", "chosen", "rejected")}


class GptPairs(OpenAIBackend):
    """The instruction-data backend (same retries, rate limit, key handling), asked for a pair instead of turns."""

    def __init__(self, config: OpenAIConfig, seed: int = 0):
        super().__init__(config, seed)
        self.source = f"openai-pairs:{config.model}"

    def generate(self, record: CaptionRecord, item: str) -> list[dict]:
        offset = stable_rng(self.seed, record.id, "pref-kind").randrange(len(KINDS))  # kinds spread over images
        kind = KINDS[(int(item.rsplit(":", 1)[1]) + offset) % len(KINDS)]
        messages = [{"role": "system", "content": PAIR_SYSTEM.format(kind=kind, what=KIND_WHAT[kind])},
                    {"role": "user", "content": format_context(record.captions, record.boxes)}]
        reason = ""
        for attempt in range(self.config.max_reasks + 1):
            if attempt:
                self.usage.add(reasks=1)
            content, finish_reason = self._complete(messages)
            try:
                if finish_reason == "length":
                    raise InvalidReply(f"the reply was cut off at {self.config.max_tokens} tokens")
                reply = parse_pair_reply(content)
            except InvalidReply as e:
                reason = str(e)
                messages = messages + [{"role": "assistant", "content": (content or "")[:4000]},
                                       {"role": "user", "content": f"That reply is not usable: {reason}. Reply "
                                        'again with only the JSON object {"question", "chosen", "rejected"}.'}]
                continue
            return [_pair(record, item.replace(":", "_"), reply["question"], reply["chosen"], reply["rejected"],
                          kind)]
        raise ItemFailed(self.redact(f"invalid reply after {self.config.max_reasks + 1} asks: {reason}"))


# ---- the resumable driver ------------------------------------------------------------------------------------------

def pair_items(types: dict[str, int] | Iterable[str], backend: str) -> list[str]:
    """Cache keys per image: "pairs:description:0", ...; the openai backend asks one pair per count, its kind
    rotating over KINDS ("pairs:gpt:k")."""
    counts = dict(types) if isinstance(types, dict) else {t: 1 for t in types}
    unknown = [t for t in counts if t not in PAIR_TYPES]
    if unknown:
        raise ValueError(f"unknown preference pair type(s) {unknown}; types: {', '.join(PAIR_TYPES)}")
    if backend == "openai":
        return [f"pairs:gpt:{k}" for k in range(sum(counts.values()))]
    return [f"pairs:{t}:{k}" for t, n in counts.items() for k in range(int(n))]


def generate_pairs(input_path: str | os.PathLike, out_path: str | os.PathLike, *, backend: str = "offline",
                   types: dict[str, int] | Iterable[str] = ("description", "short"), seed: int = 0, workers: int = 4,
                   skip_bad: bool = False, limit: int | None = None, progress: bool = True,
                   openai_config: OpenAIConfig | None = None) -> dict:
    """Write preference records for every image of a captions JSONL; resumable like data_gen.driver.generate (the
    cache OUT.cache.jsonl, failures OUT.failures.jsonl and summary OUT.summary.json sit next to the output)."""
    from tqdm import tqdm

    started = time.monotonic()
    out_path = Path(out_path)
    stem = out_path.with_suffix("")
    records, bad_lines = read_captions(input_path, skip_bad=skip_bad)
    records = records[:limit] if limit is not None else records
    if backend == "openai":
        maker = GptPairs(openai_config or OpenAIConfig(), seed=seed)
    elif backend == "offline":
        maker, workers = OfflinePairs(records, seed=seed), 1
    else:
        raise ValueError(f"unknown backend {backend!r}: choose openai or offline")
    items = [(r, item) for r in records for item in pair_items(types, backend)]

    def work(record: CaptionRecord, item: str) -> Outcome:
        try:
            return Outcome(record, item, turns=maker.generate(record, item))
        except ItemFailed as e:
            return Outcome(record, item, reason=str(e))

    failures = []
    with GenerationCache(Path(f"{stem}.cache.jsonl")) as cache:
        stale = [k for k, e in cache.entries.items() if e["source"] != maker.source]
        if stale:
            raise CacheError(f"{cache.path} holds pairs made by {cache.entries[stale[0]]['source']!r}, but this run "
                             f"uses {maker.source!r}; use another --pairs-out or delete the cache")
        todo = [(r, i) for r, i in items if (r.id, i) not in cache.entries]
        bar = tqdm(total=len(todo), desc=f"pairs ({backend})", unit="item", file=sys.stderr, disable=not progress)
        try:
            for outcome in _run(todo, work, workers):
                if outcome.turns is None:
                    failures.append({"id": outcome.record.id, "type": outcome.response_type,
                                     "reason": outcome.reason})
                else:
                    cache.append(outcome.record.id, outcome.response_type, maker.source, outcome.turns)
                bar.update(1)
        finally:
            bar.close()
        finished = dict(cache.entries)

    pairs, by_kind, filtered = [], {}, 0
    for record, item in items:
        for pair in finished.get((record.id, item), {}).get("turns", []):
            if leak_reason([{"question": pair["chosen"], "answer": pair["rejected"]}]):
                filtered += 1
                continue
            pairs.append(pair)
            by_kind[pair.get("kind", "?")] = by_kind.get(pair.get("kind", "?"), 0) + 1
    atomic_write_json(out_path, pairs)
    atomic_write_text(f"{stem}.failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
    summary = {"input": str(input_path), "output": str(out_path), "backend": backend, "source": maker.source,
               "records": len(records), "bad_lines_skipped": bad_lines, "items": len(items),
               "already_done": len(items) - len(todo), "failed": len(failures), "filtered": filtered,
               "written": len(pairs), "by_kind": dict(sorted(by_kind.items())),
               "usage": maker.usage_report() if isinstance(maker, GptPairs) else None,
               "elapsed_s": round(time.monotonic() - started, 3)}
    atomic_write_json(f"{stem}.summary.json", summary)
    return summary
