"""Bad rows in LLaVA instruction data (stage 2), one table: each fault is checked three ways.

- stop (training's default): DataError naming the file, the entry index and the id, and the reason;
- skip: the row is left out and counted, every good row is still there;
- `llava-pipeline validate`: the row is reported by index and id with the same reason, before any training.

The bad row is entry 2 (id "bad") between good rows with and without images.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from faults_lib import CORRUPT_BYTES, bomb_png, cases, image_bytes, sample, truncated_jpeg, write_json
from llava.data.errors import DataError
from llava.data.instruct import InstructDataset
from pipeline.validate import ValidateSettings, scan

BAD_INDEX = 2
OK_PNG = image_bytes("RGB")


@dataclass(frozen=True)
class RowFault:
    name: str
    entry: object  # placed at BAD_INDEX
    message: str  # regex for the reason
    when: str  # "load": found when the file is read; "read": found when the row is read (its image)
    files: dict = field(default_factory=dict)  # path (relative to the image folder) -> bytes, or ("symlink", target)


def turns(*pairs) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


ROW_FAULTS = [
    RowFault("corrupt image bytes", sample("bad", "bad.png"), r"bad\.png: cannot decode image", "read",
             {"bad.png": CORRUPT_BYTES}),
    RowFault("truncated image file", sample("bad", "cut.jpg"), r"cut\.jpg: cannot decode image", "read",
             {"cut.jpg": truncated_jpeg()}),
    RowFault("missing image file", sample("bad", "gone.png"), r"gone\.png: image file not found", "read"),
    RowFault("huge dimensions (decompression bomb)", sample("bad", "bomb.png"),
             r"bomb\.png: 10000x10000 = 100000000 pixels is above max_pixels.*decompression-bomb guard", "read",
             {"bomb.png": bomb_png(10_000, 10_000)}),
    RowFault("image path with ..", sample("bad", "../outside.png"), r"contains '\.\.' and could leave", "load",
             {"../outside.png": OK_PNG}),
    RowFault("absolute image path", sample("bad", "/etc/passwd"), r"'/etc/passwd' is absolute", "load"),
    RowFault("symlink out of the image folder", sample("bad", "link.png"), r"link\.png.*(outside|leave)", "read",
             {"../secret.png": OK_PNG, "link.png": ("symlink", "../secret.png")}),
    RowFault("wrong role order", {"id": "bad", "conversations": turns(("gpt", "hi"), ("human", "hello"))},
             r"turn 0 is from 'gpt' but 'human' was expected", "load"),
    RowFault("no assistant turn", {"id": "bad", "conversations": turns(("human", "Anyone there?"))},
             r"no assistant \(gpt\) turn", "load"),
    RowFault("question without an answer", {"id": "bad", "conversations": turns(
        ("human", "Q1"), ("gpt", "A1"), ("human", "Q2"))}, r"last turn is a human turn with no answer", "load"),
    RowFault("unknown role", {"id": "bad", "conversations": turns(("system", "be nice"), ("gpt", "ok"))},
             r"from='system'; valid roles are 'human' and 'gpt'", "load"),
    RowFault("empty turn", {"id": "bad", "conversations": turns(("human", "Q"), ("gpt", "  "))},
             r"turn 1 \(gpt\) has an empty", "load"),
    RowFault("non-string turn value", {"id": "bad", "conversations": [{"from": "human", "value": 42}]},
             r"'conversations' must be a non-empty list of \{'from', 'value'\} objects", "load"),
    RowFault("two <image> tags, one image", {**sample("bad", None, question="<image> and <image>?"), "image": "ok.png"},
             r"2 <image> tags but 1 images", "load"),
    RowFault("<image> tag without an image", {"id": "bad", "conversations": turns(("human", "<image>\nQ"),
                                                                                   ("gpt", "A"))},
             r"1 <image> tags but 0 images", "load"),
    RowFault("no conversations key", {"id": "bad", "image": "ok.png"}, r"missing 'conversations'", "load"),
    RowFault("entry is not an object", ["not", "an", "object"], r"expected an object with 'conversations'", "load"),
    RowFault("image is not a path", {**sample("bad"), "image": 7}, r"'image' must be a path or a list of paths",
             "load"),
]

def build(root: Path, fault: RowFault) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    (images / "ok.png").write_bytes(OK_PNG)
    for rel, content in fault.files.items():
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):
            path.symlink_to(content[1])
        else:
            path.write_bytes(content)
    entries = [sample("good0"), sample("good1", image=None), fault.entry, sample("good3")]
    return write_json(root / "data.json", entries), images


def where(data: Path, fault: RowFault) -> str:
    has_id = isinstance(fault.entry, dict) and "id" in fault.entry
    return re.escape(f"{data}: entry {BAD_INDEX}" + (" (id 'bad')" if has_id else "")) + ".*"


def dataset(data: Path, images: Path, tokenizer, on_error: str) -> InstructDataset:
    return InstructDataset(data, tokenizer, image_folder=images, image_processor=lambda image: image,
                           max_len=256, num_image_tokens=4, on_error=on_error)


@pytest.mark.parametrize("fault", cases(ROW_FAULTS))
def test_stop_names_file_entry_id_and_reason(tmp_path, tokenizer, fault):
    data, images = build(tmp_path, fault)
    expected = where(data, fault) + fault.message
    with pytest.raises(DataError) as info:
        ds = dataset(data, images, tokenizer, "stop")
        assert fault.when == "read", "a structural fault must be found when the file is loaded"
        ds[BAD_INDEX]
    assert re.search(expected, str(info.value)), str(info.value)


@pytest.mark.parametrize("fault", cases(ROW_FAULTS))
def test_skip_counts_the_row_and_keeps_every_good_one(tmp_path, tokenizer, fault):
    data, images = build(tmp_path, fault)
    ds = dataset(data, images, tokenizer, "skip")
    loaded = [ds[i] for i in range(len(ds))]
    skipped = ds.num_malformed + sum(s["skipped"] for s in loaded)
    assert skipped == 1
    assert {s["id"] for s in loaded} == {"good0", "good1", "good3"}


@pytest.mark.parametrize("fault", cases(ROW_FAULTS))
def test_validate_reports_the_row_before_training(tmp_path, tokenizer, fault):
    data, images = build(tmp_path, fault)
    report = scan(ValidateSettings(data=str(data), tokenizer=str(tokenizer.model_file), image_folder=str(images),
                                   max_len=256, image_tokens=4, batch_size=2, workers=0))
    assert report["num_bad"] == 1, report["bad_rows"]
    row = report["bad_rows"][0]
    assert row["index"] == BAD_INDEX and row["id"] == (fault.entry.get("id") if isinstance(fault.entry, dict) else None)
    assert re.search(where(data, fault) + fault.message, row["reason"]), row["reason"]
    assert report["checked"] + (fault.when == "load") == 4  # every other row was probed


def test_table_covers_every_kind_of_fault_the_brief_names():
    names = {f.name for f in ROW_FAULTS}
    for needed in ("corrupt image bytes", "missing image file", "huge dimensions (decompression bomb)",
                   "wrong role order", "no assistant turn", "image path with ..", "absolute image path"):
        assert needed in names
    assert json.dumps([f.name for f in ROW_FAULTS])  # names are plain strings (the README table lists them)
