"""What can be read off a box: the scene vocabulary, attributes from labels, position words, relations, and the
small pieces of English every generator shares.

One module owns these facts so that the renderer, its captions, the offline generator and the short-answer questions
can never disagree about what "left", "larger" or "the red circle" means.
"""
from __future__ import annotations

from dataclasses import dataclass
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
# Position questions are only asked about objects whose centre is at least this far from the lines between thirds
# (the scene renderer keeps all centres this far away, so for scenes every object qualifies).
CLEAR_MARGIN = 0.04
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
    def column(self) -> str:
        return third_word(self.cx, COLUMNS)

    @property
    def row(self) -> str:
        return third_word(self.cy, ROWS)

    @property
    def location(self) -> str:
        return location_phrase(self.row, self.column)


def read_object(box: Box) -> SceneObject:
    size, colour, shape = parse_scene_label(box.label)
    return SceneObject(box.label, *box.bbox, size=size, colour=colour, shape=shape)


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


def third_word(value: float, words: Sequence[str]) -> str:
    """Position word from a normalised coordinate in thirds of the image."""
    return words[0] if value < 1 / 3 else words[1] if value < 2 / 3 else words[2]


def location_phrase(row: str, column: str) -> str:
    """One fixed phrase per ninth of the image, e.g. "in the top left corner", so answers never vary in meaning."""
    if row == "middle" and column == "center":
        return "in the center"
    if row == "middle":
        return f"on the {column} side"
    if column == "center":
        return f"at the {row} center"
    return f"in the {row} {column} corner"


def clear_column(obj: SceneObject) -> bool:
    """The object sits clearly in one horizontal third: narrow enough and not centred on a dividing line."""
    return obj.x2 - obj.x1 <= 0.5 and all(abs(obj.cx - line) >= CLEAR_MARGIN for line in (1 / 3, 2 / 3))


def clear_row(obj: SceneObject) -> bool:
    return obj.y2 - obj.y1 <= 0.5 and all(abs(obj.cy - line) >= CLEAR_MARGIN for line in (1 / 3, 2 / 3))


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
    return ((colour is None or obj.colour == colour) and (size is None or obj.size == size)
            and (noun is None or obj.noun == noun) and (column is None or obj.column == column)
            and (row is None or obj.row == row))


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
    the object's centre is clearly inside its third.
    """
    noun = target.noun if (use_shape or not target.is_scene_shape) else None
    colours = [None, target.colour] if use_colour and target.colour else [None]
    sizes = [None, target.size] if use_size and target.size else [None]
    candidates: list[tuple[str | None, str | None, str | None, str | None]] = []
    for size, colour in ((s, c) for s in sizes for c in colours):
        candidates.append((colour, size, None, None))
    if use_position and clear_column(target):
        candidates.append((None, None, target.column, None))
    if use_position and clear_row(target):
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


def inventory(objects: Iterable[SceneObject]) -> str:
    """ "two large red circles and a small blue square" ("" for no objects)."""
    return join_list([count_phrase(n, name) for name, n in grouped_counts(objects)])


# ---------------------------------------------------------------------------------------------------------------------
# What is absent: closed-world negatives for "Is there ...?" questions.

@dataclass(frozen=True)
class Vocabulary:
    """Plain (non-scene) labels seen anywhere in the input. A label that occurs in the dataset but has no box in an
    image is taken to be absent from it: true for the scene world, and for COCO, whose 80 categories are annotated
    exhaustively."""

    nouns: frozenset[str] = frozenset()

    @staticmethod
    def from_boxes(boxes: Iterable[Box]) -> "Vocabulary":
        return Vocabulary(frozenset(o.noun for o in map(read_object, boxes) if not o.is_scene_shape))


def absent_kinds(objects: Sequence[SceneObject], vocabulary: Vocabulary) -> list[str]:
    """Things certainly not in the image: "colour shape" pairs of the scene world and unseen dataset nouns."""
    absent: list[str] = []
    scene = [o for o in objects if o.is_scene_shape]
    if scene and all(o.colour for o in scene):
        present = {(o.colour, o.shape) for o in scene}
        absent += [f"{c} {s}" for c in SCENE_COLOURS for s in SCENE_SHAPES if (c, s) not in present]
    if len(scene) < len(objects) or (not objects and vocabulary.nouns):
        present_nouns = {o.noun for o in objects}
        absent += sorted(n for n in vocabulary.nouns if n not in present_nouns)
    return absent
