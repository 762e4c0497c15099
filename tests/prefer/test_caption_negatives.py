"""A "no" answer and a hallucinated object never contradict the image's own captions, and a crowd region stays a crowd.

Independent COCO-style images, written here by hand: a living room whose captions say "A puppy sleeps on the couch" but
whose only box is the couch (the dog was never annotated), images where dogs are boxed (so "dog" is a frequent kind
of the data set: the one POPE's popular/adversarial splits and the co-occurrence-weighted hallucinations reach for
first), and a stadium with a crowd region of people.
"""
import json
import random

from data_gen.hallucination import KindStats, make_pope_file
from data_gen.preference import perturb, short_pair
from data_gen.records import Box, CaptionRecord
from data_gen.world import Vocabulary

PUPPY = CaptionRecord("living_room", "living_room.jpg", ("A puppy sleeps on the couch.", "A cozy living room."),
                      (Box("couch", (0.1, 0.5, 0.9, 0.95)),))
DOGS = [CaptionRecord(f"park_{i}", f"park_{i}.jpg", ("Dogs play in a park.",),
                      (Box("dog", (0.1, 0.5, 0.3, 0.8)), Box("couch", (0.6, 0.6, 0.9, 0.9)),
                       Box("dog", (0.4, 0.5, 0.55, 0.8)))) for i in range(4)]
STADIUM = CaptionRecord("stadium", "stadium.jpg", ("Fans fill the stands.",),
                        (Box("person", (0.0, 0.0, 1.0, 0.5), crowd=True), Box("sports ball", (0.45, 0.7, 0.5, 0.75))))
RECORDS = [PUPPY, *DOGS, STADIUM]


def test_pope_never_asks_no_about_what_a_caption_names(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": r.id, "image": r.image, "captions": list(r.captions),
                                            "boxes": [b.to_json() for b in r.boxes]}) + "\n" for r in RECORDS))
    make_pope_file(captions, tmp_path / "pope.jsonl", per_image=3)
    lines = [json.loads(line) for line in (tmp_path / "pope.jsonl").read_text().splitlines()]
    living_room = [q for q in lines if q["image"] == "living_room.jpg"]
    assert living_room, "the living room gets POPE questions"
    assert not [q for q in living_room if "dog" in q["text"]], living_room
    stadium_people = [q for q in lines if q["image"] == "stadium.jpg" and "person" in q["text"]]
    assert stadium_people and all(q["label"] == "yes" for q in stadium_people)


def test_hallucinations_are_drawn_from_what_neither_boxes_nor_captions_show():
    stats = KindStats.from_records(RECORDS)
    for seed in range(40):
        drawn = stats.draw_absent(["couch"], random.Random(seed), PUPPY.captions)
        assert drawn not in ("dog", "couch")
        boxes = perturb(PUPPY, "object", stats, random.Random(seed))
        assert boxes is None or "dog" not in [b.label for b in boxes]
        pair = short_pair(PUPPY, stats, Vocabulary(), seed, 0)
        if pair and pair["kind"] in ("object", "omission"):
            assert "dog" not in pair["conversations"][0]["value"], pair
    # Without the captions' word, the dog is the first thing a hallucination reaches for: the check above has teeth.
    assert "dog" in {stats.draw_absent(["couch"], random.Random(seed)) for seed in range(40)}


def test_a_crowd_region_stays_a_crowd_and_is_never_moved():
    stats = KindStats.from_records(RECORDS)
    replaced = moved = 0
    for seed in range(60):
        boxes = perturb(STADIUM, "object", stats, random.Random(seed))
        if boxes is not None and boxes[0].label != "person":
            replaced += 1
            assert boxes[0].crowd and boxes[0].bbox == STADIUM.boxes[0].bbox
        boxes = perturb(STADIUM, "position", stats, random.Random(seed))
        if boxes is not None:
            moved += 1
            crowd = [b for b in boxes if b.crowd]
            assert crowd == [STADIUM.boxes[0]]
    assert replaced and moved
