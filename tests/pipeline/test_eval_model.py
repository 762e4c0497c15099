"""`llava-pipeline eval` with a real (tiny, random) model: batched answers equal one-at-a-time answers, LLaVA's answer
file format, the periodic training callback."""
import json

import pytest
import torch

from llava.evaluation import make_eval_callback
from pipeline.evaluate import main
from llava.loading import ModelLoadError, load_model

QUESTIONS = [
    {"question_id": "a", "image": "red.png", "text": "What color is it?", "category": "color", "answer": "red"},
    {"question_id": "b", "image": "blue.png", "text": "What color is the square? Answer briefly.",
     "category": "color", "answer": "blue"},
    {"question_id": "c", "image": "mixed.png", "text": "How many shapes?", "category": "count", "answer": "1"},
    {"question_id": "d", "text": "Say hello.", "category": "open"},
    {"question_id": "e", "image": "mixed.png", "text": "Is there a green square?", "category": "exist",
     "answer": "yes"},
]


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def _answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batched_answers_equal_single_answers(tiny_model_dir, image_folder, question_file, tmp_path):
    common = ["--question-file", str(question_file), "--image-folder", str(image_folder), "--max-new-tokens", "12"]
    assert main(["--model", str(tiny_model_dir), *common, "--answers-file", str(tmp_path / "b3.jsonl"),
                 "--batch-size", "3"]) == 0
    assert main(["--model-path", str(tiny_model_dir), *common, "--answers-file", str(tmp_path / "b1.jsonl"),
                 "--batch-size", "1", "--temperature", "0"]) == 0
    batched, single = _answers(tmp_path / "b3.jsonl"), _answers(tmp_path / "b1.jsonl")
    assert [a["question_id"] for a in batched] == [q["question_id"] for q in QUESTIONS]
    assert [a["text"] for a in batched] == [a["text"] for a in single]
    assert any(a["text"] for a in batched)
    for line, question in zip(batched, QUESTIONS):
        assert set(line) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert line["prompt"] == question["text"] and line["metadata"] == {} and line["model_id"] == "model"
    scores = json.loads((tmp_path / "b3.scores.json").read_text())["exact_match"]
    assert scores["overall"]["count"] == 4 and set(scores["categories"]) == {"color", "count", "exist"}


def test_missing_image_is_a_clear_error(tiny_model_dir, question_file, tmp_path, capsys):
    code = main(["--model", str(tiny_model_dir), "--question-file", str(question_file), "--image-folder",
                 str(tmp_path), "--answers-file", str(tmp_path / "a.jsonl")])
    assert code == 2
    assert "question 'a': image not found" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_eval_callback_measures_and_restores_mode(tiny_model_dir, image_folder, question_file):
    loaded = load_model(tiny_model_dir, device="cpu")
    callback = make_eval_callback(question_file, image_folder, every=5, limit=3, max_new_tokens=6)
    assert callback.every == 5
    model = loaded.model.train()
    metrics = callback(model, 10)
    assert model.training
    assert set(metrics) == {"accuracy", "chance", "color", "count"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["chance"] == pytest.approx((2 * 0.5 + 1 * 1.0) / 3)


def test_loader_rejects_a_directory_that_is_no_model(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a model directory.*notes.txt"):
        load_model(tmp_path)
