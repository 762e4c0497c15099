"""Generated samples never contradict the image's boxes, crowd regions or captions, and state no ambiguous position.

The COCO-style inputs below are written as COCO files by hand and imported through `llava-pipeline coco`; the truth
the checker (consistency.py) compares against is read from those same hand-written COCO objects, not from the import,
so a fault in the importer shows up as well as one in the generators.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from consistency import Checker, Thing, Truth, check_samples
from data_gen.coco import import_coco
from data_gen.driver import generate
from data_gen.offline import OfflineBackend
from data_gen.prompting import format_context
from data_gen.records import Box, CaptionRecord, read_captions
from data_gen.scenes import render_scenes
from data_gen.vqa import short_answer_turns
from data_gen.world import Vocabulary
from datagen_fixtures import write_jsonl

pytestmark = pytest.mark.timeout(180)
TYPES = ["conversation", "detail", "reasoning", "short_answer"]
CATEGORIES = {1: "person", 2: "bicycle", 16: "bird", 18: "dog", 19: "horse", 25: "giraffe", 28: "umbrella",
              37: "sports ball", 39: "baseball bat", 47: "cup", 48: "fork", 54: "sandwich", 15: "bench", 20: "sheep",
              38: "kite", 10: "traffic light"}
W, H = 600, 300  # every image is 600 x 300 pixels: y is halved in normalised units, x is divided by 600


def ann(image_id: int, category: str, x: float, y: float, w: float, h: float, crowd: int = 0) -> dict:
    category_id = next(k for k, v in CATEGORIES.items() if v == category)
    return {"image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h], "iscrowd": crowd}


# image id -> (captions, annotations). Each image is a case the generators got wrong or could get wrong.
IMAGES = {
    # A stand full of spectators is one crowd region, plus a few separately boxed players.
    1: (["Spectators pack the grandstand behind the infield.", "A batter waits for the pitch in front of the crowd."],
        [ann(1, "person", 0, 0, 600, 120, crowd=1), ann(1, "person", 60, 160, 60, 120),
         ann(1, "person", 470, 170, 50, 110), ann(1, "baseball bat", 110, 150, 40, 40),
         ann(1, "sports ball", 300, 60, 10, 10)]),
    # Only a crowd: a flock of birds, no single bird box.
    2: (["A flock of pigeons circles above the old square.", "Pigeons in flight against a gray sky."],
        [ann(2, "bird", 50, 20, 500, 150, crowd=1), ann(2, "bench", 20, 240, 160, 60)]),
    # Boxes on the border, overhanging it, spanning it, and centred on the lines between thirds.
    3: (["A bench by the road with a bicycle leaning on it.", "A kite stuck in a tree above a bench."],
        [ann(3, "bench", 0, 180, 600, 120),                     # full width: no column
         ann(3, "bicycle", 560, 10, 60, 80),                    # overhangs the right border
         ann(3, "kite", 170, 80, 60, 40),                       # centre (200, 100) = (1/3, 1/3): on both lines
         ann(3, "traffic light", 390, 180, 20, 40),             # centre (400, 200) = (2/3, 2/3): on both lines
         ann(3, "cup", 0, 0, 30, 30)]),                         # the top left corner, clearly placed
    # No annotations at all: the captions alone say what is there.
    4: (["A sandwich and a cup of coffee on a plate.", "Lunch served with a fork."], []),
    # A category named only in the captions (and a synonym of one): never denied.
    5: (["A woman with an umbrella walks her dog in the rain.", "Someone holding an umbrella next to a puppy."],
        [ann(5, "person", 200, 40, 100, 250)]),
    # Many instances of one category.
    6: (["Fourteen sheep on a hillside.", "A flock of sheep grazing."],
        [ann(6, "sheep", 10 + 41 * k, 100 + 10 * (k % 3), 35, 30) for k in range(14)]),
    # Captions that give another number than the boxes (a third dog is hidden and has no box).
    7: (["Three dogs play in the snow.", "Dogs running in a snowy field."],
        [ann(7, "dog", 20, 150, 120, 90), ann(7, "dog", 420, 160, 130, 100)]),
    # Horses and a giraffe, plainly placed: what the generators may still say everywhere.
    8: (["Two horses and a giraffe in a zoo enclosure.", "Animals at the zoo."],
        [ann(8, "horse", 20, 30, 120, 60), ann(8, "horse", 430, 200, 140, 80), ann(8, "giraffe", 260, 110, 80, 80)]),
}


def coco_files(tmp_path):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": W, "height": H} for i in IMAGES]
    captions = {"images": images, "annotations": [{"id": 100 * i + k, "image_id": i, "caption": c}
                                                  for i, (caps, _) in IMAGES.items() for k, c in enumerate(caps)]}
    instances = {"images": images, "categories": [{"id": k, "name": v} for k, v in CATEGORIES.items()],
                 "annotations": [dict(a, id=n) for n, a in enumerate(a for _, anns in IMAGES.values() for a in anns)]}
    paths = tmp_path / "captions_val.json", tmp_path / "instances_val.json"
    paths[0].write_text(json.dumps(captions))
    paths[1].write_text(json.dumps(instances))
    return paths


def truth_of_coco() -> dict[str, Truth]:
    """The truth straight from the hand-written COCO objects: pixel boxes clipped to the image, divided by its size."""
    truths = {}
    for i, (captions, anns) in IMAGES.items():
        things = []
        for a in anns:
            x, y, w, h = a["bbox"]
            x1, y1, x2, y2 = max(x, 0) / W, max(y, 0) / H, min(x + w, W) / W, min(y + h, H) / H
            things.append(Thing(CATEGORIES[a["category_id"]], x1, y1, x2, y2, bool(a["iscrowd"])))
        truths[f"{i:012d}.jpg"] = Truth(things, captions)
    return truths


@pytest.fixture(scope="module")
def coco_samples(tmp_path_factory):
    """All four response types for seeds 0-5 (the generators pick different questions per seed)."""
    tmp = tmp_path_factory.mktemp("coco")
    import_coco(*coco_files(tmp), tmp / "captions.jsonl")
    samples = []
    for seed in range(6):
        generate(tmp / "captions.jsonl", tmp / f"out{seed}.json", types=TYPES, seed=seed, progress=False,
                 answer_turns=(5, 8))
        samples += json.loads((tmp / f"out{seed}.json").read_text())
    return samples


def answers(samples, image_id: int, types=TYPES) -> list[tuple[str, str]]:
    image = f"{image_id:012d}.jpg"
    return [(h["value"].replace("<image>\n", ""), g["value"]) for s in samples
            if s["image"] == image and any(s["id"].endswith("_" + t) for t in types)
            for h, g in zip(s["conversations"][::2], s["conversations"][1::2])]


def test_coco_samples_agree_with_boxes_crowds_and_captions(coco_samples):
    checker = Checker(CATEGORIES.values())
    assert check_samples(coco_samples, truth_of_coco(), checker) > 300
    text = " ".join(a for s in coco_samples for a in (t["value"] for t in s["conversations"][1::2]))
    # not vacuous: negatives, exact counts, crowds and positions are all stated somewhere
    assert "No, there is no" in text and "many people" in text and "fourteen sheep" in text
    assert re.search(r"in the (top|bottom) (left|right) corner", text)


def test_a_crowd_region_is_present_and_many_never_absent_or_one(coco_samples):
    """Image 2 has birds only as a crowd region: every bird answer says there are (many) birds."""
    said = Counter()
    for question, answer in answers(coco_samples, 2):
        if "bird" not in question:
            continue
        assert not answer.startswith("No") and "no bird" not in answer, (question, answer)
        assert not re.search(r"\b(a|one|1) bird\b", answer) and answer != "1", (question, answer)
        said["many" if "many birds" in answer else answer] += 1
    assert said["many"] and said["Yes"], said  # asked in both conversation and short answers
    for question, answer in answers(coco_samples, 1, ["detail"]):  # stands of people and three boxed players
        assert "many people" in answer and "three people" not in answer and "two people" not in answer


def test_things_the_captions_name_are_never_denied(coco_samples):
    """Image 4 names a sandwich, a cup and a fork without any box; image 5 an umbrella and a dog (also as "puppy")
    with only a person box. All of them have boxes in other images, so the old closed-world rule denied them."""
    for image_id, named in ((4, {"sandwich", "cup", "fork"}), (5, {"umbrella", "dog"})):
        denied = Counter()
        for question, answer in answers(coco_samples, image_id):
            asked = re.match(r"(?:Is there|Can you see|Does the (?:image|picture) contain) an? (.+?)"
                             r"(?: in the image| in the picture)?\?", question)
            if answer.startswith("No"):
                denied[asked[1]] += 1
            assert not answer.startswith("There are no") and answer != "0", (question, answer)
        assert denied and not named & set(denied), (image_id, denied)  # negatives are asked, just not these


def test_a_number_the_captions_contradict_is_not_stated(coco_samples):
    """Image 7: two dog boxes, "Three dogs play in the snow": neither two nor three is said, and dogs are there."""
    stated = Counter()
    for question, answer in answers(coco_samples, 7):
        assert not re.search(r"\b(two|three|2|3) dogs\b", answer) and not (
            "dogs" in question and question.startswith("How many") and answer.isdigit()), (question, answer)
        stated["dogs"] += "dogs" in answer
    assert stated["dogs"]


@pytest.mark.parametrize("response_type", ["conversation", "detail", "reasoning", "short_answer"])
def test_objects_on_a_boundary_are_placed_by_no_response_type(coco_samples, response_type):
    """Image 3: the kite's centre is on the lines x = 1/3 and y = 1/3, the traffic light's on x = 2/3 and y = 2/3, the
    bench spans the whole width. Whatever the response type, the kite and the light get no position word and the
    bench no column (the checker checks every position stated)."""
    checker = Checker(CATEGORIES.values())
    truth = truth_of_coco()[f"{3:012d}.jpg"]
    for question, answer in answers(coco_samples, 3, [response_type]):
        checker.check(question, answer, truth)
        for noun in ("kite", "traffic light"):
            if noun in answer or noun in question:
                assert not re.search(rf"{noun} (is )?(in|on|at) the (top|bottom|left|right|center|middle)",
                                     question + " " + answer), (question, answer)
                if question.startswith(("Is the " + noun, "Where is the " + noun, "Which side")):
                    assert answer not in ("left", "center", "right", "top", "middle", "bottom"), (question, answer)


def test_the_cup_in_the_corner_is_placed():
    """The other side of the rule: a clear position is stated by every type that places things."""
    record = CaptionRecord("p", "p.jpg", ("A cup and a fork on a table.",),
                           (Box("cup", (0.05, 0.05, 0.2, 0.2)), Box("fork", (0.7, 0.4, 0.8, 0.6))))
    backend = OfflineBackend(Vocabulary(frozenset({"cup", "fork", "horse"})))
    (detail,) = backend.generate(record, "detail")
    assert "The cup is in the top left corner of the image." in detail["answer"]
    short = [t for seed in range(20) for t in short_answer_turns(record, backend.vocabulary, seed)]
    assert any(t["answer"] == "left" for t in short) and any(t["answer"] == "top" for t in short)


def random_boundary_records(n: int, rng: random.Random) -> list[CaptionRecord]:
    """Boxes whose centres crowd the lines between thirds (within ±0.08), some wide, some tall, some crowds."""
    labels = ["dog", "cat", "person", "car", "bench"]
    records = []
    for i in range(n):
        boxes = []
        for _ in range(rng.randint(1, 4)):
            cx = rng.choice([1 / 3, 2 / 3, 0.15, 0.85]) + rng.uniform(-0.08, 0.08)
            cy = rng.choice([1 / 3, 2 / 3, 0.15, 0.85]) + rng.uniform(-0.08, 0.08)
            w, h = rng.choice([0.1, 0.2, 0.55]), rng.choice([0.1, 0.3, 0.6])
            x1, y1 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
            x2, y2 = min(1.0, cx + w / 2), min(1.0, cy + h / 2)
            boxes.append(Box(rng.choice(labels), (round(x1, 4), round(y1, 4), round(x2, 4), round(y2, 4)),
                             crowd=rng.random() < 0.1))
        records.append(CaptionRecord(f"r{i}", f"r{i}.jpg", (f"Picture {i} of a street.",), tuple(boxes)))
    return records


def test_random_boundary_boxes_through_every_response_type(tmp_path):
    records = random_boundary_records(150, random.Random(13))
    path = write_jsonl(tmp_path / "captions.jsonl", records)
    generate(path, tmp_path / "out.json", types=TYPES, progress=False, answer_turns=(6, 8))
    samples = json.loads((tmp_path / "out.json").read_text())
    truths = {r.image: Truth([Thing(b.label, *b.bbox, b.crowd) for b in r.boxes], list(r.captions))
              for r in records}
    assert check_samples(samples, truths, Checker(["dog", "cat", "person", "car", "bench"])) > 1000


def test_scene_world_samples_are_consistent(tmp_path):
    render_scenes(tmp_path / "scenes", 300, seed=21, shards_per=1000)
    records, _ = read_captions(tmp_path / "scenes" / "captions.jsonl")
    generate(tmp_path / "scenes" / "captions.jsonl", tmp_path / "out.json", types=TYPES, progress=False)
    samples = json.loads((tmp_path / "out.json").read_text())
    truths = {r.image: Truth([Thing(b.label, *b.bbox) for b in r.boxes], list(r.captions)) for r in records}
    assert len(samples) == 4 * 300
    assert check_samples(samples, truths, Checker(b.label for r in records for b in r.boxes)) > 3000


def test_the_checker_catches_what_it_is_for():
    """The checker must fail the statements the generators used to make (else the tests above prove nothing)."""
    checker = Checker(["person", "dog", "kite", "umbrella"])
    crowd = Truth([Thing("person", 0, 0, 1, 0.4, crowd=True), Thing("dog", 0.05, 0.6, 0.2, 0.9)],
                  ["Fans everywhere and a man with an umbrella."])
    line = Truth([Thing("kite", 0.3, 0.1, 0.3667, 0.2)], ["A kite."])
    for question, answer, truth in [
        ("Is there a person in the image?", "No, there is no person in the image.", crowd),
        ("Is there an umbrella?", "No, there is no umbrella in the image.", crowd),
        ("How many people are there?", "There is one person.", crowd),
        ("Describe.", "In the picture I can see a person and two dogs.", crowd),
        ("Describe.", "The kite is on the left side of the image.", line),
        ("Is the kite on the left, center or right?\nAnswer the question using a single word or phrase.", "left",
         line),
        ("How many people are there?\nAnswer the question using a single word or phrase.", "1", crowd),
    ]:
        with pytest.raises(AssertionError):
            checker.check(question, answer, truth)
    checker.check("Is there a dog?", "Yes, there is a dog in the bottom left corner of the image.", crowd)
    checker.check("How many people?", "There are many people in the image, too many to count one by one.", crowd)


def test_crowd_regions_reach_the_gpt_prompt_as_crowds():
    text = format_context(["Fans in the stands."], [Box("person", (0.0, 0.0, 1.0, 0.5), crowd=True),
                                                    Box("person", (0.1, 0.6, 0.2, 0.9))])
    assert "person (a crowd of many): [0.00, 0.00, 1.00, 0.50]" in text and "person: [0.10, 0.60, 0.20, 0.90]" in text
