"""Offline backend: conversation, detailed description and complex reasoning written from captions + boxes alone.

Deterministic (seeded by seed, image id and type) and precise: every answer is computed from the boxes with the rules
in data_gen.world, and questions that could have two right answers are never asked. A tiny model trained on this data
can only learn to answer visual questions if the answers never contradict each other, so the phrasing varies while the
facts and the words for them (position phrases, counts) stay fixed. Scene labels ("large red circle") give colours,
shapes and sizes; plain labels ("dog") still give counts, positions and relations.

Nothing generated may contradict the image's own captions or boxes: a crowd region (COCO's iscrowd) makes its noun
present and "many", never a number; a noun the captions give another number for is not counted; "Is there a ...? No"
is only asked about things with no box, no crowd and no mention in the captions; and a position is only stated for an
object that has one under the single rule in data_gen.world.position_word.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from data_gen import world
from data_gen.prompting import pick_detail_question, stable_rng
from data_gen.records import CaptionRecord
from data_gen.world import SceneObject, Vocabulary, capitalise, count_phrase, number_word, plural, with_article

Turn = tuple[str, str]
ORDINALS = ("first", "second", "third", "fourth", "fifth")


@dataclass(frozen=True)
class Context:
    record: CaptionRecord
    objects: list[SceneObject]
    absent: list[str]
    uncounted: dict[str, str]  # noun -> amount word ("many", "some") for nouns whose number must not be stated

    @property
    def all_scene(self) -> bool:
        return bool(self.objects) and all(o.is_scene_shape for o in self.objects)

    @property
    def thing(self) -> str:
        """What the objects are called collectively."""
        return "shape" if self.all_scene else "object"


class OfflineBackend:
    """Same contract as the GPT backend: `generate(record, response_type)` returns a list of {question, answer}
    (empty when there is nothing certain to ask about, e.g. reasoning for an image without boxes)."""

    source = "offline"

    def __init__(self, vocabulary: Vocabulary = Vocabulary(), seed: int = 0):
        self.vocabulary = vocabulary
        self.seed = seed

    def generate(self, record: CaptionRecord, response_type: str) -> list[dict]:
        objects = world.read_objects(record.boxes)
        ctx = Context(record, objects, world.absent_kinds(objects, self.vocabulary, record.captions),
                      world.uncounted_nouns(objects, record.captions))
        rng = stable_rng(self.seed, record.id, response_type)
        if response_type == "conversation":
            turns = conversation(ctx, rng)
        elif response_type == "detail":
            turns = [(pick_detail_question(self.seed, record.id), detailed_description(ctx))]
        elif response_type == "reasoning":
            turns = reasoning(ctx, rng)
        else:
            raise ValueError(f"the offline backend writes conversation, detail and reasoning, not {response_type!r}")
        return [{"question": q, "answer": a} for q, a in turns]


def _is_are(n: int) -> str:
    return "is" if n == 1 else "are"


def _refs(ctx: Context, **switches) -> list[tuple[SceneObject, str]]:
    return [(o, ref) for o in ctx.objects if (ref := world.refer(o, ctx.objects, **switches)) is not None]


@dataclass(frozen=True)
class Kind:
    """A countable kind: a noun ("circle", "dog") or, for scene shapes, a colour ("red shape")."""

    phrase: str
    group: str  # "noun" or "colour": counts are only compared within a group
    member: Callable[[SceneObject], bool]


def _kinds(ctx: Context) -> list[Kind]:
    """For scene images absent shapes count too: zero is a precise answer in a closed world."""
    nouns = sorted({o.noun for o in ctx.objects} | (set(world.SCENE_SHAPES) if ctx.all_scene else set()))
    kinds = [Kind(noun, "noun", lambda o, n=noun: o.noun == n) for noun in nouns]
    if ctx.all_scene:
        colours = sorted({o.colour for o in ctx.objects if o.colour})
        kinds += [Kind(f"{c} {ctx.thing}", "colour", lambda o, c=c: o.colour == c) for c in colours]
    return kinds


def _listing(objects: Sequence[SceneObject]) -> str:
    return world.join_list([with_article(o.label) for o in objects])


# ---------------------------------------------------------------------------------------------------------------------
# Conversation: several questions with definite answers.

def conversation(ctx: Context, rng: random.Random) -> list[Turn]:
    makers = [_ask_count_all, _ask_count_kind, _ask_colour, _ask_shape, _ask_size, _ask_where, _ask_horizontal,
              _ask_vertical, _ask_larger, _ask_exists, _ask_extreme, _ask_what_is_shown]
    rng.shuffle(makers)
    wanted = rng.randint(3, 5)
    turns: list[Turn] = []
    for make in makers:
        turn = make(ctx, rng)
        if turn and turn[0] not in {q for q, _ in turns}:
            turns.append(turn)
        if len(turns) == wanted:
            break
    return turns


def _ask_count_all(ctx: Context, rng: random.Random) -> Turn | None:
    if not ctx.objects or ctx.uncounted:
        return None
    n, thing = len(ctx.objects), ctx.thing
    question = rng.choice([f"How many {thing}s are in the image?", f"How many {thing}s can you see?",
                           f"Count the {thing}s in this picture.", f"How many {thing}s does the picture show?"])
    if n == 1:
        return question, f"There is one {thing}: {with_article(ctx.objects[0].label)}."
    return question, f"There are {number_word(n)} {thing}s: {world.inventory(ctx.objects)}."


def _ask_count_kind(ctx: Context, rng: random.Random) -> Turn | None:
    """A crowd's noun is answered "many"; a noun whose captions give another number is not asked about."""
    kinds = [k for k in _kinds(ctx) if ctx.uncounted.get(k.phrase, "many") == "many"]
    if not kinds:
        return None
    kind = rng.choice(kinds)
    phrase = kind.phrase
    matching = [o for o in ctx.objects if kind.member(o)]
    n = len(matching)
    question = rng.choice([f"How many {plural(phrase)} are there?", f"How many {plural(phrase)} can you see?",
                           f"How many {plural(phrase)} are in the picture?"])
    if phrase in ctx.uncounted:
        return question, f"There are many {plural(phrase)} in the image, too many to count one by one."
    if n == 0:
        return question, f"There are no {plural(phrase)} in the image."
    answer = f"There is one {phrase}" if n == 1 else f"There are {count_phrase(n, phrase)}"
    if ctx.all_scene and any(o.label != phrase for o in matching):
        answer += f": {world.inventory(matching)}" if n > 1 else f", {with_article(matching[0].label)}"
    return question, answer + "."


