"""`caption` samples (LLaVA-1.5's captioning data beside the GPT types): a brief-description instruction answered by
one of the image's own captions, made by rules with any backend, and never in the words the evaluation asks in."""
from __future__ import annotations

import json
import re

import pytest

from data_gen.driver import caption_turns, generate
from data_gen.prompting import brief_questions
from data_gen.records import CaptionRecord, read_captions
from data_gen.scenes import render_scenes
from data_gen.vqa import OPEN_QUESTIONS

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    render_scenes(out, 60, seed=21, shards_per=200)
    return out / "captions.jsonl"


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z']+", text.lower()))


def test_caption_samples_answer_a_brief_instruction_with_the_images_own_caption(scenes, tmp_path):
    records = {r.image: r for r in read_captions(scenes)[0]}
    out = tmp_path / "caption.json"
    summary = generate(scenes, out, types=["caption"], backend="openai", progress=False)  # no key needed: rules
    samples = json.loads(out.read_text())
    assert summary["written"] == len(samples) == len(records) and summary["failed"] == 0
    asked = set()
    for sample in samples:
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and sample["id"].endswith("_caption")
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        question = human["value"].removeprefix("<image>\n")
        assert question in brief_questions()
        assert gpt["value"] in records[sample["image"]].captions  # the image's own caption, nothing made up
        asked.add(question)
    assert len(asked) >= 6  # the instructions vary over 60 images (11 to draw from)
    again = tmp_path / "again.json"
    generate(scenes, again, types=["caption"], progress=False)
    assert again.read_text() == out.read_text()  # seeded: the same draws whatever the backend
    generate(scenes, tmp_path / "other.json", types=["caption"], seed=1, progress=False)
    assert (tmp_path / "other.json").read_text() != out.read_text()


def test_brief_instructions_are_not_the_evaluations_open_questions():
    asked_in_eval = {words(q) for q in OPEN_QUESTIONS}
    assert len(brief_questions()) == 11 and not {words(q) for q in brief_questions()} & asked_in_eval


def test_a_record_without_captions_fails_by_name():
    from data_gen.openai_backend import ItemFailed

    with pytest.raises(ItemFailed, match="img_7: no caption"):
        caption_turns(CaptionRecord("img_7", "img_7.png", (), ()))
