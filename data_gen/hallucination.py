"""Object hallucination, measured two ways: POPE (yes/no existence questions) and CHAIR (objects named in open
descriptions that are not in the image). Pure functions on text and boxes: `llava-pipeline eval` scores with them,
`llava-pipeline generate --pope-out` writes POPE question files with them, and the preference-pair generator draws its
hallucinated objects from the same co-occurrence statistics.

An object *kind* is what an existence question names: "red circle" for a scene shape (colour + shape, size ignored),
the label itself for anything else ("dog"). A kind is absent from an image when it has neither a box nor a crowd
region there and no caption of the image names it (data_gen.world.mentions: the name, a synonym or a plural), so a
"no" of POPE or a hallucination of a preference pair never contradicts the image's own text ("A puppy sleeps on the
couch" with only the couch boxed: dog is not absent). Crowd regions count as present.

POPE (Li et al., 2023): per image, present kinds ("yes") and as many absent ones ("no") sampled three ways: `random`
(any absent kind), `popular` (the absent kinds most frequent in the data set), `adversarial` (the absent kinds that
co-occur most with the present ones). Question files are POPE's own JSONL, `{"question_id", "image", "text",
"label": "yes"|"no"}`, plus `"category"` naming the split (as LLaVA's llava_pope_test.jsonl has it). An answer is read
as LLaVA's eval_pope.py reads it: "no" when its first sentence has the word No/no/not, otherwise "yes".

CHAIR (Rohrbach et al., 2018): each mention of a vocabulary object in a description is mapped to its category
through a synonym list; CHAIR-i = mentions of categories not in the image / all mentions (every occurrence counts, as
in the reference chair.py), CHAIR-s = descriptions with at least one such mention / all descriptions. Vocabularies:
the scene world's 18 colour-shape kinds, COCO's 80 categories with common synonyms, or a file in the reference's
synonyms.txt format (one category per line: `category, synonym, synonym, ...`).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from data_gen import world
from data_gen.prompting import stable_rng
from data_gen.records import CaptionRecord, read_captions
from data_gen.vqa import SHORT_ANSWER_SUFFIX
from data_gen.world import SceneObject, with_article
from llava.io import atomic_write_text, jsonl_lines, parse_json_line

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_QUESTION = "Is there {} in the image?"


class HallucinationError(ValueError):
    """A POPE/CHAIR input is wrong; the message names the file, line and key."""


# ---- kinds and their statistics --------------------------------------------------------------------------------

def object_kind(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}" if obj.is_scene_shape and obj.colour else obj.label.lower()


def record_kinds(record: CaptionRecord) -> list[str]:
    """The kinds in one image, in box order, without repeats."""
    return list(dict.fromkeys(object_kind(o) for o in world.read_objects(record.boxes)))


@dataclass
class KindStats:
    """How often each kind appears in a data set's images and how often two kinds share an image."""
    frequency: Counter = field(default_factory=Counter)
    together: dict[str, Counter] = field(default_factory=dict)

    @staticmethod
    def from_records(records: Iterable[CaptionRecord]) -> "KindStats":
        stats = KindStats()
        for record in records:
            kinds = record_kinds(record)
            stats.frequency.update(kinds)
            for a in kinds:
                stats.together.setdefault(a, Counter()).update(k for k in kinds if k != a)
        return stats

    @property
    def kinds(self) -> list[str]:
        return sorted(self.frequency)

    def absent(self, present: Sequence[str], captions: Sequence[str] = ()) -> list[str]:
        """Kinds of the data set that are not in the image: not among its boxes or crowd regions (`present`) and not
        named by its captions (world.mentions), so a "no" never contradicts what the image's own text says."""
        present = set(present)
        return [k for k in self.kinds if k not in present and not world.mentions(captions, k)]

    def cooccurrence(self, kind: str, present: Sequence[str]) -> int:
        return sum(self.together.get(p, Counter())[kind] for p in present)

    def rank_absent(self, present: Sequence[str], split: str, rng: random.Random,
                    captions: Sequence[str] = ()) -> list[str]:
        """Absent kinds in the order a POPE split takes them (ties broken by `rng`, so files are reproducible)."""
        absent = self.absent(present, captions)
        rng.shuffle(absent)
        if split == "random":
            return absent
        if split == "popular":
            return sorted(absent, key=lambda k: -self.frequency[k])
        if split == "adversarial":
            return sorted(absent, key=lambda k: -self.cooccurrence(k, present))
        raise ValueError(f"unknown POPE split {split!r}; splits: {', '.join(POPE_SPLITS)}")

    def draw_absent(self, present: Sequence[str], rng: random.Random, captions: Sequence[str] = ()) -> str | None:
        """One absent kind, drawn with weight (co-occurrences with the present kinds + 1): the hallucinations a
        model is most tempted by are the objects that usually come with what it sees."""
        absent = self.absent(present, captions)
        if not absent:
            return None
        return rng.choices(absent, weights=[self.cooccurrence(k, present) + 1 for k in absent])[0]


