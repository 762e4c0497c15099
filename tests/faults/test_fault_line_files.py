"""Bad lines in the JSONL inputs of data generation (captions) and evaluation (question files): an error names
file:line and the key; where skipping is offered, bad lines are counted and every good line is still used.
Also: images in modes the CLIP preprocessing does not take (CMYK, palette, 16-bit, alpha, 1-bit) come out as the right
RGB, through the decoder both training readers share."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

from faults_lib import cases, image_bytes

GOOD_CAPTION = {"id": "a", "image": "a.jpg", "captions": ["A dog."], "boxes": [{"label": "dog",
                                                                                 "bbox": [0.1, 0.1, 0.5, 0.5]}]}


@dataclass(frozen=True)
class LineFault:
    name: str
    line: str  # the bad line, placed as line 2 of 3
    message: str  # regex after "<file>:2: "


CAPTION_FAULTS = [
    LineFault("captions: malformed JSON line", '{"id": "b", "image": ', r"not valid JSON"),
    LineFault("captions: missing key", json.dumps({"id": "b", "image": "b.jpg", "boxes": []}),
              r"missing key 'captions'"),
    LineFault("captions: bbox in pixels", json.dumps({**GOOD_CAPTION, "id": "b", "boxes": [
        {"label": "dog", "bbox": [10, 20, 200, 300]}]}), r"boxes\[0\]: key 'bbox' .* normalised to 0–1"),
    LineFault("captions: empty caption list", json.dumps({**GOOD_CAPTION, "id": "b", "captions": []}),
              r"key 'captions' must be a non-empty list"),
    LineFault("captions: duplicate id", json.dumps(GOOD_CAPTION), r"key 'id' 'a' repeats line 1"),
]


def three_lines(tmp_path, bad: str, good: dict, name: str):
    path = tmp_path / name
    path.write_text("\n".join([json.dumps(good), bad, json.dumps({**good, "id": "c"} if "captions" in good else
                                                                   {**good, "question_id": "c"})]) + "\n")
    return path


@pytest.mark.parametrize("fault", cases(CAPTION_FAULTS))
def test_generate_names_the_line_or_skips_and_counts_it(tmp_path, fault):
    from data_gen.driver import generate
    from data_gen.records import InputError

    path = three_lines(tmp_path, fault.line, GOOD_CAPTION, "captions.jsonl")
    with pytest.raises(InputError, match=re.escape(f"{path}:2: ") + fault.message):
        generate(path, tmp_path / "out.json", backend="offline", types=["conversation"], progress=False)
    assert not (tmp_path / "out.json").exists()
    summary = generate(path, tmp_path / "out.json", backend="offline", types=["conversation"], progress=False,
                       skip_bad=True)
    assert summary["bad_lines_skipped"] == 1 and summary["records"] == 2
    assert {s["id"] for s in json.loads((tmp_path / "out.json").read_text())} == {"a_conversation", "c_conversation"}


def test_generate_on_an_empty_captions_file(tmp_path):
    from data_gen.driver import generate
    from data_gen.records import InputError

    path = tmp_path / "captions.jsonl"
    path.write_text("\n")
    try:
        summary = generate(path, tmp_path / "out.json", backend="offline", types=["conversation"], progress=False)
    except (InputError, ValueError) as e:  # refusing is fine, if the message names the file
        assert str(path) in str(e)
        return
    assert summary["written"] == 0 and json.loads((tmp_path / "out.json").read_text()) == []


GOOD_QUESTION = {"question_id": "a", "image": "a.png", "text": "What colour is the square?"}
QUESTION_FAULTS = [
    LineFault("questions: malformed JSON line", '{"question_id": "b", ', r"not valid JSON"),
    LineFault("questions: line is not an object", '["b"]', r"a line must be a JSON object"),
    LineFault("questions: missing question_id", json.dumps({"text": "Q?"}), r"key 'question_id' must be"),
    LineFault("questions: repeated question_id", json.dumps(GOOD_QUESTION), r"question_id 'a' repeats"),
]


@pytest.mark.parametrize("fault", cases(QUESTION_FAULTS))
def test_eval_question_file_names_the_line(tmp_path, fault):
    from llava.evaluation import QuestionFileError, read_questions

    path = three_lines(tmp_path, fault.line, GOOD_QUESTION, "questions.jsonl")
    with pytest.raises(QuestionFileError, match=re.escape(f"{path}:2: ") + fault.message):
        read_questions(path)


# ---- image modes ---------------------------------------------------------------------------------------------------

def _palette_with_transparency() -> bytes:
    import io

    from PIL import Image

    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    image.putpixel((0, 0), 1)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    return buffer.getvalue()


@dataclass(frozen=True)
class ModeCase:
    name: str
    data: bytes
    pixel: tuple  # expected RGB at (1, 1)


MODE_CASES = [
    ModeCase("CMYK JPEG", image_bytes("CMYK", (8, 8), "JPEG", color=(0, 0, 0, 0)), (255, 255, 255)),
    ModeCase("palette with transparency", _palette_with_transparency(), (255, 255, 255)),
    ModeCase("16-bit grey", image_bytes("I;16", (8, 8), "PNG", color=32896), (128, 128, 128)),
    ModeCase("grey + alpha, transparent", image_bytes("LA", (8, 8), "PNG", color=(0, 0)), (255, 255, 255)),
    ModeCase("1-bit", image_bytes("1", (8, 8), "PNG", color=1), (255, 255, 255)),
    ModeCase("32-bit float TIFF", image_bytes("F", (8, 8), "TIFF", color=0.5), (128, 128, 128)),
]


@pytest.mark.parametrize("case", cases(MODE_CASES))
def test_odd_image_modes_become_the_right_rgb(tmp_path, tokenizer, case):
    from llava.data.images import open_rgb
    from llava.data.instruct import InstructDataset

    image = open_rgb(case.data, name=case.name)
    assert image.mode == "RGB" and image.getpixel((1, 1)) == case.pixel
    (tmp_path / "img").write_bytes(case.data)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "x", "image": "img", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]}]))
    ds = InstructDataset(data, tokenizer, image_folder=tmp_path, image_processor=np.asarray)
    assert tuple(ds[0]["images"][0][1, 1]) == case.pixel  # the training reader decodes the same way
