"""Preference records (both layouts), the offline pair generator, the GPT pair backend against a local fake server,
POPE files and scores, and CHAIR — each checked against facts computed here from the captions and by hand."""
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_gen import hallucination as h
from data_gen.preference import PairError, generate_pairs, read_pairs
from data_gen.records import read_captions

REPO = Path(__file__).resolve().parents[2]
SCENE_KIND = re.compile(r"(?:small |large )?(red|green|blue|yellow|purple|orange) (circle|square|triangle)")


def kinds_of(record) -> set[str]:
    """The colour-shape kinds in an image, read off its box labels here (not through data_gen)."""
    return {" ".join(SCENE_KIND.fullmatch(b.label).groups()) for b in record.boxes}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from data_gen.scenes import render_scenes

    root = tmp_path_factory.mktemp("scenes")
    out = render_scenes(root / "scenes", 40, seed=3, size=32, captions_per_image=1)
    return root, Path(out["captions"]), read_captions(out["captions"])[0]


# ---- records --------------------------------------------------------------------------------------------------------

def test_both_layouts_read_to_one_record_format(tmp_path):
    ours = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}],
            "chosen": "A circle.", "rejected": "A dog.", "kind": "object"}
    trl_text = {"prompt": "What is it?", "chosen": "A circle.", "rejected": "A dog.", "images": ["x.png"]}
    trl_chat = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                "chosen": [{"role": "assistant", "content": "A circle."}],
                "rejected": [{"role": "assistant", "content": "A dog."}], "image": "x.png"}
    (tmp_path / "ours.json").write_text(json.dumps([ours]))
    (tmp_path / "trl.jsonl").write_text(json.dumps(trl_text) + "\n\n" + json.dumps(trl_chat) + "\n")
    assert read_pairs(tmp_path / "ours.json") == [ours]
    for pair in read_pairs(tmp_path / "trl.jsonl"):
        assert pair["conversations"] == [{"from": "human", "value": "<image>\nWhat is it?"}]
        assert (pair["chosen"], pair["rejected"], pair["image"]) == ("A circle.", "A dog.", "x.png")


