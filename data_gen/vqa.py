"""Short-answer visual questions with single-word answers, like LLaVA-1.5's academic VQA mix.

Five categories, each answered from the boxes: `color` ("What color is the circle?" -> "red"), `shape`
("What shape is the red object?" -> "circle"), `count` ("How many circles are there?" -> "2", digits),
`exist` ("Is there a blue square?" -> "Yes" / "No", balanced), `position` ("Is the triangle on the left, center or
right?" -> "left"). A question that could have two right answers (the colour of "the circle" when there are two) is
never asked: no count for a noun with a crowd region or a number in the captions that differs from the boxes, no "No"
for a thing the captions name, no position for an object without one under data_gen.world.position_word (the rule
every response type shares). Every question ends with LLaVA's short-answer instruction.

Two uses: `short_answer_turns` gives several Q/A turns per image as training data (same schema as the other response
types), and `make_question_file` writes an eval question file in LLaVA's format with reference answers, plus a few
open questions without a reference so eval can show the model still answers in sentences.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

from data_gen import world
from data_gen.prompting import stable_rng
from data_gen.records import CaptionRecord, read_captions
from data_gen.world import SceneObject, Vocabulary, plural, with_article
from llava.io import atomic_write_text

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
CATEGORIES = ("color", "shape", "count", "exist", "position")
OPEN_QUESTIONS = ("Describe the image briefly.", "What do you see in this image?",
                  "Tell me about this picture in a sentence or two.")


@dataclass(frozen=True)
class ShortQuestion:
    category: str
    question: str  # without the suffix
    answer: str
    subject: str  # what is asked about; two questions with the same (category, subject) are rephrasings

    @property
    def fact(self) -> tuple[str, str]:
        return self.category, self.subject

    @property
    def text(self) -> str:
        return self.question + SHORT_ANSWER_SUFFIX


@dataclass(frozen=True)
class Facts:
    """What a question may be asked about: the objects, the things certainly absent, and the nouns not to count."""

    objects: list[SceneObject]
    absent: list[str]
    uncounted: dict[str, str]


def _ask_color(facts: Facts, rng: random.Random, want_yes: bool) -> ShortQuestion | None:
    objects = facts.objects
    options = [(o, r) for o in objects if o.colour and (r := world.refer(o, objects, use_colour=False))]
    if not options:
        return None
    obj, ref = rng.choice(options)
    template = rng.choice(["What color is the {}?", "What is the color of the {}?", "Which color is the {}?",
                           "What colour is the {}?"])
    return ShortQuestion("color", template.format(ref), obj.colour, ref)


def _ask_shape(facts: Facts, rng: random.Random, want_yes: bool) -> ShortQuestion | None:
    objects = facts.objects
    options = [(o, r) for o in objects if o.shape and (r := world.refer(o, objects, use_shape=False))]
    if not options:
        return None
    obj, ref = rng.choice(options)
    template = rng.choice(["What shape is the {}?", "What is the shape of the {}?", "Which shape is the {}?",
                           "What kind of shape is the {}?"])
    return ShortQuestion("shape", template.format(ref), obj.shape, ref)


def _ask_count(facts: Facts, rng: random.Random, want_yes: bool) -> ShortQuestion | None:
    """All objects, one noun or (scenes) one colour. Zero counts only for shapes of the closed scene world. Nouns in
    `uncounted` have no number to answer with, and then neither has the whole."""
    objects = facts.objects
    if not objects:
        return None
    all_scene = all(o.is_scene_shape for o in objects)
    options: list[tuple[str, Callable[[SceneObject], bool]]] = [] if facts.uncounted else [("object", lambda o: True)]
    if all_scene:
        options.append(("shape", lambda o: True))
        options += [(s, lambda o, s=s: o.shape == s) for s in world.SCENE_SHAPES]
        colours = sorted({o.colour for o in objects if o.colour})
        options += [(f"{c} object", lambda o, c=c: o.colour == c) for c in colours]
    else:
        options += [(n, lambda o, n=n: o.noun == n) for n in sorted({o.noun for o in objects} - set(facts.uncounted))]
    if not options:
        return None
    phrase, member = rng.choice(options)
    template = rng.choice(["How many {} are there?", "How many {} are in the image?", "How many {} can you see?",
                           "What is the number of {} in the picture?"])
    subject = "object" if phrase == "shape" else phrase  # "shapes" and "objects" are the same question here
    return ShortQuestion("count", template.format(plural(phrase)), str(sum(map(member, objects))), subject)


def _ask_exist(facts: Facts, rng: random.Random, want_yes: bool) -> ShortQuestion | None:
    """`want_yes` decides the answer, so a caller alternating it gets exactly balanced Yes/No questions."""
    objects, absent = facts.objects, facts.absent
    if want_yes:
        present = sorted({f"{o.colour} {o.shape}" if o.is_scene_shape and o.colour else o.noun for o in objects})
        if not present:
            return None
        phrase, answer = rng.choice(present), "Yes"
    else:
        if not absent:
            return None
        phrase, answer = rng.choice(absent), "No"
    template = rng.choice(["Is there {} in the image?", "Is there {}?", "Does the image contain {}?",
                           "Can you see {} in the picture?"])
    return ShortQuestion("exist", template.format(with_article(phrase)), answer, phrase)


def _ask_position(facts: Facts, rng: random.Random, want_yes: bool) -> ShortQuestion | None:
    objects = facts.objects
    horizontal = rng.random() < 0.6
    options = [(o, r) for o in objects if (o.column if horizontal else o.row)
               and (r := world.refer(o, objects, use_position=False))]
    if not options:
        return None
    obj, ref = rng.choice(options)
    if horizontal:
        template = rng.choice(["Is the {} on the left, center or right?",
                               "Is the {} on the left, in the center or on the right?",
                               "Which side of the image is the {} on: left, center or right?",
                               "Where is the {} horizontally: left, center or right?"])
        return ShortQuestion("position", template.format(ref), obj.column, f"{ref} horizontally")
    template = rng.choice(["Is the {} at the top, middle or bottom?",
                           "Is the {} at the top, in the middle or at the bottom of the image?",
                           "Where is the {} vertically: top, middle or bottom?"])
    return ShortQuestion("position", template.format(ref), obj.row, f"{ref} vertically")


ASKERS: dict[str, Callable[..., ShortQuestion | None]] = {
    "color": _ask_color, "shape": _ask_shape, "count": _ask_count, "exist": _ask_exist, "position": _ask_position,
}


def ask(category: str, record: CaptionRecord, vocabulary: Vocabulary, rng: random.Random,
        want_yes: bool = True) -> ShortQuestion | None:
    """One question of `category` about the record, or None when the category has no safe question for it."""
    objects = world.read_objects(record.boxes)
    facts = Facts(objects, world.absent_kinds(objects, vocabulary, record.captions),
                  world.uncounted_nouns(objects, record.captions))
    return ASKERS[category](facts, rng, want_yes)


def check_turns(turns) -> tuple[int, int]:
    """(fewest, most) questions per short-answer sample, checked: two integers with 1 <= fewest <= most."""
    if (not isinstance(turns, (list, tuple)) or len(turns) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in turns) or not 1 <= turns[0] <= turns[1]):
        raise ValueError(f"short-answer turns must be (fewest, most) with 1 <= fewest <= most, got {turns!r}")
    return turns[0], turns[1]


def short_answer_turns(record: CaptionRecord, vocabulary: Vocabulary, seed: int = 0,
                       turns: tuple[int, int] = (3, 5),
                       reword: Callable[[ShortQuestion, random.Random], ShortQuestion] | None = None) -> list[dict]:
    """`turns` = (fewest, most) distinct short-answer questions about one image, as {question, answer} turns (training
    data; fewer when the image has fewer distinct facts). Many turns per image is LLaVA-1.5's packing of all of an
    image's VQA questions into one conversation: the image is encoded once for all of them. `reword(question, rng)`,
    when given, may ask each question in other words (data_gen.paraphrases.training_rewording)."""
    low, high = check_turns(turns)
    rng = stable_rng(seed, record.id, "short_answer")
    return draw_short_answers(record, vocabulary, rng, rng.randint(low, high), reword)


def draw_short_answers(record: CaptionRecord, vocabulary: Vocabulary, rng: random.Random, wanted: int,
                       reword: Callable[[ShortQuestion, random.Random], ShortQuestion] | None = None,
                       category_weights: dict | None = None) -> list[dict]:
    """Up to `wanted` short-answer {question, answer} turns about `record`, no fact asked twice, drawn from `rng`:
    categories alike or by `category_weights` ({category: weight}, unnamed ones 1), `exist` answers alternating
    Yes/No from a random start, each question maybe reworded by `reword` (short_answer_turns)."""
    weights = [category_weights.get(c, 1.0) for c in CATEGORIES] if category_weights else None
    want_yes = rng.random() < 0.5
    asked: list[dict] = []
    facts: set[tuple[str, str]] = set()
    for _ in range(6 * wanted):
        if len(asked) == wanted:
            break
        category = rng.choices(CATEGORIES, weights)[0] if weights else rng.choice(CATEGORIES)
        question = ask(category, record, vocabulary, rng, want_yes)
        if category == "exist":
            want_yes = not want_yes
        if question and question.fact not in facts:
            facts.add(question.fact)
            if reword is not None:
                question = reword(question, rng)
            asked.append({"question": question.text, "answer": question.answer})
    return asked


class QuestionDealer:
    """Deals short-answer questions to a sequence of images: categories round-robin over all of them (a category
    without a safe question for an image passes to the next), `exist` answers alternating Yes/No, no fact asked twice
    of one image. Eval question files of every wording share it, so their category mix is the same."""

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary
        self.turn, self.want_yes = 0, True

    def deal(self, record: CaptionRecord, rng: random.Random, per_image: int) -> Iterator[tuple[str, ShortQuestion]]:
        """Up to `per_image` (category, question) pairs for `record`, drawn lazily: a caller may draw from `rng`
        between two questions."""
        asked: set[tuple[str, str]] = set()
        for _ in range(per_image):
            for _ in range(2 * len(CATEGORIES)):
                category = CATEGORIES[self.turn % len(CATEGORIES)]
                self.turn += 1
                question = ask(category, record, self.vocabulary, rng, self.want_yes)
                if question and question.fact not in asked:
                    break
            else:
                continue
            if category == "exist":
                self.want_yes = not self.want_yes
            asked.add(question.fact)
            yield category, question


def make_question_file(captions_jsonl: str | os.PathLike, out_jsonl: str | os.PathLike, seed: int = 0,
                       per_image: int = 3, open_every: int = 10, skip_bad: bool = False) -> dict:
    """Write an eval question file: lines {"question_id", "image", "text", "category", "answer"}.

    Categories are dealt round-robin over the whole file (a category without a safe question for an image passes to
    the next), `exist` answers alternate Yes/No, and every `open_every`-th image also gets one `open` question
    without an "answer" key. Use captions of images held out from training. Returns counts per category.
    """
    records, _ = read_captions(captions_jsonl, skip_bad=skip_bad)
    vocabulary = Vocabulary.from_boxes(b for r in records for b in r.boxes)
    lines: list[str] = []
    counts: Counter = Counter()
    dealer = QuestionDealer(vocabulary)
    for image_index, record in enumerate(records):
        rng = stable_rng(seed, record.id, "question-file")
        for k, (category, question) in enumerate(dealer.deal(record, rng, per_image)):
            if category == "exist":
                counts[f"exist_{question.answer.lower()}"] += 1
            counts[category] += 1
            lines.append(json.dumps({"question_id": f"{record.id}_q{k}", "image": record.image,
                                     "text": question.text, "category": category, "answer": question.answer}))
        if open_every and image_index % open_every == 0:
            counts["open"] += 1
            lines.append(json.dumps({"question_id": f"{record.id}_open", "image": record.image,
                                     "text": rng.choice(OPEN_QUESTIONS), "category": "open"}))
    atomic_write_text(out_jsonl, "".join(line + "\n" for line in lines))
    return {"images": len(records), "questions": len(lines), **dict(sorted(counts.items()))}