def _ask_colour(ctx: Context, rng: random.Random) -> Turn | None:
    options = [(o, ref) for o, ref in _refs(ctx, use_colour=False) if o.colour]
    if not options:
        return None
    obj, ref = rng.choice(options)
    question = rng.choice([f"What color is the {ref}?", f"What is the color of the {ref}?",
                           f"Which color does the {ref} have?"])
    return question, f"The {ref} is {obj.colour}."


def _ask_shape(ctx: Context, rng: random.Random) -> Turn | None:
    options = [(o, ref) for o, ref in _refs(ctx, use_shape=False) if o.shape]
    if not options:
        return None
    obj, ref = rng.choice(options)
    question = rng.choice([f"What shape is the {ref}?", f"What is the shape of the {ref}?",
                           f"Which shape does the {ref} have?"])
    return question, f"The {ref} is {with_article(obj.shape)}."


def _ask_size(ctx: Context, rng: random.Random) -> Turn | None:
    options = [(o, ref) for o, ref in _refs(ctx, use_size=False) if o.size]
    if not options:
        return None
    obj, ref = rng.choice(options)
    question = rng.choice([f"Is the {ref} large or small?", f"Is the {ref} small or large?",
                           f"How big is the {ref}?"])
    return question, f"The {ref} is {obj.size}."


def _ask_where(ctx: Context, rng: random.Random) -> Turn | None:
    options = [(o, ref) for o, ref in _refs(ctx, use_position=False) if o.location]
    if not options:
        return None
    obj, ref = rng.choice(options)
    question = rng.choice([f"Where is the {ref}?", f"Where is the {ref} located?",
                           f"In which part of the image is the {ref}?"])
    return question, f"The {ref} is {obj.location} of the image."