# ---- POPE ------------------------------------------------------------------------------------------------------

def make_pope_file(captions_jsonl: str | os.PathLike, out_jsonl: str | os.PathLike, *, per_image: int = 3,
                   splits: Sequence[str] = POPE_SPLITS, seed: int = 0, skip_bad: bool = False,
                   short_answer: bool = True) -> dict:
    """Write POPE questions for the captions' images: per image and split, up to `per_image` present kinds ("yes")
    and as many absent ones ("no"). Kind statistics come from the same file. `short_answer` ends each question with
    LLaVA's short-answer instruction, as LLaVA's llava_pope_test.jsonl does. Returns counts per split."""
    suffix = SHORT_ANSWER_SUFFIX if short_answer else ""
    records, _ = read_captions(captions_jsonl, skip_bad=skip_bad)
    stats = KindStats.from_records(records)
    lines, counts = [], Counter()
    for split in splits:
        if split not in POPE_SPLITS:
            raise ValueError(f"unknown POPE split {split!r}; splits: {', '.join(POPE_SPLITS)}")
        for record in records:
            rng = stable_rng(seed, record.id, "pope", split)
            present = record_kinds(record)
            yes = rng.sample(present, min(per_image, len(present)))
            no = stats.rank_absent(present, split, rng, record.captions)[:len(yes)]
            for kind, label in [(k, "yes") for k in yes[:len(no)]] + [(k, "no") for k in no]:
                lines.append(json.dumps({"question_id": f"{split}_{len(lines)}", "image": record.image,
                                         "text": POPE_QUESTION.format(with_article(kind)) + suffix, "label": label,
                                         "category": split}))
                counts[f"{split}_{label}"] += 1
    atomic_write_text(out_jsonl, "".join(line + "\n" for line in lines))
    return {"images": len(records), "questions": len(lines), **dict(sorted(counts.items()))}


def pope_answer(text: str) -> str:
    """LLaVA's eval_pope.py reading of an answer: "no" if its first sentence has the word No, no or not."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def read_pope_labels(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """{question_id: (split, label)} of a POPE question file. The split is the line's "category", else the file name
    after its last underscore (POPE's coco_pope_random.json -> random)."""
    path = Path(path)
    default_split = path.stem.rsplit("_", 1)[-1]
    labels: dict[str, tuple[str, str]] = {}
    for where, line in jsonl_lines(path):
        obj = parse_json_line(line, where, HallucinationError)
        label = str(obj.get("label", "")).strip().lower() if isinstance(obj, dict) else ""
        if label not in ("yes", "no"):
            raise HallucinationError(f"{where}: key 'label' must be \"yes\" or \"no\" (POPE's question format "
                                     f"{{question_id, image, text, label}}), got {obj.get('label')!r}"
                                     if isinstance(obj, dict) else f"{where}: a line must be a JSON object")
        if "question_id" not in obj:
            raise HallucinationError(f"{where}: missing key 'question_id'")
        labels[str(obj["question_id"])] = (str(obj.get("category") or default_split), label)
    return labels


def binary_scores(labels: Sequence[str], predictions: Sequence[str]) -> dict:
    """POPE's numbers with "yes" as the positive class."""
    tp = sum(l == "yes" and p == "yes" for l, p in zip(labels, predictions))
    fp = sum(l == "no" and p == "yes" for l, p in zip(labels, predictions))
    fn = sum(l == "yes" and p == "no" for l, p in zip(labels, predictions))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": sum(l == p for l, p in zip(labels, predictions)) / n if n else 0.0,
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(p == "yes" for p in predictions) / n if n else 0.0, "n": n}


def pope_scores(labels: dict[str, tuple[str, str]], answers: dict[str, str], *, bootstrap: int = 1000) -> dict:
    """{split: binary_scores + standard errors of accuracy and F1 (bootstrap over questions)}, plus "average"
    (the mean of each number over the splits, as POPE results are usually quoted)."""
    missing = [qid for qid in labels if qid not in answers]
    if missing:
        raise HallucinationError(f"{len(missing)} POPE questions have no answer (first: {missing[:3]}); answer the "
                                 "whole question file")
    by_split: dict[str, list[tuple[str, str]]] = {}
    for qid, (split, label) in labels.items():
        by_split.setdefault(split, []).append((label, pope_answer(answers[qid])))
    result = {}
    for split, pairs in by_split.items():
        scores = binary_scores([l for l, _ in pairs], [p for _, p in pairs])
        for key in ("accuracy", "f1"):
            scores[f"{key}_se"] = bootstrap_se(pairs, lambda s, key=key: binary_scores(
                [l for l, _ in s], [p for _, p in s])[key], bootstrap)
        result[split] = scores
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    result["average"] = {k: sum(s[k] for s in result.values()) / len(result) for k in keys}
    return result


