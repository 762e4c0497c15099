"""The resumable generation driver: captions JSONL in, LLaVA instruction JSON out.

Work items are (image id, response type). Every finished item is appended to a JSONL cache with flush + fsync the
moment it finishes, so a rerun — also after kill -9 — skips it: nothing is asked twice and nothing is written twice.
A kill can tear only the last cache line; it is detected, dropped and counted. Failed items are not finished: they go
to the failures file and the next run retries them. The output is rebuilt from the cache in input order (so it does
not depend on which worker finished first) and written atomically, after a post-filter drops replies that leak the
symbolic context (captions, boxes, coordinates).
"""
from __future__ import annotations

import concurrent.futures as cf
import fcntl
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from data_gen.offline import OfflineBackend
from data_gen.openai_backend import ItemFailed, OpenAIBackend, OpenAIConfig
from data_gen.paraphrases import training_rewording
from data_gen.prompting import GPT_TYPES, RESPONSE_TYPES, brief_questions, stable_rng
from data_gen.records import CaptionRecord, read_captions
from data_gen.vqa import check_turns, short_answer_turns
from data_gen.world import Vocabulary
from llava.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_TYPES = GPT_TYPES
RULES_SOURCE = "rules"  # short_answer and caption items are made by rules whatever the backend
IMAGE_TAG = "<image>"

_LEAKS = [
    (re.compile(r"\bcaptions?\b", re.IGNORECASE), "mentions captions"),
    (re.compile(r"\bbounding[- ]box(es)?\b", re.IGNORECASE), "mentions bounding boxes"),
    (re.compile(r"\bcoordinates?\b", re.IGNORECASE), "mentions coordinates"),
    (re.compile(r"\[\s*-?\d*\.\d+\s*,"), "contains a coordinate list like [0.12, 0.4]"),
    (re.compile(r"(?<![\w.])0?\.\d+\s*,"), "contains a coordinate like 0.35,"),
]


class CacheError(RuntimeError):
    """The cache cannot be used as it is; the message says why and what to do."""


def leak_reason(turns: list[dict]) -> str | None:
    """Why a reply gives away that it was written from captions and boxes, or None when it reads as seen."""
    for turn in turns:
        for text in (turn["question"], turn["answer"]):
            for pattern, reason in _LEAKS:
                if pattern.search(text):
                    return reason
    return None


def caption_turns(record: CaptionRecord, seed: int = 0) -> list[dict]:
    """A `caption` sample: one of LLaVA's brief-description instructions answered by one of the record's captions,
    as LLaVA-1.5's instruction mix holds captioning data beside the GPT types (so that "What is in this picture?"
    gets a sentence about the picture). Drawn from a seeded generator of its own."""
    if not record.captions:
        raise ItemFailed(f"{record.id}: no caption to answer a brief description with")
    rng = stable_rng(seed, record.id, "caption")
    return [{"question": rng.choice(brief_questions()), "answer": rng.choice(record.captions)}]


def to_llava(record: CaptionRecord, response_type: str, turns: list[dict]) -> dict:
    """One LLaVA instruction sample; `<image>` appears exactly once, at the start of the first human turn."""
    conversations = []
    for i, turn in enumerate(turns):
        question = turn["question"].replace(IMAGE_TAG, "").strip()
        conversations.append({"from": "human", "value": f"{IMAGE_TAG}\n{question}" if i == 0 else question})
        conversations.append({"from": "gpt", "value": turn["answer"].replace(IMAGE_TAG, "").strip()})
    return {"id": f"{record.id}_{response_type}", "image": record.image, "conversations": conversations}


