"""Exact-match normalisation, question-file checks, per-category scores and the chance baseline."""
import json

import pytest

from llava.evaluation import (Question, QuestionFileError, answer_line, exact_match, format_score_table,
                              normalize_answer, read_questions, score_answers)
from pipeline.evaluate import main


@pytest.mark.parametrize("prediction, reference", [
    ("Red.", "red"),
    ("The red", "red"),
    ("A circle", "circle"),
    ("three", "3"),
    ("3", "Three"),
    ("Twelve!", "12"),
    ("  YES ", "yes"),
    ("It's left", "its left"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("center", ["centre", "center"]),
])
def test_normalisation_accepts_equivalent_answers(prediction, reference):
    assert exact_match(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("red", "blue"),
    ("3", "4"),
    ("three circles", "3"),
    ("no", "yes"),
    ("35", "3.5"),
    ("left", ["right", "center"]),
])
def test_normalisation_keeps_different_answers_apart(prediction, reference):
    assert not exact_match(prediction, reference)


def test_normalize_answer_output():
    assert normalize_answer("The  Two, large... squares!") == "2 large squares"
    assert normalize_answer("An apple’s colour") == "apples colour"


def test_scores_and_chance_per_category():
    questions = [
        Question(1, "colour?", category="colour", answer="red"),
        Question(2, "colour?", category="colour", answer="blue"),
        Question(3, "colour?", category="colour", answer="Red"),  # same class as "red"
        Question(4, "count?", category="count", answer="2"),
        Question(5, "count?", category="count", answer="two"),  # same class as "2"
        Question(6, "open?", category="open"),  # no reference: not scored
    ]
    predictions = {"1": "Red.", "2": "green", "3": "red", "4": "Two", "6": "anything"}  # 5 missing
    scores = score_answers(questions, predictions)
    colour, count = scores["categories"]["colour"], scores["categories"]["count"]
    assert (colour["count"], colour["correct"]) == (3, 2)
    assert colour["chance"] == pytest.approx(1 / 2)
    assert (count["count"], count["correct"], count["chance"]) == (2, 1, 1.0)
    assert "open" not in scores["categories"]
    assert scores["overall"]["accuracy"] == pytest.approx(3 / 5)
    assert scores["overall"]["chance"] == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)
    assert scores["missing"] == 1
    table = format_score_table(scores)
    assert "colour" in table and "66.7%" in table and "chance" in table


def test_read_questions_errors_name_line_and_key(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "image": "a.png", "text": "hi"}\n{"question_id": 2, "image": "b.png"}\n')
    with pytest.raises(QuestionFileError, match=r"q.jsonl:2: key 'text'"):
        read_questions(path)
    path.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n')
    with pytest.raises(QuestionFileError, match=r"q.jsonl:2: question_id 1 repeats"):
        read_questions(path)
    path.write_text('{"question_id": 1, "text": "a", "answer": 3}\n')
    with pytest.raises(QuestionFileError, match=r"q.jsonl:1: key 'answer'"):
        read_questions(path)
    path.write_text('{"question_id": 1, "text": "a"\n')
    with pytest.raises(QuestionFileError, match=r"q.jsonl:1: not valid JSON"):
        read_questions(path)


def test_answer_lines_have_llava_keys_and_stable_ids():
    q = Question("q1", "What colour?", image="a.png")
    first, second = answer_line(q, q.text, "red", "m"), answer_line(q, q.text, "red", "m")
    assert set(first) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert first["answer_id"] == second["answer_id"]
    assert first["answer_id"] != answer_line(q, q.text, "blue", "m")["answer_id"]


def test_cli_scores_an_existing_answer_file(tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    answers = tmp_path / "a.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 1, "image": "a.png", "text": "colour?", "category": "colour", "answer": "red"},
        {"question_id": 2, "image": "b.png", "text": "colour?", "category": "colour", "answer": "blue"},
    ]))
    answers.write_text("".join(json.dumps(a) + "\n" for a in [
        {"question_id": 1, "prompt": "colour?", "text": "Red", "answer_id": "x", "model_id": "m", "metadata": {}},
        {"question_id": 2, "prompt": "colour?", "text": "red", "answer_id": "y", "model_id": "m", "metadata": {}},
    ]))
    assert main(["--question-file", str(questions), "--answers-file", str(answers)]) == 0
    out = capsys.readouterr().out
    assert "colour" in out and "50.0%" in out
    saved = json.loads((tmp_path / "a.scores.json").read_text())
    assert saved["exact_match"]["overall"]["correct"] == 1


def test_scores_by_objects_split_one_object_images_from_crowded_ones(tmp_path):
    from pipeline.runner import scores_by_objects
    from stages.config import ConfigError

    def record(image, labels):  # captions.jsonl written by hand: one box per label
        boxes = [{"label": label, "bbox": [0.1 * k, 0.1, 0.1 * k + 0.05, 0.2]} for k, label in enumerate(labels)]
        return {"id": image, "image": image, "captions": ["x"], "boxes": boxes}

    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in (
        record("a.png", ["small red circle"]),
        record("b.png", ["small red circle", "large blue square"]),
        record("c.png", ["small red circle", "large blue square", "small green triangle"]))) + "\n")
    questions = [Question("1", "colour of the circle?", "a.png", "color", "red"),
                 Question("2", "colour of the circle?", "b.png", "color", "red"),
                 Question("3", "colour of the square?", "b.png", "color", "blue"),
                 Question("4", "shape of the green object?", "c.png", "shape", "triangle"),
                 Question("5", "Describe the image.", "c.png")]  # open: no reference, not scored
    said = {"1": "Red", "2": "blue", "3": "blue", "4": "triangle", "5": "A red circle."}
    split = scores_by_objects(questions, said, str(captions))
    assert list(split) == ["one object", "two or more"]
    assert split["one object"]["questions"] == 1 and split["one object"]["accuracy"] == 1.0
    assert split["two or more"]["questions"] == 3 and split["two or more"]["accuracy"] == pytest.approx(2 / 3)
    assert split["two or more"]["by_category"] == {"color": 0.5, "shape": 1.0}
    with pytest.raises(ConfigError, match="'d.png'"):
        scores_by_objects([Question("6", "q", "d.png", "color", "red")], {"6": "red"}, str(captions))
