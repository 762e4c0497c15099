"""The synthetic scene source: deterministic bytes, captions that match the boxes, pixels that match the labels."""
from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from answer_oracle import Obj
from data_gen.records import read_captions
from data_gen.scenes import render_scenes
from data_gen.world import SCENE_COLOURS, SCENE_SIZES

pytestmark = pytest.mark.timeout(120)


def all_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    summary = render_scenes(out, 60, seed=42, size=64, shards_per=25)
    return out, summary


def test_same_seed_same_bytes_other_seed_other_scenes(rendered, tmp_path):
    out, summary = rendered
    render_scenes(tmp_path / "again", 60, seed=42, size=64, shards_per=25)
    assert all_bytes(tmp_path / "again") == all_bytes(out)
    render_scenes(tmp_path / "other", 60, seed=43, size=64, shards_per=25)
    assert (tmp_path / "other" / "captions.jsonl").read_bytes() != (out / "captions.jsonl").read_bytes()
    render_scenes(tmp_path / "prefix", 10, seed=42, size=64, shards_per=25)  # scene i depends on (seed, i) only
    assert (tmp_path / "prefix" / "images" / "scene_000009.png").read_bytes() == \
        (out / "images" / "scene_000009.png").read_bytes()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["pairs-00000.tar", "pairs-00001.tar",
                                                                  "pairs-00002.tar"]


def test_scene_world_rules_and_pixels(rendered):
    out, _ = rendered
    records, _ = read_captions(out / "captions.jsonl")
    assert len(records) == 60 and {len(r.boxes) for r in records} == {1, 2, 3}
    for record in records:
        image = Image.open(out / "images" / record.image).convert("RGB")
        assert image.size == (64, 64)
        background = image.getpixel((0, 0)) if not any(b.bbox[0] == 0 and b.bbox[1] == 0 for b in record.boxes) \
            else None
        if background:
            assert background[0] == background[1] == background[2] and 190 <= background[0] <= 250
        objs = [Obj(b.label, *b.bbox) for b in record.boxes]
        for i, o in enumerate(objs):
            size, colour, shape = o.label.split()
            side = o.x2 - o.x1
            assert o.y2 - o.y1 == pytest.approx(side, abs=1e-3)
            low, high = SCENE_SIZES[size]
            assert low - 1e-3 <= side <= high + 1e-3
            centre = (int((o.x1 + o.x2) / 2 * 64), int((o.y1 + o.y2) / 2 * 64))
            assert image.getpixel(centre) == SCENE_COLOURS[colour], (record.id, o.label)
            for other in objs[i + 1:]:  # boxes do not overlap
                assert o.x2 <= other.x1 or other.x2 <= o.x1 or o.y2 <= other.y1 or other.y2 <= o.y1


def test_captions_match_the_boxes(rendered):
    out, _ = rendered
    numbers = {"two": 2, "three": 3}
    for record in read_captions(out / "captions.jsonl")[0]:
        objs = [Obj(b.label, *b.bbox) for b in record.boxes]
        assert len(set(record.captions)) == len(record.captions) == 3
        for caption in record.captions:
            text = caption.lower()
            for o in objs:
                assert o.label in text, (caption, o.label)  # "large red circles" contains "large red circle"
            if m := re.match(r"(two|three) shapes:", text):
                assert numbers[m.group(1)] == len(objs)
            if text.startswith("a single shape"):
                assert len(objs) == 1
            for m in re.finditer(r"an? ([a-z]+ [a-z]+ [a-z]+) (in the [a-z]+ [a-z]+ corner|on the [a-z]+ side|"
                                 r"at the [a-z]+ center|in the center)", text):
                assert any(o.label == m.group(1) and o.where == m.group(2) for o in objs), caption
            if m := re.match(r"an? ([a-z]+ [a-z]+ [a-z]+) (to the left of|to the right of|above|below) "
                             r"an? ([a-z]+ [a-z]+ [a-z]+)", text):
                a = [o for o in objs if o.label == m.group(1)]
                b = [o for o in objs if o.label == m.group(3)]
                relation = {"to the left of": lambda x, y: x.x2 <= y.x1, "to the right of": lambda x, y: y.x2 <= x.x1,
                            "above": lambda x, y: x.y2 <= y.y1, "below": lambda x, y: y.y2 <= x.y1}[m.group(2)]
                assert len(a) == len(b) == 1 and relation(a[0], b[0]), caption


def test_shards_hold_png_txt_json_per_image(rendered):
    import webdataset as wds

    out, _ = rendered
    captions = {r.id: r.captions for r in read_captions(out / "captions.jsonl")[0]}
    urls = [str(p) for p in sorted((out / "shards").glob("pairs-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == sorted(captions)
    for sample in samples:
        assert sample["txt"].decode() in captions[sample["__key__"]]
        assert json.loads(sample["json"]) == {"id": sample["__key__"]}
        assert (out / "images" / f"{sample['__key__']}.png").read_bytes() == sample["png"]


def test_bad_parameters_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        render_scenes(tmp_path, 3, size=16)
    render_scenes(tmp_path / "big", 4, seed=1, size=224, shards_per=1)
    assert Image.open(tmp_path / "big" / "images" / "scene_000000.png").size == (224, 224)
    render_scenes(tmp_path / "big", 2, seed=1, size=224, shards_per=1)  # stale shards from the bigger render go
    assert len(list((tmp_path / "big" / "shards").iterdir())) == 2