def _pairs(ctx: Context, related: Callable[[SceneObject, SceneObject], bool],
           rng: random.Random) -> tuple[SceneObject, str, SceneObject, str] | None:
    """A random ordered pair (a, b) of distinctly described objects with related(a, b) or related(b, a)."""
    refs = _refs(ctx, use_position=False)
    pairs = [(a, ra, b, rb) for (a, ra), (b, rb) in itertools.permutations(refs, 2)
             if ra != rb and (related(a, b) or related(b, a))]
    return rng.choice(pairs) if pairs else None


def _ask_horizontal(ctx: Context, rng: random.Random) -> Turn | None:
    pair = _pairs(ctx, world.left_of, rng)
    if pair is None:
        return None
    a, ra, b, rb = pair
    truly_left = world.left_of(a, b)
    if rng.random() < 0.3:
        question = f"Which is further to the left, the {ra} or the {rb}?"
        return question, f"The {ra if truly_left else rb} is further to the left."
    asked = rng.choice(["left", "right"])
    question = f"Is the {ra} to the {asked} of the {rb}?"
    if (asked == "left") == truly_left:
        return question, f"Yes, the {ra} is to the {asked} of the {rb}."
    actual = "left" if truly_left else "right"
    return question, f"No, the {ra} is to the {actual} of the {rb}."


def _ask_vertical(ctx: Context, rng: random.Random) -> Turn | None:
    pair = _pairs(ctx, world.above, rng)
    if pair is None:
        return None
    a, ra, b, rb = pair
    truly_above = world.above(a, b)
    asked = rng.choice(["above", "below"])
    question = f"Is the {ra} {asked} the {rb}?"
    if (asked == "above") == truly_above:
        return question, f"Yes, the {ra} is {asked} the {rb}."
    return question, f"No, the {ra} is {'above' if truly_above else 'below'} the {rb}."


def _ask_larger(ctx: Context, rng: random.Random) -> Turn | None:
    refs = _refs(ctx, use_size=False, use_position=False)
    pairs = [(a, ra, b, rb) for (a, ra), (b, rb) in itertools.permutations(refs, 2)
             if ra != rb and (world.clearly_larger(a, b) or world.clearly_larger(b, a))]
    if not pairs:
        return None
    a, ra, b, rb = rng.choice(pairs)
    bigger = world.clearly_larger(a, b)
    asked = rng.choice(["larger", "smaller"])
    question = f"Is the {ra} {asked} than the {rb}?"
    if (asked == "larger") == bigger:
        return question, f"Yes, the {ra} is {asked} than the {rb}."
    return question, f"No, the {ra} is {'larger' if bigger else 'smaller'} than the {rb}."


def _ask_exists(ctx: Context, rng: random.Random) -> Turn | None:
    present = sorted({f"{o.colour} {o.shape}" if o.is_scene_shape and o.colour else o.noun for o in ctx.objects})
    want_yes = rng.random() < 0.5
    if not ctx.absent or (want_yes and present):
        if not present:
            return None
        phrase = rng.choice(present)
        matching = [o for o in ctx.objects if phrase in (o.noun, f"{o.colour} {o.shape}")]
    else:
        phrase, matching = rng.choice(ctx.absent), []
    question = rng.choice([f"Is there {with_article(phrase)} in the image?", f"Can you see {with_article(phrase)}?",
                           f"Does the picture contain {with_article(phrase)}?"])
    if not matching:
        return question, f"No, there is no {phrase} in the image."
    if matching[0].noun in ctx.uncounted:
        return question, f"Yes, there are {ctx.uncounted[matching[0].noun]} {plural(phrase)} in the image."
    if len(matching) == 1 and matching[0].location:
        return question, f"Yes, there is {with_article(phrase)} {matching[0].location} of the image."
    return question, f"Yes, there {_is_are(len(matching))} {count_phrase(len(matching), phrase)} in the image."


def _extreme(ctx: Context, key: Callable[[SceneObject], float],
             beats: Callable[[SceneObject, SceneObject], bool]) -> tuple[SceneObject, str] | None:
    """The object that beats every other one (e.g. lies entirely left of all others), with its description."""
    if len(ctx.objects) < 2:
        return None
    best = min(ctx.objects, key=key)
    if not all(beats(best, o) for o in ctx.objects if o is not best):
        return None
    ref = world.refer(best, ctx.objects)
    return (best, ref) if ref else None


