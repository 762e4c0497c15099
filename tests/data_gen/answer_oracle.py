"""An independent checker for generated questions and answers: it re-reads each question, finds the objects it is
about from the boxes with its own geometry, and asserts the answer states the truth. A question form it does not
know fails the check, so a new template cannot slip in unchecked."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from data_gen.records import CaptionRecord
from data_gen.world import plural  # English only; every fact below is computed here

SIZES = {"small", "large"}
COLOURS = {"red", "green", "blue", "yellow", "purple", "orange"}
SHAPES = {"circle", "square", "triangle"}
NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
POSITION_SUFFIXES = {" on the left": ("col", "left"), " in the center": ("col", "center"),
                     " on the right": ("col", "right"), " at the top": ("row", "top"),
                     " in the middle": ("row", "middle"), " at the bottom": ("row", "bottom")}


@dataclass
class Obj:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def words(self) -> list[str]:
        return self.label.split()

    @property
    def is_shape(self) -> bool:
        return self.words[-1] in SHAPES and len(self.words) == 3

    @property
    def size(self):
        return self.words[0] if self.is_shape else None

    @property
    def colour(self):
        return self.words[1] if self.is_shape else None

    @property
    def noun(self) -> str:
        return self.words[-1] if self.is_shape else self.label

    @property
    def col(self) -> str:
        c = (self.x1 + self.x2) / 2
        return "left" if c < 1 / 3 else "center" if c < 2 / 3 else "right"

    @property
    def row(self) -> str:
        c = (self.y1 + self.y2) / 2
        return "top" if c < 1 / 3 else "middle" if c < 2 / 3 else "bottom"

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)

    @property
    def where(self) -> str:
        if (self.row, self.col) == ("middle", "center"):
            return "in the center"
        if self.row == "middle":
            return f"on the {self.col} side"
        if self.col == "center":
            return f"at the {self.row} center"
        return f"in the {self.row} {self.col} corner"


def objects_of(record: CaptionRecord) -> list[Obj]:
    return [Obj(b.label, *b.bbox) for b in record.boxes]


def number(word: str) -> int:
    return int(word) if word.isdigit() else NUMBERS[word]


def resolve(ref: str, objs: list[Obj]) -> list[Obj]:
    """Objects a description like "large red circle on the left" or "red object" or "dog" fits."""
    position = None
    for suffix, pos in POSITION_SUFFIXES.items():
        if ref.endswith(suffix):
            ref, position = ref[: -len(suffix)], pos
    words = ref.split()
    size = colour = None
    if len(words) > 1 and words[0] in SIZES:
        size = words.pop(0)
    if len(words) > 1 and words[0] in COLOURS:
        colour = words.pop(0)
    noun = " ".join(words)
    found = []
    for o in objs:
        if size and o.size != size or colour and o.colour != colour:
            continue
        if noun != "object" and o.noun != noun:
            continue
        if position and getattr(o, position[0]) != position[1]:
            continue
        found.append(o)
    return found


def the_one(ref: str, objs: list[Obj]) -> Obj:
    found = resolve(ref, objs)
    assert len(found) == 1, f"{ref!r} is ambiguous or absent: {[o.label for o in found]}"
    return found[0]


def kind_members(phrase_plural: str, objs: list[Obj], extra_nouns=()) -> list[Obj]:
    """Objects of a plural kind: "circles", "red shapes", "red objects", "dogs"."""
    words = phrase_plural.split()
    if len(words) == 2 and words[0] in COLOURS and words[1] in ("shapes", "objects"):
        return [o for o in objs if o.colour == words[0]]
    if phrase_plural in ("objects", "shapes"):
        return list(objs)
    nouns = {o.noun for o in objs} | SHAPES | set(extra_nouns)
    singular = [n for n in nouns if plural(n) == phrase_plural]
    assert singular, f"cannot read kind {phrase_plural!r}"
    return [o for o in objs if o.noun == singular[0]]


def left_of(a: Obj, b: Obj) -> bool:
    return a.x2 <= b.x1


def above(a: Obj, b: Obj) -> bool:
    return a.y2 <= b.y1


def yes(answer: str) -> bool:
    assert answer.startswith(("Yes", "No")), answer
    return answer.startswith("Yes")


def check_inventory(text: str, objs: list[Obj]) -> None:
    """ "two large red circles and a small blue square" lists every object exactly."""
    counts: dict[str, int] = {}
    for o in objs:
        counts[o.label] = counts.get(o.label, 0) + 1
    expected = [f"{'an' if label[0] in 'aeiou' else 'a'} {label}" if n == 1 else
                f"{[w for w, i in NUMBERS.items() if i == n][0]} {plural(label)}" for label, n in counts.items()]
    items = re.split(r", | and ", text)
    assert sorted(items) == sorted(expected), (text, expected)


# ---------------------------------------------------------------------------------------------------------------------

def check_conversation_turn(q: str, a: str, record: CaptionRecord) -> None:
    objs = objects_of(record)
    thing = "(?:shape|object)"
    if m := re.fullmatch(rf"How many {thing}s (?:are in the image|can you see|does the picture show)\?|"
                         rf"Count the {thing}s in this picture\.", q):
        m = re.fullmatch(rf"There (?:is (one)|are (\w+)) {thing}s?: (.*)\.", a)
        assert m, a
        assert number(m.group(1) or m.group(2)) == len(objs)
        check_inventory(m.group(3), objs)
    elif m := re.fullmatch(r"How many (.+?) (?:are there|can you see|are in the picture)\?", q):
        members = kind_members(m.group(1), objs)
        if not members:
            assert a == f"There are no {m.group(1)} in the image.", a
        else:
            n = re.match(r"There (?:is (one)|are (\w+)) ", a)
            assert n and number(n.group(1) or n.group(2)) == len(members), (q, a)
    elif m := re.fullmatch(r"(?:What color is the|What is the color of the|Which color does the) (.+?)(?: have)?\?", q):
        assert a == f"The {m.group(1)} is {the_one(m.group(1), objs).colour}.", (q, a)
    elif m := re.fullmatch(r"(?:What shape is the|What is the shape of the|Which shape does the) (.+?)(?: have)?\?", q):
        target = the_one(m.group(1), objs)
        assert target.is_shape
        assert a == f"The {m.group(1)} is {'an' if target.noun[0] in 'aeiou' else 'a'} {target.noun}.", (q, a)
    elif m := re.fullmatch(r"Is the (.+) (?:large or small|small or large)\?|How big is the (.+)\?", q):
        ref = m.group(1) or m.group(2)
        assert a == f"The {ref} is {the_one(ref, objs).size}.", (q, a)
    elif m := re.fullmatch(r"(?:Where is the|In which part of the image is the) (.+?)(?: located)?\?", q):
        assert a == f"The {m.group(1)} is {the_one(m.group(1), objs).where} of the image.", (q, a)
    elif m := re.fullmatch(r"Is the (.+) to the (left|right) of the (.+)\?", q):
        x, y = the_one(m.group(1), objs), the_one(m.group(3), objs)
        truth = left_of(x, y) if m.group(2) == "left" else left_of(y, x)
        assert truth or (left_of(y, x) if m.group(2) == "left" else left_of(x, y)), "asked about overlapping objects"
        assert yes(a) == truth, (q, a)
    elif m := re.fullmatch(r"Which is further to the left, the (.+) or the (.+)\?", q):
        x, y = the_one(m.group(1), objs), the_one(m.group(2), objs)
        winner = m.group(1) if left_of(x, y) else m.group(2)
        assert left_of(x, y) or left_of(y, x)
        assert a == f"The {winner} is further to the left.", (q, a)
    elif m := re.fullmatch(r"Is the (.+) (above|below) the (.+)\?", q):
        x, y = the_one(m.group(1), objs), the_one(m.group(3), objs)
        assert above(x, y) or above(y, x), "asked about vertically overlapping objects"
        assert yes(a) == (above(x, y) if m.group(2) == "above" else above(y, x)), (q, a)
    elif m := re.fullmatch(r"Is the (.+) (larger|smaller) than the (.+)\?", q):
        x, y = the_one(m.group(1), objs), the_one(m.group(3), objs)
        assert max(x.area, y.area) >= 1.5 * min(x.area, y.area), "asked about similar sizes"
        assert yes(a) == ((x.area > y.area) == (m.group(2) == "larger")), (q, a)
    elif m := re.fullmatch(r"(?:Is there|Can you see|Does the picture contain) an? (.+?)(?: in the image)?\?", q):
        phrase = m.group(1)
        members = [o for o in objs if phrase in (o.noun, f"{o.colour} {o.noun}")]
        assert yes(a) == bool(members), (q, a)
        if loc := re.fullmatch(r"Yes, there is an? .+? ((?:in|on|at) the .+) of the image\.", a):
            assert len(members) == 1 and loc.group(1) == members[0].where, (q, a)
        elif count := re.fullmatch(r"Yes, there (?:is|are) (\w+) .+ in the image\.", a):
            assert count.group(1) in ("a", "an") or number(count.group(1)) == len(members), (q, a)
    elif m := re.fullmatch(rf"Which {thing} is (furthest to the left|furthest to the right|closest to the top of the "
                           rf"image|the largest)\?", q):
        ref = re.fullmatch(rf"The (.+) is (?:furthest to the left|furthest to the right|closest to the top of the "
                           rf"image|the largest {thing})\.", a)
        assert ref, a
        best = the_one(ref.group(1), objs)
        others = [o for o in objs if o is not best]
        beats = {"furthest to the left": lambda o: left_of(best, o),
                 "furthest to the right": lambda o: left_of(o, best),
                 "closest to the top of the image": lambda o: above(best, o),
                 "the largest": lambda o: best.area >= 1.5 * o.area}[m.group(1)]
        assert others and all(map(beats, others)), (q, a)
    elif re.fullmatch(r"What is happening in this image\?|What does this picture show\?|"
                      r"What is going on in the picture\?", q):
        assert a.rstrip(".") == record.captions[0].rstrip(".")
    else:
        raise AssertionError(f"unknown conversation question: {q!r}")


def check_detail(answer: str, record: CaptionRecord) -> None:
    objs = objects_of(record)
    sentences = re.split(r"(?<=\.) ", answer)
    if all(o.is_shape for o in objs) and objs:
        first = re.fullmatch(r"The image shows (?:a single shape|(\w+) shapes) on a plain background: (.*)\.",
                             sentences[0])
        assert first, sentences[0]
        assert (number(first.group(1)) if first.group(1) else 1) == len(objs)
        check_inventory(first.group(2), objs)
    else:
        assert sentences[0].rstrip(".") == record.captions[0].rstrip(".")
    for s in sentences[1:]:
        if m := re.fullmatch(r"The (.+) is (.+) of the image\.", s):
            assert the_one(m.group(1), objs).where == m.group(2), s
        elif m := re.fullmatch(r"One of the (.+) is (.+) of the image\.", s):
            assert any(plural(o.label) == m.group(1) and o.where == m.group(2) for o in objs), s
        elif m := re.fullmatch(r"The (\w+) (.+) are (?:all )?(.+) of the image\.", s):
            members = kind_members(m.group(2), objs)
            assert number(m.group(1)) == len(members)
            assert set(re.split(r", | and ", m.group(3))) == {o.where for o in members}, s
        elif m := re.fullmatch(r"The (.+) is ((?:to the (?:left|right) of|above|below)(?: and (?:above|below))?) "
                               r"the (.+)\.", s):
            x, y = the_one(m.group(1), objs), the_one(m.group(3), objs)
            for part in m.group(2).split(" and "):
                ok = {"to the left of": left_of(x, y), "to the right of": left_of(y, x), "above": above(x, y),
                      "below": above(y, x)}[part]
                assert ok, s
        elif m := re.fullmatch(r"The (.+) is the largest (?:shape|object) in the picture\.", s):
            best = the_one(m.group(1), objs)
            assert all(best.area >= 1.5 * o.area for o in objs if o is not best), s
        elif m := re.fullmatch(r"(?:Both|All \w+) shapes are (small|large)\.", s):
            assert {o.size for o in objs} == {m.group(1)}, s
        elif m := re.fullmatch(r"In the picture I can see (.*)\.", s):
            check_inventory(m.group(1), objs)
        else:
            raise AssertionError(f"unknown detail sentence: {s!r}")


def check_reasoning(q: str, a: str, record: CaptionRecord) -> None:
    objs = objects_of(record)
    thing = "(?:shape|object)"
    if m := re.fullmatch(rf"If every (.+) were taken out of the picture, how many {thing}s would be left\?", q):
        removed = kind_members(plural(m.group(1)), objs)
        left = len(objs) - len(removed)
        assert removed
        if left == 0:
            assert a.endswith("s would be left."), a
        else:
            assert a.endswith(f"So the answer is {[w for w, i in NUMBERS.items() if i == left][0]}."), (q, a)
    elif m := re.fullmatch(r"If one more (.+) were added to the picture, how many (.+) would there be\?", q):
        n = len(kind_members(m.group(2), objs)) + 1
        word = [w for w, i in NUMBERS.items() if i == n][0]
        assert a.endswith(f"so there would be {word} {m.group(2) if n > 1 else m.group(1)}."), (q, a)
    elif m := re.fullmatch(rf"If you go through the {thing}s from (left to right|top to bottom), "
                           rf"(what color is|what is) the (\w+) one\?", q):
        horizontal = m.group(1) == "left to right"
        ordered = sorted(objs, key=lambda o: o.x1 if horizontal else o.y1)
        before = left_of if horizontal else above
        assert all(before(x, y) for x, y in zip(ordered, ordered[1:])), "order is not clear-cut"
        target = ordered[["first", "second", "third", "fourth", "fifth"].index(m.group(3))]
        if m.group(2) == "what color is":
            assert a.endswith(f"so its color is {target.colour}."), (q, a)
        else:
            assert a.endswith(f"so the answer is {'an' if target.label[0] in 'aeiou' else 'a'} {target.label}."), a
    elif m := re.fullmatch(r"Are there more (.+) than (.+) in the image\?", q):
        na, nb = len(kind_members(m.group(1), objs)), len(kind_members(m.group(2), objs))
        assert yes(a.split(", so ")[1].capitalize()) == (na > nb), (q, a)
    elif re.fullmatch(r"Do all the shapes in the image have the same color\?|"
                      r"Are all of the shapes the same color\?", q):
        assert yes(a.split(", so ")[1].capitalize()) == (len({o.colour for o in objs}) == 1), (q, a)
    elif m := re.fullmatch(rf"Which {thing} is closest to the (.+)\?", q):
        target = the_one(m.group(1), objs)
        answer_ref = re.search(r"so the (.+) is the closest\.$", a).group(1)
        centre = lambda o: ((o.x1 + o.x2) / 2, (o.y1 + o.y2) / 2)  # noqa: E731
        nearest = min((o for o in objs if o is not target), key=lambda o: math.dist(centre(o), centre(target)))
        assert the_one(answer_ref, objs) is nearest, (q, a)
    else:
        raise AssertionError(f"unknown reasoning question: {q!r}")


def check_short_answer(question: str, answer: str, record: CaptionRecord, category: str | None = None) -> str:
    """Checks a short-answer question (with its suffix) and returns its category."""
    suffix = "\nAnswer the question using a single word or phrase."
    assert question.endswith(suffix)
    q = question[: -len(suffix)]
    objs = objects_of(record)
    # data_gen.vqa's templates, then the training paraphrases (data_gen.paraphrases.CORPUS_TEMPLATES)
    if m := re.fullmatch(r"(?:What color is the|What is the color of the|Which color is the|What colour is the) (.+)\?|"
                         r"Which colour does the (.+) have\?|The (.+) is what color\?|Name the color of the (.+)\.|"
                         r"What color does the (.+) have\?", q):
        found, expected = "color", the_one(next(g for g in m.groups() if g), objs).colour
    elif m := re.fullmatch(r"(?:How many (.+) are there|How many (.+) are in the image|How many (.+) can you see|"
                           r"What is the number of (.+) in the picture)\?|Count the (.+)\.|"
                           r"How many (.+) does the image show\?|Number of (.+)\?|How many (.+) are visible\?", q):
        kind = next(g for g in m.groups() if g)
        found, expected = "count", str(len(kind_members(kind, objs)))
    elif m := re.fullmatch(r"(?:What shape is the|What is the shape of the|Which shape is the|"
                           r"What kind of shape is the) (.+)\?|Name the shape of the (.+)\.|The (.+) is which shape\?|"
                           r"What shape does the (.+) have\?|What is the (.+)\?", q):  # the last after count's
        found, expected = "shape", the_one(next(g for g in m.groups() if g), objs).noun
    elif m := re.fullmatch(r"(?:Is there|Does the image contain|Can you see) an? (.+?)"
                           r"(?: in the image| in the picture)?\?|"
                           r"(?:Is|Do you see|Does the picture have) an? (.+?)(?: present| shown)?\?", q):
        thing = next(g for g in m.groups() if g)
        members = [o for o in objs if thing in (o.noun, f"{o.colour} {o.noun}")]
        found, expected = "exist", "Yes" if members else "No"
    elif m := re.fullmatch(r"(?:Is the (.+) on the left, (?:in the )?center or (?:on the )?right|"
                           r"Which side of the image is the (.+) on: left, center or right|"
                           r"Where is the (.+) horizontally: left, center or right)\?|"
                           r"Left, center or right: where is the (.+)\?|Is the (.+) left, center or right\?|"
                           r"On which side is the (.+): left, center or right\?", q):
        found, expected = "position", the_one(next(g for g in m.groups() if g), objs).col
    elif m := re.fullmatch(r"(?:Is the (.+) at the top, (?:in the )?middle or (?:at the )?bottom(?: of the image)?|"
                           r"Where is the (.+) vertically: top, middle or bottom)\?|"
                           r"Top, middle or bottom: where is the (.+)\?|Is the (.+) top, middle or bottom\?|"
                           r"How high is the (.+): top, middle or bottom\?", q):
        found, expected = "position", the_one(next(g for g in m.groups() if g), objs).row
    else:
        raise AssertionError(f"unknown short-answer question: {q!r}")
    assert answer == expected, (q, answer, expected)
    assert category in (None, found), (q, category, found)
    return found
