"""The bases recipe in miniature: the base stage with a scene-as-text corpus, the text probe on the trainer's eval hook,
and shipping (layout, manifest, sha256 check). Seconds, not the full pretraining."""
import json
from pathlib import Path

import pytest
import torch

from stage_helpers import MICRO_BASE, bound


@pytest.fixture(scope="module")
def shipped(scene_data, tmp_path_factory):
    from stages import base

    out, dest = tmp_path_factory.mktemp("bases_run"), tmp_path_factory.mktemp("bases") / "tiny-bases"
    lm = {**MICRO_BASE["lm"], "whole_documents": True, "train": {**MICRO_BASE["lm"]["train"], "eval_every": 6}}
    cfg = bound(base, {**MICRO_BASE, "lm": lm, "output_dir": str(out), "captions": str(scene_data.captions),
                       "corpus": {"scenes": 40, "seed": 3}, "probe": {"questions": 10, "seed": 5},
                       "ship_to": str(dest)})
    return cfg, base.run(cfg), dest


def test_the_recipe_ships_both_models_with_a_manifest_that_checks(shipped):
    from stages.base import check_manifest

    cfg, outputs, dest = shipped
    manifest = check_manifest(dest)
    assert sorted(manifest["files"]) == ["clip/open_clip_config.json", "clip/open_clip_model.safetensors",
                                         "llama/config.json", "llama/model.safetensors", "llama/tokenizer.model"]
    assert manifest["seed"] == cfg.seed and manifest["config"]["corpus"]["scenes"] == 40
    # the probe ran on the eval hook (every 6 of 12 steps) and its last numbers are the manifest's
    assert [point["step"] for point in manifest["text_probe_curve"]] == [6, 12]
    assert set(manifest["text_probe"]) == {"probe", "probe_color", "probe_count", "probe_exist", "probe_position",
                                           "probe_shape"}
    shipped_llm = (dest / "llama" / "model.safetensors").read_bytes()
    assert shipped_llm == (Path(outputs["llm"]) / "model.safetensors").read_bytes()


def test_a_changed_file_fails_the_manifest_check(shipped, tmp_path):
    import shutil

    from stages.base import check_manifest

    _, _, dest = shipped
    copy = tmp_path / "copy"
    shutil.copytree(dest, copy)
    config = json.loads((copy / "llama" / "config.json").read_text())
    (copy / "llama" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pytest.raises(ValueError, match="llama/config.json has another sha256"):
        check_manifest(copy)
    (copy / "clip" / "open_clip_model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        check_manifest(copy)


def test_the_corpus_puts_scene_text_before_its_questions():
    from data_gen.corpus import CorpusSpec, documents

    conversations, texts = documents(CorpusSpec(scenes=30, seed=1))
    first = conversations[0][0]["value"]
    assert first.startswith("Objects: ") and "\n" in first
    assert all(t.startswith("Objects: ") and "\n" in t for t in texts)
    again, _ = documents(CorpusSpec(scenes=30, seed=1))
    assert again == conversations  # deterministic
    other, _ = documents(CorpusSpec(scenes=30, seed=2))
    assert other != conversations


def test_probe_questions_go_round_robin_and_name_what_the_scene_text_says():
    from data_gen.corpus import probe_questions

    questions = probe_questions(10, seed=0)
    assert [q["category"] for q in questions[:5]] == ["color", "shape", "count", "exist", "position"]
    assert all(q["answer"] for q in questions)
    for q in questions:  # a colour or shape answer is a word of the scene text: the probe asks for reading
        if q["category"] in ("color", "shape"):
            assert q["answer"] in q["scene"]


def test_no_training_question_is_worded_like_an_evaluation_paraphrase():
    """Every eval-only template, as a pattern, against every question of the corpus and of the generator's
    short-answer training data on 300 scenes: none matches, so a paraphrase score cannot come from seen wording."""
    import re

    from data_gen.corpus import CorpusSpec, documents, scene_record
    from data_gen.paraphrases import eval_templates
    from data_gen.vqa import SHORT_ANSWER_SUFFIX, short_answer_turns
    from data_gen.world import Vocabulary

    conversations, _ = documents(CorpusSpec(scenes=300, seed=4, paraphrase_fraction=0.5))
    asked = {turn["value"].split("\n")[-2] if "\n" in turn["value"] else turn["value"]
             for c in conversations for turn in c if turn["from"] == "human" and SHORT_ANSWER_SUFFIX in turn["value"]}
    for index in range(300):
        asked.update(t["question"].removesuffix(SHORT_ANSWER_SUFFIX)
                     for t in short_answer_turns(scene_record(4, index, 64), Vocabulary(), turns=(8, 10)))
    assert len(asked) > 500
    for kind, templates in eval_templates().items():
        for template in templates:
            pattern = re.compile(".+".join(map(re.escape, re.split(r"\{\w+\}", template))))
            assert not [q for q in asked if pattern.fullmatch(q)], (kind, template)
