"""COCO importer on a small hand-written COCO-format pair of files; captions JSONL validation."""
from __future__ import annotations

import json

import pytest

from data_gen.cli import coco_main
from data_gen.coco import import_coco
from data_gen.records import InputError, read_captions

IMAGES = [{"id": 42, "file_name": "000000000042.jpg", "width": 640, "height": 480},
          {"id": 7, "file_name": "000000000007.jpg", "width": 200, "height": 100},
          {"id": 9, "file_name": "000000000009.jpg", "width": 100, "height": 100}]
CAPTIONS = {"images": IMAGES, "annotations": [
    {"id": 1, "image_id": 42, "caption": "A dog chases a ball\n across the grass. "},
    {"id": 2, "image_id": 7, "caption": "Two cats on a sofa."},
    {"id": 3, "image_id": 42, "caption": "A brown dog playing outside."}]}
INSTANCES = {"images": IMAGES, "categories": [{"id": 18, "name": "dog"}, {"id": 37, "name": "sports ball"},
                                              {"id": 17, "name": "cat"}, {"id": 1, "name": "person"}],
             "annotations": [
                 {"id": 10, "image_id": 42, "category_id": 18, "bbox": [64.0, 48.0, 320.0, 240.0], "iscrowd": 0},
                 {"id": 11, "image_id": 42, "category_id": 37, "bbox": [600.0, 400.0, 50.0, 100.0], "iscrowd": 0},
                 {"id": 12, "image_id": 7, "category_id": 17, "bbox": [0, 0, 100, 50], "iscrowd": 0},
                 {"id": 13, "image_id": 7, "category_id": 1, "bbox": [0, 0, 200, 100], "iscrowd": 1},
                 {"id": 14, "image_id": 7, "category_id": 17, "bbox": [10, 10, 0, 20], "iscrowd": 0}]}


@pytest.fixture
def coco_files(tmp_path):
    captions, instances = tmp_path / "captions_val.json", tmp_path / "instances_val.json"
    captions.write_text(json.dumps(CAPTIONS))
    instances.write_text(json.dumps(INSTANCES))
    return captions, instances


def test_import_normalises_boxes_keeps_order_and_marks_crowds(coco_files, tmp_path):
    stats = import_coco(*coco_files, tmp_path / "captions.jsonl")
    assert stats == {"images": 2, "boxes": 4, "crowd_regions": 1, "degenerate_dropped": 1,
                     "images_without_captions": 1}
    records, skipped = read_captions(tmp_path / "captions.jsonl")
    assert skipped == 0 and [r.id for r in records] == ["42", "7"]
    dog_image, cat_image = records
    assert dog_image.image == "000000000042.jpg"
    assert dog_image.captions == ("A dog chases a ball across the grass.", "A brown dog playing outside.")
    assert [(b.label, b.bbox) for b in dog_image.boxes] == [
        ("dog", (0.1, 0.1, 0.6, 0.6)), ("sports ball", (0.9375, 0.8333, 1.0, 1.0))]  # clipped to the image
    assert [(b.label, b.bbox, b.crowd) for b in cat_image.boxes] == [("cat", (0.0, 0.0, 0.5, 0.5), False),
                                                                     ("person", (0.0, 0.0, 1.0, 1.0), True)]
    assert '{"label": "person", "bbox": [0.0, 0.0, 1.0, 1.0], "crowd": true}' in (tmp_path / "captions.jsonl").read_text()


def test_cli_and_missing_key_error(coco_files, tmp_path, capsys):
    assert coco_main(["--captions", str(coco_files[0]), "--instances", str(coco_files[1]),
                      "--out", str(tmp_path / "c.jsonl")]) == 0
    assert "wrote 2 images with 4 boxes (1 crowd regions)" in capsys.readouterr().out
    broken = dict(INSTANCES, annotations=[{"id": 1, "image_id": 42, "category_id": 18}])
    coco_files[1].write_text(json.dumps(broken))
    with pytest.raises(InputError, match=r"instances_val\.json: annotations\[0\]: missing key 'bbox'"):
        import_coco(*coco_files, tmp_path / "c.jsonl")
    assert coco_main(["--captions", str(coco_files[0]), "--instances", str(coco_files[1]),
                      "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "missing key 'bbox'" in capsys.readouterr().err
    broken = dict(INSTANCES, annotations=[dict(INSTANCES["annotations"][0], iscrowd="yes")])
    coco_files[1].write_text(json.dumps(broken))
    with pytest.raises(InputError, match=r"annotations\[0\]: key 'iscrowd' must be 0 or 1, got 'yes'"):
        import_coco(*coco_files, tmp_path / "c.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "image": "a.jpg", "captions": ["x"]', ":1: not valid JSON"),
    ('{"image": "a.jpg", "captions": ["x"], "boxes": []}', ":1: missing key 'id'"),
    ('{"id": "a", "image": "a.jpg", "captions": [], "boxes": []}', ":1: key 'captions' must be a non-empty list"),
    ('{"id": "a", "image": "a.jpg", "captions": ["x"], "boxes": [{"label": "dog", "bbox": [0, 0, 1.5, 1]}]}',
     r":1: boxes\[0\]: key 'bbox' .* out of range"),
    ('{"id": "a", "image": "a.jpg", "captions": ["x"], "boxes": [{"label": "dog", "bbox": [0.5, 0, 0.2, 1]}]}',
     r":1: boxes\[0\]: key 'bbox' .* wrong order"),
    ('{"id": "a", "image": "a.jpg", "captions": ["x"], "boxes": [{"bbox": [0, 0, 1, 1]}]}',
     r":1: boxes\[0\]: a box must be an object with keys 'label' and 'bbox'"),
    ('{"id": "a", "image": "a.jpg", "captions": ["x"], "boxes": [{"label": "dog", "bbox": [0, 0, 1, 1], "crowd": 1}]}',
     r":1: boxes\[0\]: key 'crowd' must be true or false"),
])
def test_bad_captions_lines_name_file_line_and_key(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=message):
        read_captions(path)
    assert read_captions(path, skip_bad=True) == ([], 1)


def test_duplicate_ids_are_bad_lines(tmp_path):
    line = '{"id": 5, "image": "a.jpg", "captions": ["x"], "boxes": []}\n'
    path = tmp_path / "dup.jsonl"
    path.write_text(line + "\n" + line)
    with pytest.raises(InputError, match=r"dup\.jsonl:3: key 'id' '5' repeats line 1"):
        read_captions(path)
    records, skipped = read_captions(path, skip_bad=True)
    assert [r.id for r in records] == ["5"] and skipped == 1