def _ask_extreme(ctx: Context, rng: random.Random) -> Turn | None:
    thing = ctx.thing
    options = [
        (lambda o: o.x1, world.left_of, f"Which {thing} is furthest to the left?", "furthest to the left"),
        (lambda o: -o.x2, lambda a, b: world.left_of(b, a), f"Which {thing} is furthest to the right?",
         "furthest to the right"),
        (lambda o: o.y1, world.above, f"Which {thing} is closest to the top of the image?",
         "closest to the top of the image"),
        (lambda o: -o.area, world.clearly_larger, f"Which {thing} is the largest?", f"the largest {thing}"),
    ]
    rng.shuffle(options)
    for key, beats, question, what in options:
        found = _extreme(ctx, key, beats)
        if found:
            return question, f"The {found[1]} is {what}."
    return None


def _ask_what_is_shown(ctx: Context, rng: random.Random) -> Turn | None:
    """For photos the people who saw the image say best what happens in it; scene captions add nothing."""
    if ctx.all_scene:
        return None
    question = rng.choice(["What is happening in this image?", "What does this picture show?",
                           "What is going on in the picture?"])
    return question, _sentence(ctx.record.captions[0])


def _sentence(text: str) -> str:
    text = capitalise(text.strip())
    return text if text.endswith((".", "!", "?")) else text + "."


# ---------------------------------------------------------------------------------------------------------------------
# Detailed description: one paragraph, the same structure every time.

def detailed_description(ctx: Context) -> str:
    objects = ctx.objects
    sentences: list[str] = []
    if ctx.all_scene:
        if len(objects) == 1:
            sentences.append(f"The image shows a single shape on a plain background: {with_article(objects[0].label)}.")
        else:
            sentences.append(f"The image shows {number_word(len(objects))} shapes on a plain background: "
                             f"{world.inventory(objects)}.")
        sentences += _object_locations(ctx)
    else:
        sentences.append(_sentence(ctx.record.captions[0]))
        if objects:
            sentences.append(f"In the picture I can see {world.inventory(objects, ctx.uncounted)}.")
            sentences += _group_locations(ctx)
    sentences += _relation_sentences(ctx)
    sentences += _size_sentences(ctx)
    return " ".join(sentences)


def _object_locations(ctx: Context) -> list[str]:
    sentences = []
    for obj in sorted(ctx.objects, key=lambda o: (o.x1, o.y1)):
        if not obj.location:
            continue
        ref = world.refer(obj, ctx.objects, use_position=False)
        if ref:
            sentences.append(f"The {ref} is {obj.location} of the image.")
        else:
            sentences.append(f"One of the {plural(obj.label)} is {obj.location} of the image.")
    return sentences


def _group_locations(ctx: Context) -> list[str]:
    """Where each kind of object is, largest kinds first. Kinds of more than four, uncounted kinds and kinds with a
    member without a position are not placed: "the two dogs are on the left" must not skip the third one."""
    groups: dict[str, list[SceneObject]] = {}
    for obj in ctx.objects:
        groups.setdefault(obj.noun, []).append(obj)
    ordered = sorted(groups.items(), key=lambda kv: -sum(o.area for o in kv[1]))
    sentences = []
    for noun, members in ordered[:4]:
        if len(members) > 4 or noun in ctx.uncounted or not all(o.location for o in members):
            continue
        places = list(dict.fromkeys(o.location for o in sorted(members, key=lambda o: (o.x1, o.y1))))
        if len(members) == 1:
            sentences.append(f"The {noun} is {places[0]} of the image.")
        elif len(places) == 1:
            sentences.append(f"The {number_word(len(members))} {plural(noun)} are all {places[0]} of the image.")
        else:
            sentences.append(f"The {number_word(len(members))} {plural(noun)} are {world.join_list(places)} "
                             "of the image.")
    return sentences