@pytest.mark.parametrize("entry, message", [
    ({"prompt": "Q?", "chosen": "same", "rejected": "same"}, "must differ"),
    ({"prompt": "Q?", "chosen": "a"}, "'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "'conversations' (LLaVA layout) or 'prompt'"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}, "end with a user turn"),
    ({"prompt": "Q?", "chosen": "a", "rejected": "b", "images": ["1.png", "2.png"]}, "exactly one image"),
])
def test_bad_records_name_the_line_and_the_key(tmp_path, entry, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "ok?", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(PairError, match=re.escape(message)) as error:
        read_pairs(path)
    assert f"{path}:2" in str(error.value)


# ---- offline pairs --------------------------------------------------------------------------------------------------

def test_offline_pairs_are_grounded_against_one_controlled_hallucination(scenes, tmp_path):
    from data_gen.offline import OfflineBackend
    from data_gen.world import Vocabulary

    root, captions, records = scenes
    summary = generate_pairs(captions, tmp_path / "pairs.json", types={"description": 1, "short": 2},
                             progress=False)
    pairs = read_pairs(tmp_path / "pairs.json")
    assert summary["written"] == len(pairs) and len(pairs) > 100
    assert set(summary["by_kind"]) == {"object", "colour", "count", "position", "omission"}
    by_image = {r.image: r for r in records}
    vocabulary = h.ChairVocabulary.scene()
    backend = OfflineBackend(Vocabulary.from_boxes(b for r in records for b in r.boxes))
    for pair in pairs:
        record = by_image[pair["image"]]
        truth = kinds_of(record)
        rejected_kinds = set(vocabulary.mentions(pair["rejected"]))
        if "description" in pair["id"]:
            assert pair["chosen"] == backend.generate(record, "detail")[0]["answer"]
            assert set(vocabulary.mentions(pair["chosen"])) <= truth
            if pair["kind"] in ("object", "colour"):
                assert rejected_kinds - truth  # names something the image does not hold
            else:
                assert rejected_kinds <= truth  # same objects: a wrong count or place
        elif pair["chosen"] in ("Yes", "No"):
            asked = re.search(r"Is there an? (\w+ \w+) in the image", pair["conversations"][0]["value"]).group(1)
            assert pair["chosen"] == ("Yes" if asked in truth else "No")
            assert pair["kind"] == ("omission" if asked in truth else "object")
    written = (tmp_path / "pairs.json").read_bytes()
    again = generate_pairs(captions, tmp_path / "pairs.json", types={"description": 1, "short": 2}, progress=False)
    assert again["already_done"] == again["items"] and (tmp_path / "pairs.json").read_bytes() == written


def test_hallucinated_objects_follow_co_occurrence(scenes):
    """Over many draws, absent kinds that often share images with the present ones are drawn more often."""
    import random

    _, _, records = scenes
    stats = h.KindStats.from_records(records)
    present = sorted(kinds_of(records[0]))
    rng = random.Random(0)
    drawn = Counter(stats.draw_absent(present, rng) for _ in range(4000))
    together = {k: sum(1 for r in records for p in present if {k, p} <= kinds_of(r)) for k in drawn}
    most, least = max(together, key=together.get), min(together, key=together.get)
    assert not drawn.keys() & set(present)
    if together[most] > together[least]:
        assert drawn[most] > drawn[least]


# ---- GPT pairs ------------------------------------------------------------------------------------------------------

class PairServer:
    """OpenAI-compatible endpoint: the first answer for each image is not JSON (the backend must re-ask), then a
    valid pair that names the image."""

    def __init__(self, same_answers: bool = False):
        self.requests = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                context = body["messages"][1]["content"]
                key = context.splitlines()[1]
                server.requests[key] += 1
                if server.requests[key] == 1:
                    content = "Sure! Here is the pair you asked for."
                else:
                    rejected = "It shows a circle." if same_answers else "It shows a circle and a dog."
                    content = json.dumps({"question": "What does it show?", "chosen": "It shows a circle.",
                                          "rejected": rejected})
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_gpt_pairs_are_reasked_cached_and_never_hold_the_key(scenes, tmp_path, monkeypatch):
    from data_gen.openai_backend import OpenAIConfig

    _, captions, records = scenes
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-key-123456")
    server = PairServer()
    config = OpenAIConfig(model="fake", base_url=server.base_url, timeout=5, base_delay=0.01)
    summary = generate_pairs(captions, tmp_path / "gpt.json", backend="openai", types={"description": 2},
                             workers=2, limit=6, progress=False, openai_config=config)
    pairs = read_pairs(tmp_path / "gpt.json")
    assert summary["failed"] == 0 and len(pairs) == 12 and summary["usage"]["reasks"] == 6  # one per image
    assert {p["kind"] for p in pairs} <= {"object", "colour", "count", "position"}
    assert len({(p["image"], p["kind"]) for p in pairs}) == 12  # the two pairs of an image ask different kinds
    asked = sum(server.requests.values())
    again = generate_pairs(captions, tmp_path / "gpt.json", backend="openai", types={"description": 2}, workers=2,
                           limit=6, progress=False, openai_config=config)
    assert again["already_done"] == 12 and sum(server.requests.values()) == asked
    for path in tmp_path.iterdir():
        assert "sk-test-secret" not in path.read_text()


def test_gpt_pairs_that_never_differ_fail_with_the_reason(scenes, tmp_path, monkeypatch):
    from data_gen.openai_backend import OpenAIConfig

    _, captions, _ = scenes
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-key-123456")
    server = PairServer(same_answers=True)
    config = OpenAIConfig(model="fake", base_url=server.base_url, timeout=5, base_delay=0.01, max_reasks=1)
    summary = generate_pairs(captions, tmp_path / "gpt.json", backend="openai", types={"short": 1}, limit=2,
                             progress=False, openai_config=config)
    assert summary["failed"] == 2 and summary["written"] == 0
    failures = [json.loads(line) for line in (tmp_path / "gpt.failures.jsonl").read_text().splitlines()]
    assert all("identical" in f["reason"] for f in failures)


# ---- POPE ---------------------------------------------------------------------------------------------------------

def test_pope_file_balances_present_and_absent_objects_per_split(scenes, tmp_path):
    _, captions, records = scenes
    stats = h.make_pope_file(captions, tmp_path / "pope.jsonl", per_image=2)
    lines = [json.loads(line) for line in (tmp_path / "pope.jsonl").read_text().splitlines()]
    assert stats["questions"] == len(lines) and len({q["question_id"] for q in lines}) == len(lines)
    by_image = {r.image: kinds_of(r) for r in records}
    frequency = Counter(k for r in records for k in kinds_of(r))
    for split in h.POPE_SPLITS:
        questions = [q for q in lines if q["category"] == split]
        assert sum(q["label"] == "yes" for q in questions) == sum(q["label"] == "no" for q in questions) > 0
        for q in questions:
            kind = re.search(r"Is there an? (\w+ \w+) in the image\?", q["text"]).group(1)
            assert (kind in by_image[q["image"]]) == (q["label"] == "yes")
        if split == "popular":  # the absent kinds asked are the most frequent absent ones
            for image, present in by_image.items():
                asked = [re.search(r"an? (\w+ \w+) in", q["text"]).group(1) for q in questions
                         if q["image"] == image and q["label"] == "no"]
                absent = sorted((frequency[k] for k in frequency if k not in present), reverse=True)
                assert sorted((frequency[k] for k in asked), reverse=True) == absent[:len(asked)]


def test_pope_answers_are_read_as_llava_reads_them():
    assert [h.pope_answer(t) for t in ("Yes", "yes, there is.", "No", "No, there is not.", "There is not a dog.",
                                       "I do not know", "The image shows no dog", "Nothing. No")] == \
        ["yes", "yes", "no", "no", "no", "no", "no", "yes"]  # "not" anywhere in the first sentence reads as no


def test_pope_numbers_match_a_hand_count(tmp_path):
    labels = ["yes", "yes", "no", "no", "yes"]
    answers = ["Yes", "No", "Yes", "No", "Yes"]  # tp 2, fn 1, fp 1, tn 1
    scores = h.binary_scores(labels, [h.pope_answer(a) for a in answers])
    assert scores == pytest.approx({"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                    "yes_ratio": 3 / 5, "n": 5})
    path = tmp_path / "coco_pope_adversarial.json"  # POPE's own file: no category, the split is in the name
    path.write_text("".join(json.dumps({"question_id": i + 1, "image": "x.jpg", "text": "Is there a dog?",
                                        "label": label}) + "\n" for i, label in enumerate(labels)))
    labelled = h.read_pope_labels(path)
    assert {split for split, _ in labelled.values()} == {"adversarial"}
    result = h.pope_scores(labelled, {str(i + 1): a for i, a in enumerate(answers)})
    assert result["adversarial"]["f1"] == pytest.approx(2 / 3) and result["average"]["f1"] == pytest.approx(2 / 3)
    assert 0 < result["adversarial"]["accuracy_se"] < 0.5
    with pytest.raises(h.HallucinationError, match="no answer"):
        h.pope_scores(labelled, {"1": "Yes"})


# ---- CHAIR --------------------------------------------------------------------------------------------------------

def test_chair_counts_every_mention_against_the_boxes():
    vocabulary = h.ChairVocabulary.scene()
    objects = {"a.png": {"red circle"}, "b.png": {"blue square", "green triangle"}}
    described = [("a.png", "A large red circle and two blue squares. The red circle is on the left."),
                 ("b.png", "A small blue square above a green triangle.")]
    scores = h.chair_scores(described, objects, vocabulary)
    assert scores["mentions"] == 5 and scores["hallucinated_mentions"] == 1
    assert scores["chair_i"] == pytest.approx(1 / 5) and scores["chair_s"] == pytest.approx(1 / 2)
    assert scores["per_description"][0]["hallucinated"] == ["blue square"]


def test_coco_vocabulary_prefers_the_longest_phrase_and_reads_synonym_files(tmp_path):
    coco = h.ChairVocabulary.coco()
    assert len(coco.categories) == 80
    assert coco.mentions("Two men ride bikes past a hot dog stand and a dog.") == ["person", "bicycle", "hot dog",
                                                                                    "dog"]
    path = tmp_path / "synonyms.txt"
    path.write_text("person, girl, boy, man\ndining table, table\n")
    custom = h.ChairVocabulary.from_file(path)
    assert custom.mentions("A girl at the dining table, a boy at a table.") == ["person", "dining table", "person",
                                                                                "dining table"]


def test_demo_and_real_prefer_configs_bind():
    """Both stage configs bind strictly, and a run config with a prefer section passes the runner's up-front check."""
    from pipeline.runner import RunConfig, validate_sections
    from stages import prefer
    from stages.common import bind_stage
    from stages.config import bind, load_config

    real = bind_stage(prefer.SCHEMA, load_config(REPO / "configs" / "vicuna-7b-prefer.yaml"), name="real",
                      train_sections=prefer.TRAIN_SECTIONS)
    assert real.adapter["method"] == "lora" and real.train.lr == 1e-7 and real.train.zero_stage == 2
    demo = bind_stage(prefer.SCHEMA, load_config(REPO / "configs" / "tiny-demo-prefer.yaml"), name="demo",
                      train_sections=prefer.TRAIN_SECTIONS)
    assert demo.model == "runs/demo/instruct/final" and demo.data is None and demo.train.precision == "fp32"
    run = load_config(REPO / "configs" / "micro-demo.yaml")
    run["prefer"] = {"beta": 0.1, "train": {"max_steps": 2}}
    validate_sections(bind(RunConfig, run, "micro+prefer"), "micro+prefer")
    run["prefer"]["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_sections(bind(RunConfig, run, "micro+prefer"), "micro+prefer")