def bootstrap_se(items: Sequence, statistic: Callable[[Sequence], float], samples: int = 1000,
                 seed: int = 0) -> float:
    """Standard error of `statistic` over `items` by resampling them with replacement (fixed seed)."""
    if len(items) < 2 or samples < 2:
        return 0.0
    rng = random.Random(seed)
    values = [statistic([items[rng.randrange(len(items))] for _ in items]) for _ in range(samples)]
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ---- CHAIR -----------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")
_IRREGULAR_SINGULARS = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
                        "knives": "knife", "feet": "foot", "teeth": "tooth", "leaves": "leaf", "shelves": "shelf",
                        "skis": "skis", "glasses": "glasses", "scissors": "scissors", "bus": "bus", "grass": "grass",
                        "glass": "glass", "dress": "dress", "class": "class", "cross": "cross", "gas": "gas"}


def singular(word: str) -> str:
    """English singular of a lower-case word, by the rules world.plural applies (enough for object nouns)."""
    if word in _IRREGULAR_SINGULARS:
        return _IRREGULAR_SINGULARS[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses", "buses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


def _phrase_key(text: str) -> tuple[str, ...]:
    return tuple(singular(w) for w in _WORD.findall(text.lower()))


class ChairVocabulary:
    """Synonym phrases -> category; mentions are found longest phrase first ("hot dog" before "dog")."""

    def __init__(self, synonyms: dict[str, Sequence[str]], name: str = "custom"):
        self.name = name
        self.lookup: dict[tuple[str, ...], str] = {}
        for category, phrases in synonyms.items():
            for phrase in [category, *phrases]:
                key = _phrase_key(phrase)
                if key:
                    self.lookup.setdefault(key, category)
        self.longest = max((len(k) for k in self.lookup), default=1)

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.lookup.values()))

    def mentions(self, text: str) -> list[str]:
        """Categories named in `text`, one entry per mention, in order."""
        words = _phrase_key(text)
        found, i = [], 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                category = self.lookup.get(words[i:i + n])
                if category is not None:
                    found.append(category)
                    i += n
                    break
            else:
                i += 1
        return found

    @staticmethod
    def scene() -> "ChairVocabulary":
        """The scene world: an object is a colour + shape ("red circle"); sizes are not part of it."""
        return ChairVocabulary({f"{c} {s}": [] for c in world.SCENE_COLOURS for s in world.SCENE_SHAPES}, "scene")

    @staticmethod
    def coco() -> "ChairVocabulary":
        return ChairVocabulary(COCO_SYNONYMS, "coco")

    @staticmethod
    def from_file(path: str | os.PathLike) -> "ChairVocabulary":
        """A synonyms file in the CHAIR reference's format: `category, synonym, synonym, ...` per line."""
        path = Path(path)
        if not path.is_file():
            raise HallucinationError(f"CHAIR vocabulary file not found: {path}")
        synonyms: dict[str, list[str]] = {}
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            names = [n.strip() for n in line.split(",") if n.strip()]
            if not names:
                continue
            if not _phrase_key(names[0]):
                raise HallucinationError(f"{path}:{line_no}: the category {names[0]!r} has no letters; a line is "
                                         "'category, synonym, synonym, ...'")
            synonyms.setdefault(names[0], []).extend(names[1:])
        if not synonyms:
            raise HallucinationError(f"{path}: no categories (one line per category: 'category, synonym, ...')")
        return ChairVocabulary(synonyms, path.name)

    @staticmethod
    def named(name: str) -> "ChairVocabulary":
        """"scene", "coco" or a synonyms file."""
        if name == "scene":
            return ChairVocabulary.scene()
        if name == "coco":
            return ChairVocabulary.coco()
        return ChairVocabulary.from_file(name)


def image_objects(records: Iterable[CaptionRecord], vocabulary: ChairVocabulary) -> dict[str, set[str]]:
    """{image path: categories of its boxes}: each box label read through the vocabulary (a scene label "large red
    circle" -> "red circle"; a COCO label "dog" -> "dog")."""
    objects: dict[str, set[str]] = {}
    for record in records:
        found = objects.setdefault(record.image, set())
        for box in record.boxes:
            found.update(vocabulary.mentions(box.label))
    return objects


