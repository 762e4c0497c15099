"""What can be read off a box: the scene vocabulary, attributes from labels, position words, relations, and the
small pieces of English every generator shares.

One module owns these facts so that the renderer, its captions, the offline generator and the short-answer questions
can never disagree about what "left", "larger" or "the red circle" means.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

from data_gen.records import Box

# The synthetic scene world (data_gen.scenes renders it; labels read "size colour shape", e.g. "large red circle").
SCENE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 70, 190),
    "orange": (245, 140, 30),
}
SCENE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Side of an object's (square) box as a fraction of the canvas side.
SCENE_SIZES: dict[str, tuple[float, float]] = {"small": (0.15, 0.22), "large": (0.30, 0.40)}

COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
# The one position rule (position_word) for every response type: a box has a position word along an axis only when its
# centre is at least CLEAR_MARGIN from the lines between thirds and it spans at most MAX_PLACED_EXTENT of the image.
# Otherwise a viewer could name either side, and no question, answer or description may name its position. The scene
# renderer keeps every centre this far away, so every scene object has a position.
CLEAR_MARGIN = 0.04
MAX_PLACED_EXTENT = 0.5
# "Is A larger than B?" is only asked when the areas differ at least this much: a smaller gap is not visible for sure.
LARGER_RATIO = 1.5

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen nineteen twenty").split()
_IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "child": "children", "man": "men",
                      "woman": "women", "foot": "feet", "tooth": "teeth", "leaf": "leaves", "shelf": "shelves"}
_SAME_PLURALS = {"sheep", "skis", "scissors", "broccoli", "deer", "fish", "glasses", "pants", "jeans"}


@dataclass(frozen=True)
class SceneObject:
    """One box with the attributes its label tells. Scene labels give size, colour and shape; other labels
    ("dog", "traffic light") only a noun, and every generator falls back to counts, positions and relations."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    size: str | None
    colour: str | None
    shape: str | None
    crowd: bool = False  # a region of many `label`s (COCO's iscrowd): present, "many", never one object

    @property
    def noun(self) -> str:
        return self.shape if self.shape else self.label

    @property
    def is_scene_shape(self) -> bool:
        return self.shape is not None

    @property
    def cx(self) -> float:
        return (self.x1 + self.x2) / 2

    @property
    def cy(self) -> float:
        return (self.y1 + self.y2) / 2

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)

    @property
    def column(self) -> str | None:
        """ "left" / "center" / "right", or None when ambiguous (position_word) or a crowd, which has no one place."""
        return None if self.crowd else position_word(self.cx, self.x2 - self.x1, COLUMNS)

    @property
    def row(self) -> str | None:
        return None if self.crowd else position_word(self.cy, self.y2 - self.y1, ROWS)

    @property
    def location(self) -> str | None:
        """ "in the top left corner" etc., or None unless both the row and the column are unambiguous."""
        row, column = self.row, self.column
        return location_phrase(row, column) if row and column else None


def read_object(box: Box) -> SceneObject:
    size, colour, shape = parse_scene_label(box.label)
    return SceneObject(box.label, *box.bbox, size=size, colour=colour, shape=shape, crowd=box.crowd)


def read_objects(boxes: Iterable[Box]) -> list[SceneObject]:
    return [read_object(b) for b in boxes]


def parse_scene_label(label: str) -> tuple[str | None, str | None, str | None]:
    """(size, colour, shape) for labels of the form "[size] [colour] shape"; (None, None, None) for any other label.

    Only a whole match counts, so a COCO label such as "orange" (the fruit) stays a plain noun.
    """
    words = label.lower().split()
    if not words or words[-1] not in SCENE_SHAPES or len(words) > 3:
        return None, None, None
    size = colour = None
    rest = words[:-1]
    if rest and rest[0] in SCENE_SIZES:
        size = rest.pop(0)
    if rest and rest[0] in SCENE_COLOURS:
        colour = rest.pop(0)
    if rest:
        return None, None, None
    return size, colour, words[-1]


def position_word(centre: float, extent: float, words: Sequence[str]) -> str | None:
    """The word (from `words`, one per third) for where a box lies along one axis, given its centre and its extent
    (normalised), or None when that is ambiguous: the box spans more than MAX_PLACED_EXTENT, or its centre lies within
    CLEAR_MARGIN of a line between thirds. Every position word any generator writes comes from here."""
    if extent > MAX_PLACED_EXTENT or any(abs(centre - line) < CLEAR_MARGIN for line in (1 / 3, 2 / 3)):
        return None
    return words[0] if centre < 1 / 3 else words[1] if centre < 2 / 3 else words[2]


