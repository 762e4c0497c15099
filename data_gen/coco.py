"""Import COCO `captions_*.json` + `instances_*.json` into the captions JSONL format.

COCO boxes are [x, y, width, height] in pixels; ours are [x1, y1, x2, y2] normalised to 0–1, so each box is divided by
its image's width and height (clipped to the image: a few COCO boxes overhang by a pixel). Category names become labels.
Crowd regions (`iscrowd: 1`) are kept as boxes with `"crowd": true`: such a region holds many objects of its category
("Fans fill the stands"), so it is evidence that the category is there and that there are many of it. Dropping it
made the generators deny people the captions talk about; counting it as one object would under-count them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from data_gen.records import Box, CaptionRecord, InputError, write_captions


def _load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"COCO file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a COCO object with 'images' and 'annotations'")
    return data


def _require(item: object, keys: tuple[str, ...], where: str) -> dict:
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected an object")
    for key in keys:
        if key not in item:
            raise InputError(f"{where}: missing key {key!r}")
    return item


def coco_records(captions: dict, instances: dict, captions_name: str = "captions",
                 instances_name: str = "instances") -> tuple[list[CaptionRecord], dict]:
    """Records in the order of the captions file's `images`; images without captions are left out."""
    images: dict[int, dict] = {}
    for name, data in ((instances_name, instances), (captions_name, captions)):
        for i, image in enumerate(_require(data, ("images",), name)["images"]):
            image = _require(image, ("id", "file_name", "width", "height"), f"{name}: images[{i}]")
            if not (image["width"] > 0 and image["height"] > 0):
                raise InputError(f"{name}: images[{i}]: width and height must be positive")
            images[image["id"]] = image

    texts: dict[int, list[str]] = {}
    for i, ann in enumerate(_require(captions, ("annotations",), captions_name)["annotations"]):
        ann = _require(ann, ("image_id", "caption"), f"{captions_name}: annotations[{i}]")
        text = " ".join(str(ann["caption"]).split())
        if text:
            texts.setdefault(ann["image_id"], []).append(text)

    instances = _require(instances, ("annotations", "categories"), instances_name)
    names = {}
    for i, category in enumerate(instances["categories"]):
        category = _require(category, ("id", "name"), f"{instances_name}: categories[{i}]")
        names[category["id"]] = category["name"]
    boxes: dict[int, list[Box]] = {}
    stats = {"images": 0, "boxes": 0, "crowd_regions": 0, "degenerate_dropped": 0, "images_without_captions": 0}
    for i, ann in enumerate(instances["annotations"]):
        where = f"{instances_name}: annotations[{i}]"
        ann = _require(ann, ("image_id", "bbox", "category_id"), where)
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1, False, True):
            raise InputError(f"{where}: key 'iscrowd' must be 0 or 1, got {crowd!r}")
        if ann["image_id"] not in images:
            raise InputError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in names:
            raise InputError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise InputError(f"{where}: key 'bbox' must be COCO's [x, y, width, height] in pixels, got {bbox!r}")
        image = images[ann["image_id"]]
        x, y, w, h = (float(v) for v in bbox)
        width, height = float(image["width"]), float(image["height"])
        x1, y1 = min(max(x / width, 0.0), 1.0), min(max(y / height, 0.0), 1.0)
        x2, y2 = min(max((x + w) / width, 0.0), 1.0), min(max((y + h) / height, 0.0), 1.0)
        x1, y1, x2, y2 = (round(v, 4) for v in (x1, y1, x2, y2))
        if not (x1 < x2 and y1 < y2):
            stats["degenerate_dropped"] += 1
            continue
        boxes.setdefault(ann["image_id"], []).append(Box(names[ann["category_id"]], (x1, y1, x2, y2), bool(crowd)))

    records = []
    for image in captions["images"]:
        if image["id"] not in texts:
            stats["images_without_captions"] += 1
            continue
        image_boxes = tuple(boxes.get(image["id"], ()))
        records.append(CaptionRecord(str(image["id"]), image["file_name"], tuple(texts[image["id"]]), image_boxes))
        stats["boxes"] += len(image_boxes)
        stats["crowd_regions"] += sum(b.crowd for b in image_boxes)
    stats["images"] = len(records)
    return records, stats


def import_coco(captions_json: str | os.PathLike, instances_json: str | os.PathLike,
                out_jsonl: str | os.PathLike) -> dict:
    """Write the captions JSONL for COCO; returns counts (images, boxes of which crowd regions, degenerate boxes
    dropped, images without captions)."""
    records, stats = coco_records(_load(captions_json), _load(instances_json), str(captions_json),
                                  str(instances_json))
    write_captions(out_jsonl, records)
    return stats