def _relation_sentences(ctx: Context, limit: int = 2) -> list[str]:
    refs = _refs(ctx, use_position=False)
    refs.sort(key=lambda pair: -pair[0].area)
    sentences = []
    for (a, ra), (b, rb) in itertools.combinations(refs[:4], 2):
        if ra == rb:
            continue
        parts = []
        if world.left_of(a, b) or world.left_of(b, a):
            parts.append("to the left of" if world.left_of(a, b) else "to the right of")
        if world.above(a, b) or world.above(b, a):
            parts.append("above" if world.above(a, b) else "below")
        if parts:
            sentences.append(f"The {ra} is {world.join_list(parts)} the {rb}.")
        if len(sentences) == limit:
            break
    return sentences


def _size_sentences(ctx: Context) -> list[str]:
    objects = ctx.objects
    if len(objects) < 2:
        return []
    largest = _extreme(ctx, lambda o: -o.area, world.clearly_larger)
    if largest:
        return [f"The {largest[1]} is the largest {ctx.thing} in the picture."]
    sizes = {o.size for o in objects}
    if ctx.all_scene and len(sizes) == 1 and None not in sizes:
        everyone = "Both" if len(objects) == 2 else f"All {number_word(len(objects))}"
        return [f"{everyone} shapes are {sizes.pop()}."]
    return []


# ---------------------------------------------------------------------------------------------------------------------
# Complex reasoning: one question, an answer that states the facts, reasons, then concludes.

def reasoning(ctx: Context, rng: random.Random) -> list[Turn]:
    makers = [_reason_remove, _reason_add, _reason_order, _reason_compare_counts, _reason_same_colour,
              _reason_nearest]
    rng.shuffle(makers)
    for make in makers:
        turn = make(ctx, rng)
        if turn:
            return [turn]
    return []


def _how_many(n: int, phrase: str) -> str:
    """ "no squares", "one triangle", "two circles": counts stated as numbers in reasoning."""
    return f"no {plural(phrase)}" if n == 0 else f"one {phrase}" if n == 1 else f"{number_word(n)} {plural(phrase)}"


def _objects_sentence(ctx: Context) -> str:
    if len(ctx.objects) == 1:
        return f"There is one {ctx.thing} in the image, {with_article(ctx.objects[0].label)}."
    return f"There are {_how_many(len(ctx.objects), ctx.thing)} in the image: {world.inventory(ctx.objects)}."


def _reason_remove(ctx: Context, rng: random.Random) -> Turn | None:
    present = [k for k in _kinds(ctx) if any(map(k.member, ctx.objects))]
    if not present or ctx.uncounted:
        return None
    kind = rng.choice(present)
    phrase, thing = kind.phrase, ctx.thing
    removed = [o for o in ctx.objects if kind.member(o)]
    left = [o for o in ctx.objects if not kind.member(o)]
    question = f"If every {phrase} were taken out of the picture, how many {thing}s would be left?"
    k, m = len(removed), len(left)
    steps = [_objects_sentence(ctx)]
    if not left:
        whole = "It is" if k == 1 else "Both of them are" if k == 2 else "All of them are"
        pronoun = "it" if k == 1 else "them"
        steps.append(f"{whole} {with_article(phrase) if k == 1 else plural(phrase)}, so taking {pronoun} away "
                     f"leaves nothing: no {thing}s would be left.")
    else:
        steps.append(f"{capitalise(number_word(k))} of them {_is_are(k)} "
                     f"{with_article(phrase) if k == 1 else plural(phrase)}.")
        steps.append(f"Taking {'it' if k == 1 else 'them'} away leaves {_how_many(m, thing)}: "
                     f"{world.inventory(left)}.")
        steps.append(f"So the answer is {number_word(m)}.")
    return question, " ".join(steps)


def _reason_add(ctx: Context, rng: random.Random) -> Turn | None:
    present = sorted({o.noun for o in ctx.objects} - set(ctx.uncounted))
    if not present:
        return None
    noun = rng.choice(present)
    k = sum(o.noun == noun for o in ctx.objects)
    question = f"If one more {noun} were added to the picture, how many {plural(noun)} would there be?"
    answer = (f"Right now there {_is_are(k)} {_how_many(k, noun)} in the image. Adding one more gives "
              f"{number_word(k)} plus one, which is {number_word(k + 1)}, so there would be {_how_many(k + 1, noun)}.")
    return question, answer