def location_phrase(row: str, column: str) -> str:
    """One fixed phrase per ninth of the image, e.g. "in the top left corner", so answers never vary in meaning."""
    if row == "middle" and column == "center":
        return "in the center"
    if row == "middle":
        return f"on the {column} side"
    if column == "center":
        return f"at the {row} center"
    return f"in the {row} {column} corner"


def left_of(a: SceneObject, b: SceneObject) -> bool:
    """A lies entirely to the left of B (no horizontal overlap), so the answer is the same for every viewer."""
    return a.x2 <= b.x1


def above(a: SceneObject, b: SceneObject) -> bool:
    return a.y2 <= b.y1


def clearly_larger(a: SceneObject, b: SceneObject) -> bool:
    return a.area >= LARGER_RATIO * b.area


# ---------------------------------------------------------------------------------------------------------------------
# Referring to objects without ambiguity.

def _matches(obj: SceneObject, colour: str | None, size: str | None, noun: str | None, column: str | None,
             row: str | None) -> bool:
    """Whether a description could mean `obj`. An object without a position word (ambiguous, or a crowd) could be
    in any third, so "the dog on the left" is never taken to be unique while a dog sits on the line."""
    return ((colour is None or obj.colour == colour) and (size is None or obj.size == size)
            and (noun is None or obj.noun == noun) and (column is None or obj.column in (column, None))
            and (row is None or obj.row in (row, None)))


def _position_suffix(column: str | None, row: str | None) -> str:
    if column:
        return {"left": " on the left", "center": " in the center", "right": " on the right"}[column]
    if row:
        return {"top": " at the top", "middle": " in the middle", "bottom": " at the bottom"}[row]
    return ""


def refer(target: SceneObject, objects: Sequence[SceneObject], *, use_colour: bool = True, use_size: bool = True,
          use_shape: bool = True, use_position: bool = True) -> str | None:
    """The shortest description (without article) that picks out `target` alone, or None when none does.

    The attribute a question asks about must not appear in its own description ("What color is the red circle?"),
    hence the switches. Without the shape the noun becomes "object" ("the red object"). Positions are only used when
    the object has a position word. A crowd region is many objects, so it is never "the" one.
    """
    if target.crowd:
        return None
    noun = target.noun if (use_shape or not target.is_scene_shape) else None
    colours = [None, target.colour] if use_colour and target.colour else [None]
    sizes = [None, target.size] if use_size and target.size else [None]
    candidates: list[tuple[str | None, str | None, str | None, str | None]] = []
    for size, colour in ((s, c) for s in sizes for c in colours):
        candidates.append((colour, size, None, None))
    if use_position and target.column:
        candidates.append((None, None, target.column, None))
    if use_position and target.row:
        candidates.append((None, None, None, target.row))
    if noun is None:
        candidates = [c for c in candidates if c != (None, None, None, None)]
    candidates.sort(key=lambda c: sum(v is not None for v in c))
    for colour, size, column, row in candidates:
        if sum(_matches(o, colour, size, noun, column, row) for o in objects) == 1:
            words = [w for w in (size, colour, noun or "object") if w]
            return " ".join(words) + _position_suffix(column, row)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# English.

