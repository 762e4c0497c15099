"""The tiny LLM's pretraining text: scenes of the scene world written as text, each followed by what a reader of the
scene can say about it.

LLaVA starts from an LLM that already reads facts from its context; the tiny demo's LLM has to learn that here, from
the scene world alone (no image is rendered: scenes are sampled and written out). A document is a scene as text in
place of the image, then either
- short-answer questions about it (every category of data_gen.vqa, drawn alike or by `CorpusSpec.category_weights`,
  in its templates and in the extra phrasings of data_gen.paraphrases.CORPUS_TEMPLATES), written in one of two styles
  (`CorpusSpec.style`):
  - "qa", a reading text: `Objects: ...` then `Q: <question>` / `A: <answer>` lines, trained on the answers alone. It
    puts every trained token a few tokens after the facts it needs, which teaches a tiny LLM to look things up in
    its context (the bases' text probe: 0.43 in the chat style, 0.595 in this one; docs/demo.md);
  - "chat", the chat template stage 2 uses (with the short-answer instruction after every question); with "qa",
    `chat_fraction` of the scenes are written this way, so the LLM meets the template it will be tuned in;
- a conversation, a detailed description or a reasoning answer of the offline generator (data_gen.offline);
- a caption (data_gen.scenes' phrasings), after the scene as plain text, as stage 1 reads an image then its caption.
The scenes are drawn from their own seed stream ("corpus"), so they are not the demo's training or held-out scenes.

With `CorpusSpec.object_words` the scene line writes each object as one word, "large_red_triangle" (one tokenizer
piece after the space's: stages.base makes every OBJECT_WORDS entry a symbol of its own), as an image patch carries its object's size,
colour and shape together. Written as three words, a colour is bound to its shape only by being next to it, and a
tiny LLaMA reads that as a bag of words (colour questions about scenes of two or more colours stay near chance;
docs/demo.md); as one word, finding an object by its shape is a lookup the LLaMA learns within a few hundred steps.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

from data_gen import world
from data_gen.offline import OfflineBackend
from data_gen.paraphrases import check_paraphrase_fraction, training_rewording
from data_gen.prompting import stable_rng
from data_gen.records import Box, CaptionRecord
from data_gen.scenes import sample_scene, scene_captions
from data_gen.vqa import CATEGORIES, SHORT_ANSWER_SUFFIX, ask, draw_short_answers
from data_gen.world import Vocabulary

SCENE_PREFIX = "Objects: "
# every object of the scene world as one word (CorpusSpec.object_words), in size, colour, shape order
OBJECT_WORDS = tuple(f"{size}_{colour}_{shape}" for size in world.SCENE_SIZES for colour in world.SCENE_COLOURS
                     for shape in world.SCENE_SHAPES)
LONG_TYPES = ("conversation", "detail", "reasoning")
STYLES = ("qa", "chat")


@dataclass
class CorpusSpec:
    scenes: int = 20000  # scenes written as text
    seed: int = 0
    canvas: int = 64  # the pixel grid scenes are sampled on (positions are as in rendered scenes of this size)
    short_answers: tuple[int, int] = (6, 10)  # questions per short-answer document
    long_fraction: float = 0.3  # share of scenes that also get one offline conversation/detail/reasoning document
    caption_fraction: float = 0.5  # share of scenes that also get a caption document
    paraphrase_fraction: float = 0.3  # share of short-answer questions asked in a CORPUS_TEMPLATES phrasing
    style: str = "chat"  # short-answer documents: "qa" reading texts or "chat" conversations (see above)
    chat_fraction: float = 0.0  # with style "qa": share of scenes whose questions are written as a chat instead
    # relative weight of each data_gen.vqa category when a question is drawn ({"color": 3.0}: colour questions three
    # times as often as each other category); unnamed categories weigh 1. Empty: all alike.
    category_weights: dict = field(default_factory=dict)
    object_words: bool = False  # the scene line names each object in one word ("large_red_triangle"; see above)

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"corpus.style: {self.style!r} is not one of {', '.join(STYLES)}")
        try:
            check_paraphrase_fraction(self.paraphrase_fraction)
        except ValueError as error:
            raise ValueError(f"corpus.paraphrase_fraction: {error}") from None
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise ValueError(f"corpus.chat_fraction: {self.chat_fraction} is not between 0 and 1")
        for name, weight in self.category_weights.items():
            if name not in CATEGORIES:
                raise ValueError(f"corpus.category_weights: {name!r} is not one of {', '.join(CATEGORIES)}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"corpus.category_weights.{name}: {weight!r} is not a number >= 0")
        if not isinstance(self.object_words, bool):
            raise ValueError(f"corpus.object_words: expected true or false, got {self.object_words!r}")
        if self.category_weights and not any(self.category_weights.get(c, 1.0) for c in CATEGORIES):
            raise ValueError("corpus.category_weights: every category weighs 0")


class Corpus(NamedTuple):
    conversations: list[list[dict]]  # LLaVA's format, the scene as text in place of `<image>`
    texts: list[str]  # plain texts trained on every token: a scene then one of its captions
    readings: list[list[tuple[str, bool]]]  # "qa" documents as (text, trained) segments: only answers are trained


def scene_record(seed: int, index: int, canvas: int) -> CaptionRecord:
    """Scene `index` of the corpus stream as a caption record (no image): boxes and three captions."""
    rng = random.Random(f"corpus:{seed}:{index}")
    scene = sample_scene(rng, canvas)
    boxes = tuple(Box(s.label, s.bbox(canvas)) for s in scene.shapes)
    return CaptionRecord(f"corpus_{index:07d}", "", tuple(scene_captions(scene, canvas, rng)), boxes)


def scene_as_text(record: CaptionRecord, rng: random.Random, object_words: bool = False) -> str:
    """"Objects: large red triangle in the bottom left corner; small blue circle at the top center." in a random
    order, so that the reader must find an object by what it is, not by where it is listed. With `object_words`:
    "Objects: large_red_triangle in the bottom left corner; ..." (OBJECT_WORDS)."""
    objects = world.read_objects(record.boxes)
    rng.shuffle(objects)
    names = [o.label.replace(" ", "_") if object_words else o.label for o in objects]
    return SCENE_PREFIX + "; ".join(f"{name} {o.location}" for name, o in zip(names, objects)) + "."


def reads_object_words(tokenizer) -> bool:
    """Whether a tokenizer has OBJECT_WORDS as pieces of their own: a LLaMA pretrained with `object_words` is asked
    about scenes written that way."""
    return tokenizer.piece_to_id(OBJECT_WORDS[0]) != tokenizer.piece_to_id("<unk>")


def _conversation(scene: str, turns: list[dict]) -> list[dict]:
    out = []
    for k, turn in enumerate(turns):
        question = f"{scene}\n{turn['question']}" if k == 0 else turn["question"]
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": turn["answer"]}]
    return out


def reading_question(question: str) -> str:
    """A short-answer question as a "qa" reading line asks it: without LLaVA's short-answer instruction."""
    return "Q: " + question.removesuffix(SHORT_ANSWER_SUFFIX) + "\nA:"


