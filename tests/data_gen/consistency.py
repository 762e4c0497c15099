"""A template-free consistency checker for generated samples, written apart from data_gen's rules.

Where answer_oracle.py knows every question template, this checker reads any sample text the way a strict reader would
and checks three things against the image's own truth (its boxes, crowd regions and captions, given here directly,
e.g. straight from a COCO file):

- every object an answer names exists (a box or a crowd region of that noun), and every "no X" is about a noun with
  neither a box nor a crowd region that no caption names;
- every number an answer states for a noun equals its box count, is not stated for a noun with a crowd region, and
  agrees with a number a caption gives it ("three dogs"); "many" is only said of a crowd or of what a caption calls
  many; short answers ("2", "Yes", "No") agree with the same facts;
- no position phrase ("in the top left corner", "on the left", a one-word "left") is about an object whose box spans
  more than half the image, whose centre lies within 0.04 of a line between thirds, or that is a crowd region.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from data_gen.world import plural  # English only; every fact below is computed here

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
           "seventeen eighteen nineteen twenty").split()
SIZES, COLOURS = {"small", "large"}, {"red", "green", "blue", "yellow", "purple", "orange"}
SHAPES = {"circle", "square", "triangle"}
GENERIC = {"object", "shape"}  # all objects together
MANY = {"many", "several", "crowd", "group", "groups", "herd", "flock", "lots", "numerous", "dozens", "bunch"}
MARGIN, WIDEST = 0.04, 0.5


@dataclass(frozen=True)
class Thing:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    crowd: bool = False

    @property
    def words(self) -> list[str]:
        return self.label.split()

    @property
    def noun(self) -> str:
        scene = len(self.words) == 3 and self.words[-1] in SHAPES
        return self.words[-1] if scene else self.label

    def has(self, attribute: str) -> bool:
        return attribute in self.words[:-1]

    def axis(self, axis: str) -> str | None:
        """Where the box lies along "col" or "row", or None when a reader could place it either side."""
        lo, hi = (self.x1, self.x2) if axis == "col" else (self.y1, self.y2)
        centre = (lo + hi) / 2
        if self.crowd or hi - lo > WIDEST or min(abs(centre - 1 / 3), abs(centre - 2 / 3)) < MARGIN:
            return None
        words = ("left", "center", "right") if axis == "col" else ("top", "middle", "bottom")
        return words[0] if centre < 1 / 3 else words[1] if centre < 2 / 3 else words[2]


@dataclass
class Truth:
    things: list[Thing]
    captions: list[str]


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


def amount(word: str) -> int | None:
    return int(word) if word.isdigit() else NUMBERS.index(word) if word in NUMBERS else None


# Position phrases and the axes they place: (regex, {axis: word}).
_PLACES = [(re.compile(rf"\bin the (top|bottom) (left|right) corner\b"), lambda m: {"row": m[1], "col": m[2]}),
           (re.compile(r"\bon the (left|right) side\b"), lambda m: {"row": "middle", "col": m[1]}),
           (re.compile(r"\bat the (top|bottom) center\b"), lambda m: {"row": m[1], "col": "center"}),
           (re.compile(r"\b(?:is|are) in the center\b|\bin the center of the image\b"),
            lambda m: {"row": "middle", "col": "center"}),
           (re.compile(r"\bin the center\b"), lambda m: {"col": "center"}),
           (re.compile(r"\bon the (left|right)\b(?! side)"), lambda m: {"col": m[1]}),
           (re.compile(r"\bat the (top|bottom)\b(?! center)"), lambda m: {"row": m[1]}),
           (re.compile(r"\bin the middle\b"), lambda m: {"row": "middle"})]
# The answer options of short-answer position questions are not positions of anything.
_OPTIONS = re.compile(r"(?:on the )?left, (?:in the )?center or (?:on the )?right|"
                      r"(?:at the )?top, (?:in the )?middle or (?:at the )?bottom(?: of the image)?")


class Checker:
    """`nouns`: every label of the dataset (scene labels are read as "size colour shape")."""

    def __init__(self, labels):
        self.forms: dict[tuple[str, ...], tuple[str, bool]] = {}
        for label in set(labels):
            noun = Thing(label, 0, 0, 1, 1).noun
            self.forms[tuple(plural(noun).split())] = (noun, True)
            self.forms[tuple(noun.split())] = (noun, False)
        for noun in SHAPES | GENERIC:
            self.forms.setdefault(tuple(plural(noun).split()), (noun, True))
            self.forms.setdefault((noun,), (noun, False))

    def mentions(self, text: str) -> list[dict]:
        """Noun mentions in order: noun, plural, attribute words and the quantity word before it, character span."""
        tokens = [(m.group(), m.start(), m.end()) for m in re.finditer(r"[a-z]+|\d+", text.lower())]
        found, i = [], 0
        longest = max(len(f) for f in self.forms)
        while i < len(tokens):
            for n in range(longest, 0, -1):
                key = tuple(t for t, _, _ in tokens[i:i + n])
                if len(key) == n and key in self.forms:
                    j, attributes = i - 1, []
                    while j >= 0 and tokens[j][0] in SIZES | COLOURS and len(attributes) < 2:
                        attributes.append(tokens[j][0])
                        j -= 1
                    quantity = tokens[j][0] if j >= 0 else None
                    before = tokens[j - 1][0] if j >= 1 else None
                    if quantity == "many" and before in ("as", "how", "too"):
                        quantity = None
                    after = tokens[i + n][0] if i + n < len(tokens) else None
                    noun, is_plural = self.forms[key]
                    found.append({"noun": noun, "plural": is_plural, "attributes": attributes, "quantity": quantity,
                                  "of": after == "of", "start": tokens[i][1], "end": tokens[i + n - 1][2]})
                    i += n
                    break
            else:
                i += 1
        return found

    # -----------------------------------------------------------------------------------------------------------------

    def check(self, question: str, answer: str, truth: Truth) -> None:
        """Raises AssertionError naming the question, the answer and what is wrong."""
        where = f"{question!r} -> {answer!r}"
        short = question.endswith("Answer the question using a single word or phrase.")
        if short:
            self._check_short(question.split("\n")[0], answer, truth, where)
        else:
            self._check_places(question, truth, where)
            self._check_text(answer, truth, where)

    def _members(self, mention: dict, truth: Truth) -> list[Thing]:
        if mention["noun"] in GENERIC:
            return [t for t in truth.things if all(t.has(a) for a in mention["attributes"])]
        return [t for t in truth.things if t.noun == mention["noun"] and all(t.has(a) for a in mention["attributes"])]

    def _named_in_captions(self, mention: dict, truth: Truth) -> bool:
        phrase = " ".join(reversed(mention["attributes"]))
        for form in (mention["noun"], plural(mention["noun"])):
            target = words_of(f"{phrase} {form}")
            for caption in truth.captions:
                words = words_of(caption)
                if any(words[i:i + len(target)] == target for i in range(len(words))):
                    return True
        return False

    def _caption_numbers(self, noun: str, truth: Truth) -> set[int]:
        """Numbers captions put right before the plural: "three dogs"."""
        many = words_of(plural(noun))
        found = set()
        for caption in truth.captions:
            words = words_of(caption)
            for i in range(1, len(words)):
                if words[i:i + len(many)] == many and amount(words[i - 1]) is not None:
                    found.add(amount(words[i - 1]))
        return found

    def _check_count(self, mention: dict, n: int, truth: Truth, where: str) -> None:
        members = self._members(mention, truth)
        assert not any(t.crowd for t in members), f"{where}: states {n} {mention['noun']} for a crowd region"
        assert n == len(members), f"{where}: states {n} {mention['noun']}, the boxes hold {len(members)}"
        stated = self._caption_numbers(mention["noun"], truth) if mention["noun"] not in GENERIC else set()
        assert stated <= {n}, f"{where}: states {n} {mention['noun']}, a caption says {stated}"

    def _check_absent(self, mention: dict, truth: Truth, where: str) -> None:
        assert not self._members(mention, truth), f"{where}: denies {mention['noun']} that the boxes hold"
        assert not self._named_in_captions(mention, truth), f"{where}: denies {mention['noun']} a caption names"

    def _check_text(self, answer: str, truth: Truth, where: str) -> None:
        for caption in truth.captions:  # an answer may quote a caption: that is the image's own word
            answer = answer.replace(caption[:1].upper() + caption[1:], "").replace(caption, "")
        for sentence in re.split(r"(?<=[.!?])\s+", answer):
            self._check_places(sentence, truth, where)
            hypothetical = re.search(r"\bwould\b|^If\b|\bAdding\b", sentence) is not None
            listing = re.match(r"(Yes, )?[Tt]here (is|are)\b|In the picture I can see\b|The image shows\b", sentence)
            for mention in self.mentions(sentence):
                members = self._members(mention, truth)
                quantity = mention["quantity"]
                if hypothetical and quantity == "no":  # "no objects would be left": what if, not what is
                    continue
                if quantity == "no":
                    self._check_absent(mention, truth, where)
                    continue
                if mention["noun"] not in GENERIC and quantity not in ("than", "as"):  # "more dogs than cats"
                    assert members, f"{where}: names {mention['noun']}, which has no box or crowd region"
                if hypothetical or mention["of"]:
                    continue
                if quantity in MANY:
                    crowd = any(t.crowd for t in members)
                    said = any(set(words_of(c)) & MANY and plural(mention["noun"]) in c.lower() for c in truth.captions)
                    assert crowd or said, f"{where}: says many {mention['noun']} without a crowd or a caption"
                elif quantity == "some":
                    assert not any(t.crowd for t in members) and members, f"{where}: 'some' {mention['noun']}"
                elif quantity is not None and amount(quantity) is not None:
                    if mention["noun"] not in GENERIC or listing:
                        self._check_count(mention, amount(quantity), truth, where)
                elif quantity in ("a", "an") and listing and mention["noun"] not in GENERIC:
                    self._check_count(mention, 1, truth, where)

    def _check_places(self, text: str, truth: Truth, where: str) -> None:
        text = _OPTIONS.sub("", text)
        mentions = self.mentions(text)
        for pattern, axes in _PLACES:
            for m in pattern.finditer(text.lower()):
                if any(m.start() >= other.start() and m.end() <= other.end() and other.group() != m.group()
                       for p, _ in _PLACES for other in p.finditer(text.lower())):
                    continue  # part of a longer phrase ("on the left side" also holds "on the left")
                subject = [x for x in mentions if x["end"] <= m.start()]
                assert subject, f"{where}: position {m.group()!r} about nothing"
                self._check_place(subject[-1], axes(m), truth, where)

    def _check_place(self, mention: dict, axes: dict, truth: Truth, where: str) -> None:
        """Every object the phrase could be about has a clear position on those axes, and one is there."""
        members = self._members(mention, truth)
        for thing in members:
            for axis in axes:
                assert thing.axis(axis) is not None, (f"{where}: places {thing.label} {tuple(axes.values())} but its "
                                                      f"box {thing.x1, thing.y1, thing.x2, thing.y2} has no clear "
                                                      f"{axis} (crowd={thing.crowd})")
        assert any(all(t.axis(a) == w for a, w in axes.items()) for t in members), f"{where}: wrong place {axes}"

    def _check_short(self, question: str, answer: str, truth: Truth, where: str) -> None:
        self._check_places(question, truth, where)
        about = [m for m in self.mentions(question)]
        if answer in ("left", "center", "right", "top", "middle", "bottom"):
            axis = "col" if answer in ("left", "center", "right") else "row"
            assert about, where
            self._check_place(about[0], {axis: answer}, truth, where)
        elif answer in ("Yes", "No"):
            assert about and re.match(r"Is there|Does the image contain|Can you see", question), where
            if answer == "No":
                self._check_absent(about[0], truth, where)
            else:
                assert self._members(about[0], truth), f"{where}: says Yes without a box or crowd region"
        elif answer.isdigit():
            assert about and question.startswith(("How many", "What is the number of")), where
            self._check_count(about[0], int(answer), truth, where)
        else:
            assert answer in COLOURS | SHAPES, f"{where}: unexpected short answer"


def check_samples(samples: list[dict], truths: dict[str, Truth], checker: Checker) -> int:
    """Checks every turn of LLaVA instruction samples ({"image", "conversations"}); `truths` by image. Returns the
    number of turns checked."""
    checked = 0
    for sample in samples:
        turns = sample["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].replace("<image>\n", "")
            checker.check(question, gpt["value"], truths[sample["image"]])
            checked += 1
    return checked