def chair_scores(descriptions: Sequence[tuple[str, str]], objects: dict[str, set[str]],
                 vocabulary: ChairVocabulary, *, bootstrap: int = 1000) -> dict:
    """CHAIR-i and CHAIR-s of (image, description) pairs against {image: categories}; standard errors by bootstrap
    over descriptions. `per_description` lists what each mentioned and which mentions were hallucinated."""
    rows = []
    for image, text in descriptions:
        if image not in objects:
            raise HallucinationError(f"no ground-truth objects for image {image!r}: pass the captions JSONL of the "
                                     "evaluated images (their boxes are the truth)")
        mentioned = vocabulary.mentions(text)
        rows.append({"image": image, "mentioned": mentioned,
                     "hallucinated": [m for m in mentioned if m not in objects[image]]})

    def chair_i(sample):
        total = sum(len(r["mentioned"]) for r in sample)
        return sum(len(r["hallucinated"]) for r in sample) / total if total else 0.0

    def chair_s(sample):
        return sum(bool(r["hallucinated"]) for r in sample) / len(sample) if sample else 0.0

    return {"chair_i": chair_i(rows), "chair_i_se": bootstrap_se(rows, chair_i, bootstrap),
            "chair_s": chair_s(rows), "chair_s_se": bootstrap_se(rows, chair_s, bootstrap),
            "mentions": sum(len(r["mentioned"]) for r in rows),
            "hallucinated_mentions": sum(len(r["hallucinated"]) for r in rows), "descriptions": len(rows),
            "vocabulary": vocabulary.name, "per_description": rows}


# COCO's 80 detection categories with common synonyms (a subset of the reference's synonyms.txt; pass that file for
# numbers comparable with published CHAIR results).
COCO_SYNONYMS: dict[str, list[str]] = {
    "person": ["people", "man", "woman", "boy", "girl", "child", "kid", "baby", "player", "lady", "guy", "adult",
               "rider", "skier", "surfer", "skateboarder", "snowboarder", "pedestrian"],
    "bicycle": ["bike", "cycle"], "car": ["automobile", "taxi", "sedan", "suv"], "motorcycle": ["motorbike",
                                                                                               "motor bike"],
    "airplane": ["plane", "jet", "aircraft", "airliner"], "bus": ["school bus", "double decker"],
    "train": ["locomotive", "subway"], "truck": ["pickup", "lorry"], "boat": ["ship", "sailboat", "canoe", "kayak"],
    "traffic light": ["stoplight", "traffic signal"], "fire hydrant": ["hydrant"], "stop sign": [],
    "parking meter": ["meter"], "bench": [], "bird": ["pigeon", "seagull", "duck", "parrot", "goose"],
    "cat": ["kitten", "kitty"], "dog": ["puppy", "pup"], "horse": ["pony", "foal"], "sheep": ["lamb", "ram"],
    "cow": ["cattle", "calf", "bull", "oxen"], "elephant": [], "bear": ["grizzly"], "zebra": [],
    "giraffe": [], "backpack": ["back pack", "knapsack"], "umbrella": ["parasol"],
    "handbag": ["purse", "hand bag"], "tie": ["necktie", "bow tie"], "suitcase": ["luggage", "suit case"],
    "frisbee": ["flying disc"], "skis": ["ski"], "snowboard": [], "sports ball": ["ball", "soccer ball",
                                                                                   "baseball", "football"],
    "kite": [], "baseball bat": ["bat"], "baseball glove": ["glove", "mitt"], "skateboard": ["skate board"],
    "surfboard": ["surf board"], "tennis racket": ["racket", "racquet"], "bottle": [], "wine glass": [],
    "cup": ["mug"], "fork": [], "knife": [], "spoon": [], "bowl": [], "banana": [], "apple": [],
    "sandwich": ["burger", "sub"], "orange": [], "broccoli": [], "carrot": [], "hot dog": [], "pizza": [],
    "donut": ["doughnut"], "cake": ["cupcake"], "chair": ["stool"], "couch": ["sofa"], "potted plant": ["plant",
                                                                                                        "houseplant"],
    "bed": [], "dining table": ["table", "desk"], "toilet": [], "tv": ["television", "monitor"],
    "laptop": ["computer", "notebook"], "mouse": [], "remote": ["remote control"], "keyboard": [],
    "cell phone": ["phone", "cellphone", "smartphone"], "microwave": [], "oven": ["stove"], "toaster": [],
    "sink": [], "refrigerator": ["fridge"], "book": ["novel"], "clock": [], "vase": [], "scissors": [],
    "teddy bear": ["teddy", "stuffed animal"], "hair drier": ["hair dryer", "blow dryer"], "toothbrush": [],
}
