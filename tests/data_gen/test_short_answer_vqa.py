"""Short-answer questions: answers checked against the boxes, no ambiguous question, balanced yes/no, the eval file."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from answer_oracle import check_short_answer
from data_gen.records import read_captions
from data_gen.scenes import render_scenes
from data_gen.vqa import CATEGORIES, SHORT_ANSWER_SUFFIX, make_question_file, short_answer_turns
from data_gen.world import Vocabulary
from datagen_fixtures import photo_records, write_jsonl

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    render_scenes(out, 120, seed=5, shards_per=200)
    return out / "captions.jsonl"


def test_training_turns_are_true_varied_and_single_word(scenes):
    records, _ = read_captions(scenes)
    categories, answers = Counter(), Counter()
    for record in records:
        turns = short_answer_turns(record, Vocabulary(), seed=0)
        assert 3 <= len(turns) <= 5
        assert len({t["question"] for t in turns}) == len(turns)
        for turn in turns:
            categories[check_short_answer(turn["question"], turn["answer"], record)] += 1
            answers[turn["answer"]] += 1
            assert len(turn["answer"].split()) == 1
    assert set(categories) == set(CATEGORIES)
    assert answers["Yes"] and answers["No"] and answers["0"] and answers["left"] and answers["red"]


def test_question_file_format_balance_and_references(scenes, tmp_path):
    out = tmp_path / "questions.jsonl"
    stats = make_question_file(scenes, out, seed=7, per_image=4, open_every=10)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    records = {r.image: r for r in read_captions(scenes)[0]}
    assert len({q["question_id"] for q in lines}) == len(lines) == stats["questions"]
    short = [q for q in lines if q["category"] != "open"]
    open_ = [q for q in lines if q["category"] == "open"]
    assert len(open_) == 12 and all("answer" not in q and not q["text"].endswith(SHORT_ANSWER_SUFFIX) for q in open_)
    for q in short:
        assert set(q) == {"question_id", "image", "text", "category", "answer"}
        check_short_answer(q["text"], q["answer"], records[q["image"]], q["category"])
    per_category = Counter(q["category"] for q in short)
    assert max(per_category.values()) - min(per_category.values()) <= len(records) // 10  # dealt round-robin
    exist = Counter(q["answer"] for q in short if q["category"] == "exist")
    assert abs(exist["Yes"] - exist["No"]) <= 1
    again = tmp_path / "again.jsonl"
    make_question_file(scenes, again, seed=7, per_image=4, open_every=10)
    assert again.read_bytes() == out.read_bytes()


def test_plain_labels_get_count_exist_and_position_only(tmp_path):
    records = photo_records(12)
    path = write_jsonl(tmp_path / "captions.jsonl", records)
    out = tmp_path / "q.jsonl"
    make_question_file(path, out, seed=0, per_image=3, open_every=0)
    by_image = {r.image: r for r in records}
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {q["category"] for q in lines} == {"count", "exist", "position"}
    for q in lines:
        check_short_answer(q["text"], q["answer"], by_image[q["image"]], q["category"])


def test_never_asks_about_an_object_it_cannot_single_out(tmp_path):
    from data_gen.records import Box, CaptionRecord
    twins = CaptionRecord("t", "t.png", ("Two red circles.",), (
        Box("large red circle", (0.05, 0.05, 0.25, 0.25)), Box("large red circle", (0.07, 0.7, 0.27, 0.9))))
    for seed in range(30):
        for turn in short_answer_turns(twins, Vocabulary(), seed):
            assert "the circle?" not in turn["question"] and "the red object?" not in turn["question"]
            check_short_answer(turn["question"], turn["answer"], twins)


def test_many_turns_per_image_are_distinct_true_and_cached_apart(scenes, tmp_path):
    from data_gen.driver import CacheError, generate

    records, _ = read_captions(scenes)
    lengths = Counter()
    for record in records:
        turns = short_answer_turns(record, Vocabulary(), seed=0, turns=(10, 10))
        lengths[len(turns)] += 1
        assert len(turns) <= 10 and len({t["question"] for t in turns}) == len(turns)
        for turn in turns:
            check_short_answer(turn["question"], turn["answer"], record)
    assert lengths[10] >= 0.9 * len(records)  # fewer only when a scene has fewer distinct facts
    with pytest.raises(ValueError, match="1 <= fewest <= most"):
        short_answer_turns(records[0], Vocabulary(), turns=(5, 3))

    out = tmp_path / "sa.json"
    generate(scenes, out, types=["short_answer"], progress=False, answer_turns=(10, 10), limit=20)
    samples = json.loads(out.read_text())
    assert sum(len(s["conversations"]) // 2 for s in samples) >= 0.9 * 20 * 10
    assert samples[0]["conversations"][0]["value"].startswith("<image>\n")
    assert all(t["value"].endswith(SHORT_ANSWER_SUFFIX) for s in samples for t in s["conversations"][::2])
    with pytest.raises(CacheError, match="rules:turns=10-10"):  # a cache of 10 turns is never reused for 3-5
        generate(scenes, out, types=["short_answer"], progress=False, limit=20)


def test_paraphrased_training_turns_are_true_and_in_other_words(scenes, tmp_path):
    """With a paraphrase share, that share of the questions is worded otherwise (not in the plain run's wordings),
    every answer still checks against the boxes, and the cache keeps the two kinds of data apart."""
    from data_gen.driver import CacheError, generate
    from data_gen.paraphrases import training_rewording

    records, _ = read_captions(scenes)
    plain_wordings, worded, total = set(), 0, 0
    for record in records:
        plain_wordings.update(t["question"] for t in short_answer_turns(record, Vocabulary(), seed=0, turns=(8, 8)))
    for record in records:
        turns = short_answer_turns(record, Vocabulary(), seed=0, turns=(8, 8), reword=training_rewording(0.5))
        for turn in turns:
            check_short_answer(turn["question"], turn["answer"], record)
            assert turn["question"].endswith(SHORT_ANSWER_SUFFIX)
            worded += turn["question"] not in plain_wordings
            total += 1
    assert 0.3 < worded / total < 0.6
    with pytest.raises(ValueError, match="between 0 and 1"):
        training_rewording(1.5)
    assert training_rewording(0) is None

    out = tmp_path / "sa.json"
    generate(scenes, out, types=["short_answer"], progress=False, limit=10, answer_paraphrases=0.5)
    with pytest.raises(CacheError, match="paraphrases=0.5"):  # a paraphrased cache is never reused for plain data
        generate(scenes, out, types=["short_answer"], progress=False, limit=10)