def number_word(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def plural(phrase: str) -> str:
    """Plural of a noun phrase by its last word: "large red circle" -> "large red circles", "person" -> "people"."""
    head, _, last = phrase.rpartition(" ")
    lower = last.lower()
    if lower in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[lower]
    elif lower in _SAME_PLURALS:
        word = last
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def count_phrase(n: int, phrase: str) -> str:
    """ "a large red circle", "two dogs", "no circles"."""
    if n == 0:
        return "no " + plural(phrase)
    return with_article(phrase) if n == 1 else f"{number_word(n)} {plural(phrase)}"


def join_list(items: Sequence[str], conjunction: str = "and") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def grouped_counts(objects: Iterable[SceneObject], key=lambda o: o.label) -> list[tuple[str, int]]:
    """[(name, count)] in order of first appearance."""
    counts: dict[str, int] = {}
    for obj in objects:
        counts[key(obj)] = counts.get(key(obj), 0) + 1
    return list(counts.items())


def inventory(objects: Iterable[SceneObject], uncounted: dict[str, str] | None = None) -> str:
    """ "two large red circles and a small blue square" ("" for no objects); a noun in `uncounted` (see
    uncounted_nouns) gets its amount word instead of a number: "two dogs and many people"."""
    uncounted = uncounted or {}
    objects = list(objects)
    nouns = {o.label: o.noun for o in objects}
    return join_list([f"{uncounted[nouns[name]]} {plural(name)}" if nouns[name] in uncounted else count_phrase(n, name)
                      for name, n in grouped_counts(objects)])


# ---------------------------------------------------------------------------------------------------------------------
# What the captions say: generated answers must never contradict the image's own captions.

# Words a caption may use for a COCO category besides its name (their plurals count too). Only used to keep
# "Is there a ...? No." away from what the captions name, so the list is generous on purpose ("bag" for three
# categories, "crowd" for person): a word too many costs a question, a word too few a false answer. CHAIR's list
# (data_gen.hallucination.COCO_SYNONYMS) must map each mention to exactly one category, so it cannot be this one.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "guy", "lady",
               "baby", "player", "skier", "surfer", "skateboarder", "snowboarder", "rider", "fan", "crowd",
               "spectator", "someone", "tourist", "officer", "chef", "worker", "pedestrian", "family", "couple",
               "adult", "teenager", "student", "team", "batter", "catcher", "pitcher", "umpire", "soldier"),
    "bicycle": ("bike", "cyclist"), "car": ("vehicle", "taxi", "cab", "sedan", "suv", "van", "jeep"),
    "motorcycle": ("motorbike", "bike", "scooter", "moped", "motorcyclist"),
    "airplane": ("plane", "jet", "aircraft", "airliner", "jetliner", "airplanes"), "bus": ("buses", "coach"),
    "train": ("locomotive", "tram", "subway", "railcar"), "truck": ("lorry", "pickup", "vehicle", "van"),
    "boat": ("ship", "sailboat", "canoe", "kayak", "yacht", "ferry", "vessel"),
    "traffic light": ("stoplight", "traffic signal", "signal"), "fire hydrant": ("hydrant",),
    "stop sign": ("sign",), "parking meter": ("meter",), "bench": ("pew",),
    "bird": ("pigeon", "seagull", "gull", "duck", "goose", "geese", "parrot", "swan", "crow", "eagle", "hawk", "owl",
             "chicken", "hen", "rooster"),
    "cat": ("kitten", "kitty", "kittens"), "dog": ("puppy", "pup", "puppies"), "horse": ("pony", "horseback"),
    "sheep": ("lamb", "flock"), "cow": ("cattle", "bull", "calf", "calves", "cows", "herd", "ox", "oxen"),
    "bear": ("teddy",), "backpack": ("bag", "knapsack"), "umbrella": ("parasol",), "handbag": ("purse", "bag"),
    "tie": ("necktie", "bowtie"), "suitcase": ("luggage", "bag", "baggage"), "frisbee": ("disc", "frisbees"),
    "skis": ("ski",), "sports ball": ("ball", "football", "baseball", "basketball", "volleyball", "soccer"),
    "baseball bat": ("bat",), "baseball glove": ("glove", "mitt"), "skateboard": ("board", "skateboarder"),
    "surfboard": ("board", "surfer"), "tennis racket": ("racket", "racquet"), "wine glass": ("glass", "wine"),
    "cup": ("mug", "coffee", "tea"), "bowl": ("dish",), "sandwich": ("sub", "burger", "hamburger", "panini"),
    "orange": ("tangerine", "citrus"), "hot dog": ("hotdog", "sausage"), "donut": ("doughnut",),
    "cake": ("cupcake", "dessert"), "chair": ("seat", "stool"), "couch": ("sofa", "loveseat"),
    "potted plant": ("plant", "houseplant", "flower", "pot"), "dining table": ("table", "desk"),
    "toilet": ("commode",), "tv": ("television", "monitor", "screen"), "laptop": ("computer", "notebook"),
    "remote": ("controller", "remote control"), "keyboard": ("computer",),
    "cell phone": ("phone", "cellphone", "smartphone", "mobile"), "oven": ("stove",), "sink": ("basin",),
    "refrigerator": ("fridge",), "book": ("books", "novel"), "clock": ("clocks",), "vase": ("vases",),
    "teddy bear": ("teddy", "bear", "stuffed animal"), "hair drier": ("hair dryer", "blow dryer", "dryer"),
    "toothbrush": ("brush",),
}
# Words that say "more than a couple" without a number: "many dogs", "a group of people", "a herd of sheep".
_MANY_WORDS = {"many", "several", "numerous", "multiple", "lots", "crowd", "crowds", "group", "groups", "herd",
               "herds", "flock", "flocks", "bunch", "dozens", "plenty", "various", "lot"}
# Words that end a noun phrase's left side: "two cats and dogs" gives no number for dogs.
_NOT_ADJECTIVES = {"a", "an", "the", "and", "or", "with", "of", "in", "on", "at", "to", "by", "near", "some", "his",
                   "her", "their", "its", "other", "more", "than", "are", "is"}


@lru_cache(maxsize=1 << 16)  # every question asked of an image reads its captions again
def _caption_words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z0-9]+", text.lower()))


def _occurs(phrase: str, words: Sequence[str]) -> list[int]:
    """Indices in `words` where the word sequence of `phrase` starts."""
    target = tuple(phrase.lower().split())
    if not target:
        return list(range(len(words) + 1))
    # the first word compared alone first: this runs for every absent kind x caption x question of data generation
    return [i for i, word in enumerate(words) if word == target[0] and tuple(words[i:i + len(target)]) == target]