class GenerationCache:
    """Append-only JSONL of finished items: {"id", "type", "source", "turns"}. One writer at a time (flock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[tuple[str, str], dict] = {}
        self.torn_lines_dropped = 0
        self._file = None

    def __enter__(self) -> "GenerationCache":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise CacheError(f"{self.path} is in use by another generate run; wait for it or use another --cache")
        self._load()
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete, _, tail = data.rpartition(b"\n")
        if tail:  # a line without its newline: the process died while appending it
            self.torn_lines_dropped = 1
            os.truncate(self.path, len(data) - len(tail))
            log.warning("dropped a torn last line from %s (an interrupted run)", self.path)
        for line_no, line in enumerate(complete.split(b"\n") if complete else [], start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                entry = None
            if not (isinstance(entry, dict) and {"id", "type", "source"} <= entry.keys()
                    and isinstance(entry.get("turns"), list)):
                raise CacheError(f"{self.path}:{line_no}: not a cache entry; delete that line (or the whole cache "
                                 "to start over)")
            self.entries.setdefault((entry["id"], entry["type"]), entry)

    def append(self, record_id: str, response_type: str, source: str, turns: list[dict]) -> None:
        entry = {"id": record_id, "type": response_type, "source": source, "turns": turns}
        self._file.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries[(record_id, response_type)] = entry


@dataclass(frozen=True)
class Outcome:
    record: CaptionRecord
    response_type: str
    turns: list[dict] | None = None
    reason: str | None = None  # why it failed


def _run(items: list[tuple[CaptionRecord, str]], work: Callable[[CaptionRecord, str], Outcome],
         workers: int) -> Iterator[Outcome]:
    """Outcomes as they finish; at most 2 × workers items in flight so a huge input does not queue everything."""
    if workers <= 1:
        for record, response_type in items:
            yield work(record, response_type)
        return
    pending: set[cf.Future] = set()
    queue = iter(items)
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate") as pool:
        try:
            while True:
                for record, response_type in queue:
                    pending.add(pool.submit(work, record, response_type))
                    if len(pending) >= 2 * workers:
                        break
                if not pending:
                    return
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def _assemble(items: list[tuple[CaptionRecord, str]],
              finished: dict[tuple[str, str], dict]) -> tuple[list[dict], dict[str, int], dict[str, int], int]:
    """LLaVA samples in input order; returns (samples, samples per type, filtered per leak reason, items with
    nothing to ask)."""
    samples, by_type, filtered, empty = [], {t: 0 for _, t in items}, {}, 0
    for record, response_type in items:
        entry = finished.get((record.id, response_type))
        if entry is None:
            continue
        if not entry["turns"]:
            empty += 1
            continue
        reason = leak_reason(entry["turns"])
        if reason:
            filtered[reason] = filtered.get(reason, 0) + 1
            continue
        samples.append(to_llava(record, response_type, entry["turns"]))
        by_type[response_type] += 1
    return samples, by_type, filtered, empty


def generate(input_path: str | os.PathLike, out_path: str | os.PathLike, *, backend: str = "offline",
             types: Iterable[str] = DEFAULT_TYPES, seed: int = 0, workers: int = 4,
             cache_path: str | os.PathLike | None = None, failures_path: str | os.PathLike | None = None,
             summary_path: str | os.PathLike | None = None, skip_bad: bool = False, limit: int | None = None,
             progress: bool = True, openai_config: OpenAIConfig | None = None,
             answer_turns: tuple[int, int] = (3, 5), answer_paraphrases: float = 0.0) -> dict:
    """Generate LLaVA instruction data for every (record, type); returns the summary (also written as JSON).

    Defaults put the cache, failures and summary next to the output: OUT.cache.jsonl, OUT.failures.jsonl,
    OUT.summary.json. Raises BackendFatal when the backend cannot work at all (no key, key rejected).
    `answer_turns`: (fewest, most) questions per short_answer sample; `answer_paraphrases`: the share of them asked in
    another wording (data_gen.vqa.short_answer_turns).
    """
    started = time.monotonic()
    types = list(dict.fromkeys(types))
    unknown = [t for t in types if t not in RESPONSE_TYPES]
    if unknown or not types:
        raise ValueError(f"unknown response type(s) {unknown}: choose from {', '.join(RESPONSE_TYPES)}")
    if backend not in ("offline", "openai"):
        raise ValueError(f"unknown backend {backend!r}: choose openai or offline")
    out_path = Path(out_path)
    stem = out_path.with_suffix("")
    cache_path = Path(cache_path) if cache_path else Path(f"{stem}.cache.jsonl")
    failures_path = Path(failures_path) if failures_path else Path(f"{stem}.failures.jsonl")
    summary_path = Path(summary_path) if summary_path else Path(f"{stem}.summary.json")

    records, bad_lines = read_captions(input_path, skip_bad=skip_bad)
    if limit is not None:
        records = records[:limit]
    vocabulary = Vocabulary.from_boxes(b for r in records for b in r.boxes)
    if backend == "openai" and any(t in GPT_TYPES for t in types):  # rule-made types alone need no key
        model_backend = OpenAIBackend(openai_config or OpenAIConfig(), seed=seed)
    else:
        model_backend = OfflineBackend(vocabulary, seed=seed)
        workers = 1  # pure Python: threads would only add overhead

    answer_turns = check_turns(answer_turns)
    reword = training_rewording(answer_paraphrases)
    # the cache records how short answers were made, so a cache of 3-5 turns is never reused for 10
    low, high = answer_turns
    rules_source = RULES_SOURCE if answer_turns == (3, 5) else f"{RULES_SOURCE}:turns={low}-{high}"
    if reword:
        rules_source += f":paraphrases={answer_paraphrases:g}"

    def source_of(response_type: str) -> str:
        return {"short_answer": rules_source, "caption": RULES_SOURCE}.get(response_type, model_backend.source)

    def work(record: CaptionRecord, response_type: str) -> Outcome:
        try:
            if response_type == "short_answer":
                turns = short_answer_turns(record, vocabulary, seed, answer_turns, reword)
            elif response_type == "caption":
                turns = caption_turns(record, seed)
            else:
                turns = model_backend.generate(record, response_type)
        except ItemFailed as e:
            return Outcome(record, response_type, reason=str(e))
        return Outcome(record, response_type, turns=turns)

    items = [(r, t) for r in records for t in types]
    failures: list[dict] = []
    counts = {"generated": 0, "failed": 0, "filtered": 0}
    with GenerationCache(cache_path) as cache:
        for record, response_type in items:
            entry = cache.entries.get((record.id, response_type))
            if entry and entry["source"] != source_of(response_type):
                raise CacheError(f"{cache_path} holds {record.id}/{response_type} made by {entry['source']!r}, but "
                                 f"this run uses {source_of(response_type)!r}; use another --cache or delete it")
        todo = [(r, t) for r, t in items if (r.id, t) not in cache.entries]
        already_done = len(items) - len(todo)
        bar = tqdm(total=len(todo), desc=f"generate ({backend})", unit="item", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        try:
            for outcome in _run(todo, work, workers):
                key = (outcome.record.id, outcome.response_type)
                if outcome.turns is None:
                    counts["failed"] += 1
                    failures.append({"id": key[0], "type": key[1], "reason": outcome.reason})
                else:
                    cache.append(*key, source_of(outcome.response_type), outcome.turns)
                    counts["generated"] += 1
                    counts["filtered"] += leak_reason(outcome.turns) is not None
                bar.update(1)
                bar.set_postfix(done=counts["generated"], failed=counts["failed"], filtered=counts["filtered"],
                                refresh=False)
        finally:
            bar.close()
        finished = dict(cache.entries)
        torn = cache.torn_lines_dropped

    samples, by_type, filtered, empty = _assemble(items, finished)
    atomic_write_json(out_path, samples)
    atomic_write_text(failures_path, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))

    summary = {
        "input": str(input_path), "output": str(out_path), "cache": str(cache_path), "failures": str(failures_path),
        "summary": str(summary_path),
        "backend": backend, "source": model_backend.source, "types": types, "seed": seed,
        "records": len(records), "bad_lines_skipped": bad_lines, "items": len(items),
        "already_done": already_done, "generated": counts["generated"], "failed": counts["failed"],
        "empty": empty, "filtered": sum(filtered.values()), "filtered_by_reason": filtered,
        "written": len(samples), "written_by_type": by_type,
        "torn_cache_lines_dropped": torn,
        "usage": model_backend.usage_report() if isinstance(model_backend, OpenAIBackend) else None,
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    atomic_write_json(summary_path, summary)
    return summary