def reading_prompt(scene: str, question: str) -> list[tuple[str, bool]]:
    """The segments that ask one question about a scene (the text probe's prompt; a reading document's start)."""
    return [(scene + "\n", False), (reading_question(question), False)]


def _reading(scene: str, turns: list[dict]) -> list[tuple[str, bool]]:
    """(text, trained) segments, each tokenized on its own: the scene line, then per question its `Q: ... A:` line
    (not trained) and the answer with its line end (trained: the LLM learns where an answer stops as well)."""
    segments = [(scene + "\n", False)]
    for turn in turns:
        segments += [(reading_question(turn["question"]), False), (turn["answer"] + "\n", True)]
    return segments


def documents(spec: CorpusSpec) -> Corpus:
    """The corpus of `spec` (see Corpus). Depends only on `spec`: the same spec gives the same corpus."""
    low, high = spec.short_answers
    reword, vocabulary = training_rewording(spec.paraphrase_fraction), Vocabulary()
    backend = OfflineBackend(vocabulary, seed=spec.seed)
    corpus = Corpus([], [], [])
    conversations, texts = corpus.conversations, corpus.texts

    def scene_text(record: CaptionRecord, rng: random.Random) -> str:
        return scene_as_text(record, rng, spec.object_words)

    for index in range(spec.scenes):
        record = scene_record(spec.seed, index, spec.canvas)
        rng = stable_rng(spec.seed, record.id, "corpus")
        turns = draw_short_answers(record, vocabulary, rng, rng.randint(low, high), reword, spec.category_weights)
        if turns and spec.style == "qa" and not (spec.chat_fraction and rng.random() < spec.chat_fraction):
            corpus.readings.append(_reading(scene_text(record, rng), turns))
        elif turns:
            conversations.append(_conversation(scene_text(record, rng), turns))
        if rng.random() < spec.long_fraction:
            turns = backend.generate(record, rng.choice(LONG_TYPES))
            if turns:
                conversations.append(_conversation(scene_text(record, rng), turns))
        if rng.random() < spec.caption_fraction:
            texts.append(f"{scene_text(record, rng)}\n{rng.choice(record.captions)}")
    return corpus


def probe_questions(count: int, seed: int, canvas: int = 64, object_words: bool = False) -> list[dict]:
    """`count` held-out short-answer questions (scenes from another stream than any corpus seed's), categories
    round-robin: {"category", "scene", "question" (with LLaVA's short-answer suffix), "answer", "objects" (how many
    the scene has)}; the scene written as the corpus writes it (`object_words` as in CorpusSpec)."""
    out = []
    vocabulary = Vocabulary()
    index, want_yes = 0, True
    while len(out) < count:
        rng = random.Random(f"probe:{seed}:{index}")
        record = CaptionRecord(f"probe_{index}", "", (), tuple(
            Box(s.label, s.bbox(canvas)) for s in sample_scene(rng, canvas).shapes))
        category = CATEGORIES[len(out) % len(CATEGORIES)]
        question = ask(category, record, vocabulary, rng, want_yes)
        index += 1
        if question is None:
            continue
        if category == "exist":
            want_yes = not want_yes
        out.append({"category": category, "scene": scene_as_text(record, rng, object_words),
                    "question": question.text, "answer": question.answer, "objects": len(record.boxes)})
    return out