def mentions(captions: Iterable[str], noun: str) -> bool:
    """Whether a caption names `noun` (a label such as "traffic light" or "red circle"), one of its SYNONYMS, or one
    of their plurals, as whole words."""
    phrases = _noun_phrases(noun)
    return any(_occurs(phrase, words) for words in map(_caption_words, captions) for phrase in phrases)


@lru_cache(maxsize=None)
def _noun_phrases(noun: str) -> frozenset[str]:
    """The noun, its SYNONYMS and their plurals."""
    return frozenset(form for term in (noun, *SYNONYMS.get(noun, ())) for form in (term, plural(term)))


def _amount(word: str) -> int | str | None:
    if word.isdigit():
        return int(word)
    if word in _NUMBER_WORDS:
        return _NUMBER_WORDS.index(word)
    return {"couple": 2, "pair": 2}.get(word, "many" if word in _MANY_WORDS else None)


def stated_numbers(captions: Iterable[str], noun: str) -> set[int | str]:
    """Numbers the captions give for `noun` by its own name: "two dogs" -> 2, "one dog" -> 1, "three brown dogs" -> 3,
    "a couple of dogs" -> 2, "many dogs" / "a group of dogs" -> "many". A number above one needs the plural, so "two
    dog bowls" says nothing about dogs; "a dog" states nothing either (it is how captions name a thing, not count
    it)."""
    numbers: set[int | str] = set()
    for caption in captions:
        words = _caption_words(caption)
        for form, is_plural in ((noun, False), (plural(noun), True)):
            for i in _occurs(form, words):
                j = i - 1
                if j >= 1 and (words[j] == "of" or (_amount(words[j]) is None and words[j] not in _NOT_ADJECTIVES)):
                    j -= 1  # "a group of dogs", or one adjective: "three brown dogs"
                value = _amount(words[j]) if j >= 0 else None
                if (value == "many" and is_plural) or (isinstance(value, int) and value > 0
                                                       and (value > 1) == is_plural):
                    numbers.add(value)
    return numbers


def uncounted_nouns(objects: Sequence[SceneObject], captions: Iterable[str]) -> dict[str, str]:
    """Nouns whose number no answer may state, each with the amount word to say instead: "many" when a crowd region
    holds some of them (COCO's iscrowd), "some" when a caption gives another number than the boxes (COCO leaves out a
    few small or hidden instances, and "two dogs" must not contradict a caption's "three dogs")."""
    captions = list(captions)
    uncounted: dict[str, str] = {}
    for noun, members in _by_noun(objects).items():
        if any(o.crowd for o in members):
            uncounted[noun] = "many"
            continue
        n = len(members)
        stated = stated_numbers(captions, noun)
        if any(value != n for value in stated if value != "many") or ("many" in stated and n < 3):
            uncounted[noun] = "many" if stated == {"many"} else "some"
    return uncounted


def _by_noun(objects: Iterable[SceneObject]) -> dict[str, list[SceneObject]]:
    groups: dict[str, list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault(obj.noun, []).append(obj)
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# What is absent: closed-world negatives for "Is there ...?" questions.

@dataclass(frozen=True)
class Vocabulary:
    """Plain (non-scene) labels seen anywhere in the input. A label that occurs in the dataset but has no box in an
    image is taken to be absent from it (true for the scene world, and for COCO, whose 80 categories are annotated
    exhaustively) unless a caption of that image names it (see absent_kinds)."""

    nouns: frozenset[str] = frozenset()

    @staticmethod
    def from_boxes(boxes: Iterable[Box]) -> "Vocabulary":
        return Vocabulary(frozenset(o.noun for o in map(read_object, boxes) if not o.is_scene_shape))


def absent_kinds(objects: Sequence[SceneObject], vocabulary: Vocabulary, captions: Iterable[str] = ()) -> list[str]:
    """Things certainly not in the image: "colour shape" pairs of the scene world and dataset nouns that have neither
    a box nor a crowd region in it and that no caption of the image names (see `mentions`)."""
    absent: list[str] = []
    scene = [o for o in objects if o.is_scene_shape]
    if scene and all(o.colour for o in scene):
        present = {(o.colour, o.shape) for o in scene}
        absent += [f"{c} {s}" for c in SCENE_COLOURS for s in SCENE_SHAPES if (c, s) not in present]
    if len(scene) < len(objects) or (not objects and vocabulary.nouns):
        present_nouns = {o.noun for o in objects}
        absent += sorted(n for n in vocabulary.nouns if n not in present_nouns)
    captions = list(captions)
    return [kind for kind in absent if not mentions(captions, kind)]