def _reason_order(ctx: Context, rng: random.Random) -> Turn | None:
    """Reading order along one axis, only when each object lies entirely past the previous one."""
    if not 2 <= len(ctx.objects) <= len(ORDINALS) or ctx.uncounted:
        return None
    horizontal = rng.random() < 0.6
    key = (lambda o: o.x1) if horizontal else (lambda o: o.y1)
    before = world.left_of if horizontal else world.above
    ordered = sorted(ctx.objects, key=key)
    if not all(before(a, b) for a, b in zip(ordered, ordered[1:])):
        return None
    index = rng.randrange(len(ordered))
    target = ordered[index]
    direction = "from left to right" if horizontal else "from top to bottom"
    if target.colour:
        asked, answer = "what color is", f"so its color is {target.colour}"
    else:
        asked, answer = "what is", f"so the answer is {with_article(target.label)}"
    question = f"If you go through the {ctx.thing}s {direction}, {asked} the {ORDINALS[index]} one?"
    steps = (f"Going {direction}, the {ctx.thing}s come in this order: {_listing(ordered)}. "
             f"The {ORDINALS[index]} one is {with_article(target.label)}, {answer}.")
    return question, steps


def _reason_compare_counts(ctx: Context, rng: random.Random) -> Turn | None:
    kinds = [k for k in _kinds(ctx) if (ctx.all_scene or any(map(k.member, ctx.objects)))
             and k.phrase not in ctx.uncounted]
    pairs = [(a, b) for a, b in itertools.permutations(kinds, 2)
             if a.group == b.group and any(a.member(o) or b.member(o) for o in ctx.objects)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    pa, pb = a.phrase, b.phrase
    na, nb = sum(map(a.member, ctx.objects)), sum(map(b.member, ctx.objects))
    question = f"Are there more {plural(pa)} than {plural(pb)} in the image?"
    facts = f"There {_is_are(na)} {_how_many(na, pa)} and {_how_many(nb, pb)}."
    if na > nb:
        verdict = f"{capitalise(number_word(na))} is more than {number_word(nb)}, so yes, there are more {plural(pa)}."
    elif na < nb:
        verdict = (f"{capitalise(number_word(na))} is fewer than {number_word(nb)}, so no, there are more "
                   f"{plural(pb)} than {plural(pa)}.")
    else:
        verdict = f"The numbers are equal, so no, there are exactly as many {plural(pa)} as {plural(pb)}."
    return question, f"{facts} {verdict}"


def _reason_same_colour(ctx: Context, rng: random.Random) -> Turn | None:
    if not ctx.all_scene or len(ctx.objects) < 2 or not all(o.colour for o in ctx.objects):
        return None
    refs = _refs(ctx, use_colour=False)
    if len(refs) != len(ctx.objects):
        return None
    question = rng.choice(["Do all the shapes in the image have the same color?",
                           "Are all of the shapes the same color?"])
    facts = world.join_list([f"the {ref} is {o.colour}" for o, ref in refs])
    colours = {o.colour for o in ctx.objects}
    if len(colours) == 1:
        verdict = f"Every shape is {colours.pop()}, so yes, they all have the same color."
    else:
        verdict = f"That makes {number_word(len(colours))} different colors, so no, they are not all the same color."
    return question, f"{capitalise(facts)}. {verdict}"


def _reason_nearest(ctx: Context, rng: random.Random) -> Turn | None:
    """Nearest neighbour by centre distance, asked only when the nearest is clearly nearer (ratio 1.3)."""
    if len(ctx.objects) < 3:
        return None
    refs = _refs(ctx, use_position=False)
    if (len(refs) != len(ctx.objects) or len({r for _, r in refs}) != len(refs)
            or not all(o.location for o in ctx.objects)):
        return None
    target, target_ref = rng.choice(refs)
    others = sorted(((math.dist((o.cx, o.cy), (target.cx, target.cy)), o, r) for o, r in refs if o is not target),
                    key=lambda t: t[0])
    if others[1][0] < 1.3 * others[0][0]:
        return None
    question = f"Which {ctx.thing} is closest to the {target_ref}?"
    places = world.join_list([f"the {r} is {o.location}" for _, o, r in others])
    answer = (f"The {target_ref} is {target.location} of the image, while {places}. "
              f"The {others[0][2]} is clearly nearer to it than the others, so the {others[0][2]} is the closest.")
    return question, answer
