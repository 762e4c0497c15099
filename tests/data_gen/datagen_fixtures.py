"""Small inputs shared by the data_gen tests."""
from __future__ import annotations

import json
from pathlib import Path

from data_gen.records import Box, CaptionRecord

# Shaped like a real key so that a leak through "sk-..." patterns would show too.
TEST_KEY = "sk-test-DO-NOT-LEAK-7f3a9c2b41d8e6"


def photo_records(n: int) -> list[CaptionRecord]:
    """COCO-like records: plain labels, two boxes each, unique first captions (the fake server keys on them)."""
    labels = ["dog", "cat", "person", "bicycle", "car", "bench"]
    records = []
    for i in range(n):
        boxes = (Box(labels[i % 6], (0.05, 0.10, 0.25, 0.40)), Box(labels[(i + 1) % 6], (0.60, 0.55, 0.90, 0.95)))
        captions = (f"Photo number {i}: a {labels[i % 6]} near a {labels[(i + 1) % 6]}.", f"Picture {i} outdoors.")
        records.append(CaptionRecord(f"img{i:03d}", f"img{i:03d}.jpg", captions, boxes))
    return records


def write_jsonl(path: Path, records: list[CaptionRecord]) -> Path:
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records), encoding="utf-8")
    return path
