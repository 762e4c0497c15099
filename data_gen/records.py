"""The captions JSONL format that every source writes and every generator reads.

One line per image: `{"id", "image", "captions": [..], "boxes": [{"label", "bbox": [x1, y1, x2, y2]}]}` with the bbox
normalised to 0–1 and x1 < x2, y1 < y2; `image` is a path relative to an image folder. A box may carry `"crowd": true`:
it then marks a region holding many objects of its label (COCO's `iscrowd`), not one object. These files are produced
by other tools and edited by hand, so every error names file:line and the key, and says what a valid value looks like.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from llava.io import atomic_write_text, jsonl_lines, parse_json_line


class InputError(ValueError):
    """A captions line is wrong; the message names file:line, the key and the fix."""


@dataclass(frozen=True)
class Box:
    label: str
    bbox: tuple[float, float, float, float]
    crowd: bool = False  # a region of many `label`s: evidence of presence and of "many", never a count of one

    def to_json(self) -> dict:
        """`crowd` is written only when set, so files without crowds keep their old bytes."""
        box = {"label": self.label, "bbox": [round(v, 4) for v in self.bbox]}
        return {**box, "crowd": True} if self.crowd else box


@dataclass(frozen=True)
class CaptionRecord:
    id: str
    image: str
    captions: tuple[str, ...]
    boxes: tuple[Box, ...]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "image": self.image,
            "captions": list(self.captions),
            "boxes": [b.to_json() for b in self.boxes],
        }


def parse_record(obj: object, where: str) -> CaptionRecord:
    """Validate one decoded line; `where` is "file:line" for the error message."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a line must be a JSON object with keys id, image, captions, boxes")
    for key in ("id", "image", "captions", "boxes"):
        if key not in obj:
            raise InputError(f"{where}: missing key {key!r} (a line is "
                             '{"id", "image", "captions": [..], "boxes": [{"label", "bbox": [x1, y1, x2, y2]}]})')
    record_id = obj["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or str(record_id).strip() == "":
        raise InputError(f"{where}: key 'id' must be a non-empty string or an integer, got {record_id!r}")
    image = obj["image"]
    if not isinstance(image, str) or not image.strip():
        raise InputError(f"{where}: key 'image' must be a non-empty path relative to the image folder, got {image!r}")
    captions = obj["captions"]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise InputError(f"{where}: key 'captions' must be a non-empty list of non-empty strings")
    if not isinstance(obj["boxes"], list):
        raise InputError(f"{where}: key 'boxes' must be a list of {{\"label\", \"bbox\"}} objects (may be empty)")
    boxes = tuple(parse_box(box, f"{where}: boxes[{i}]") for i, box in enumerate(obj["boxes"]))
    return CaptionRecord(str(record_id), image, tuple(c.strip() for c in captions), boxes)


def parse_box(box: object, where: str) -> Box:
    """One {"label", "bbox"[, "crowd"]} object, checked; errors name `where`, the key and the fix."""
    if not isinstance(box, dict) or "label" not in box or "bbox" not in box:
        raise InputError(f"{where}: a box must be an object with keys 'label' and 'bbox'")
    label = box["label"]
    if not isinstance(label, str) or not label.strip():
        raise InputError(f"{where}: key 'label' must be a non-empty string, got {label!r}")
    bbox = box["bbox"]
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise InputError(f"{where}: key 'bbox' must be [x1, y1, x2, y2] (four numbers), got {bbox!r}")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        raise InputError(f"{where}: key 'bbox' {bbox} is out of range: coordinates are normalised to 0–1 "
                         "(divide pixel coordinates by the image width and height)")
    if not (x1 < x2 and y1 < y2):
        raise InputError(f"{where}: key 'bbox' {bbox} is in the wrong order: it must be [x1, y1, x2, y2] "
                         "with x1 < x2 and y1 < y2 (top-left corner, then bottom-right corner)")
    crowd = box.get("crowd", False)
    if not isinstance(crowd, bool):
        raise InputError(f"{where}: key 'crowd' must be true or false (true: a region of many {label!r}s), "
                         f"got {crowd!r}")
    return Box(" ".join(label.split()), (x1, y1, x2, y2), crowd)


def read_captions(path: str | os.PathLike, skip_bad: bool = False) -> tuple[list[CaptionRecord], int]:
    """Read a captions JSONL file; return (records, number of bad lines skipped).

    By default the first bad line raises InputError; with `skip_bad` bad lines are skipped and counted. Blank lines
    are ignored. Duplicate ids are bad lines too: the id keys the generation cache and the output.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"captions file not found: {path}")
    records: list[CaptionRecord] = []
    seen: dict[str, str] = {}  # id -> the line number that has it
    skipped = 0
    for where, line in jsonl_lines(path):
        try:
            record = parse_record(parse_json_line(line, where, InputError), where)
            if record.id in seen:
                raise InputError(f"{where}: key 'id' {record.id!r} repeats line {seen[record.id]}; ids must be "
                                 "unique")
        except InputError:
            if not skip_bad:
                raise
            skipped += 1
            continue
        seen[record.id] = where.rpartition(":")[2]
        records.append(record)
    return records, skipped


def write_captions(path: str | os.PathLike, records: Iterable[CaptionRecord]) -> int:
    """Write records as captions JSONL atomically; return how many were written."""
    lines = [json.dumps(r.to_json(), ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
