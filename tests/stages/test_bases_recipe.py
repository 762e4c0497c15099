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
                       "corpus": {"scenes": 40, "seed": 3, "object_words": True},
                       "probe": {"questions": 10, "seed": 5}, "ship_to": str(dest)})
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


def test_the_manifest_names_the_commit_the_run_started_from(scene_data, tmp_path, monkeypatch):
    """A commit made while the bases train (the recipe takes an hour) is not the code that built them."""
    from stages import base

    heads = iter(["commit-at-start", "commit-made-meanwhile", "commit-made-meanwhile"])
    monkeypatch.setattr(base, "_commit", lambda: next(heads))
    cfg = bound(base, {**MICRO_BASE, "output_dir": str(tmp_path / "run"), "captions": str(scene_data.captions),
                       "corpus": {"scenes": 10, "seed": 3}, "ship_to": str(tmp_path / "dest")})
    base.run(cfg)
    assert json.loads((tmp_path / "dest" / "manifest.json").read_text())["commit"] == "commit-at-start"


def test_object_words_name_each_object_in_one_word_the_shipped_tokenizer_keeps_whole(shipped):
    """The scene line alone changes: "large red triangle" becomes "large_red_triangle" (the same draws otherwise),
    and the tokenizer the recipe trains encodes every such word as one piece of its own."""
    import re

    from data_gen.corpus import CorpusSpec, documents, probe_questions
    from llava.tokenizer import Tokenizer

    words, joined = documents(CorpusSpec(scenes=60, seed=4, style="qa", object_words=True, caption_fraction=0.5)), \
        documents(CorpusSpec(scenes=60, seed=4, style="qa", caption_fraction=0.5))

    def one_word(text):  # the scene line only (up to its line end); captions and questions keep their words
        line, rest = text.split("\n", 1) if "\n" in text else (text, None)
        line = re.sub(r"\b(small|large) (red|green|blue|yellow|purple|orange) (circle|square|triangle)\b",
                      r"\1_\2_\3", line)
        return line if rest is None else f"{line}\n{rest}"

    assert words.texts == [one_word(t) for t in joined.texts] and words.texts != joined.texts
    assert words.readings == [[(one_word(s[0][0]), s[0][1])] + s[1:] for s in joined.readings]
    assert all("_" not in text for segments in words.readings for text, _ in segments[1:])
    probe = probe_questions(20, seed=2, object_words=True)
    assert [one_word(q["scene"]) for q in probe_questions(20, seed=2)] == [q["scene"] for q in probe]
    _, outputs, dest = shipped
    tokenizer = Tokenizer(dest / "llama" / "tokenizer.model")
    for size in ("small", "large"):
        for colour in ("red", "green", "blue", "yellow", "purple", "orange"):
            for shape in ("circle", "square", "triangle"):
                pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(f"{size}_{colour}_{shape}")]
                assert pieces[-1] == f"{size}_{colour}_{shape}" and "".join(pieces) == f"\u2581{size}_{colour}_{shape}"
    with pytest.raises(ValueError, match="corpus.object_words"):
        CorpusSpec(object_words="yes")


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

    conversations, texts, readings = documents(CorpusSpec(scenes=30, seed=1))
    first = conversations[0][0]["value"]
    assert first.startswith("Objects: ") and "\n" in first and not readings
    assert all(t.startswith("Objects: ") and "\n" in t for t in texts)
    again = documents(CorpusSpec(scenes=30, seed=1))
    assert again.conversations == conversations  # deterministic
    other = documents(CorpusSpec(scenes=30, seed=2))
    assert other.conversations != conversations


def test_a_reading_document_trains_only_the_answers_each_after_the_scene_and_its_question():
    """Style "qa": `Objects: ...`, then `Q:`/`A:` lines; the labels (lm_documents) are the answer tokens and the final
    `</s>`, nothing of the scene or the questions. Checked against a re-parse of the decoded text."""
    import re

    from data_gen.corpus import CorpusSpec, documents
    from data_gen.vqa import SHORT_ANSWER_SUFFIX
    from llava.tokenizer import Tokenizer
    from stages.base import lm_documents

    corpus = documents(CorpusSpec(scenes=20, seed=1, style="qa"))
    chat = documents(CorpusSpec(scenes=20, seed=1, style="chat"))
    assert len(corpus.readings) == sum(c[0]["value"].endswith(SHORT_ANSWER_SUFFIX) for c in chat.conversations) > 15
    assert corpus.texts == chat.texts  # only the short-answer documents change style
    tokenizer = Tokenizer(Path(__file__).parents[2] / "assets" / "tiny-bases" / "llama" / "tokenizer.model")
    docs = lm_documents([], [], tokenizer, "vicuna_v1", readings=corpus.readings)
    assert len(docs) == len(corpus.readings)
    for segments, (ids, labels) in zip(corpus.readings, docs):
        text = "".join(t for t, _ in segments)
        assert text.startswith("Objects: ") and SHORT_ANSWER_SUFFIX not in text
        lines = text.splitlines()
        questions, answers = lines[1::2], lines[2::2]  # scene, then question / answer lines in turn
        assert len(lines) % 2 == 1 and len(answers) >= 1
        assert all(re.fullmatch(r"Q: .+\nA:", f"{q}\n{a[:2]}") for q, a in zip(questions, answers))
        trained = [t for t in labels if t != -100]
        assert trained[-1] == tokenizer.eos_id and ids[0] == tokenizer.bos_id
        said = tokenizer.decode(trained[:-1])  # each answer and its line end, nothing else
        assert said.count("\n") == len(answers) and said.split() == [a.removeprefix("A:") for a in answers]


def test_chat_fraction_writes_that_share_of_the_scenes_as_chats_and_leaves_the_rest_as_they_were():
    from data_gen.corpus import CorpusSpec, documents
    from data_gen.vqa import SHORT_ANSWER_SUFFIX

    def short_chats(corpus):
        return [c for c in corpus.conversations if c[0]["value"].endswith(SHORT_ANSWER_SUFFIX)]

    plain = documents(CorpusSpec(scenes=400, seed=3, style="qa"))
    mixed = documents(CorpusSpec(scenes=400, seed=3, style="qa", chat_fraction=0.3))
    assert short_chats(plain) == []
    chats, readings = short_chats(mixed), mixed.readings
    assert len(chats) + len(readings) == len(plain.readings)  # every scene keeps its questions, in one style
    assert 0.22 < len(chats) / len(plain.readings) < 0.38
    for chat in chats:  # the chat's first question opens with its scene, then turns alternate
        assert chat[0]["value"].startswith("Objects: ") and [t["from"] for t in chat] == ["human", "gpt"] * (len(chat) // 2)
    assert documents(CorpusSpec(scenes=400, seed=3, style="qa", chat_fraction=0.0)) == plain
    with pytest.raises(ValueError, match="chat_fraction"):
        CorpusSpec(style="qa", chat_fraction=1.5)
    for bad in (1.5, -0.1, True, "0.3"):
        with pytest.raises(ValueError, match="corpus.paraphrase_fraction"):
            CorpusSpec(paraphrase_fraction=bad)


def test_category_weights_change_how_often_each_kind_of_question_is_asked():
    from data_gen.corpus import CorpusSpec, documents

    colours = {"red", "green", "blue", "yellow", "purple", "orange"}  # written here, not read from data_gen.world

    def colour_share(**weights):
        readings = documents(CorpusSpec(scenes=300, seed=6, style="qa", category_weights=weights)).readings
        answers = [text.strip() for segments in readings for text, trained in segments if trained]
        return sum(a in colours for a in answers) / len(answers)

    plain, more, none = colour_share(), colour_share(color=4.0), colour_share(color=0)
    assert 0.1 < plain < 0.25 and more > 1.3 * plain and none == 0.0
    assert documents(CorpusSpec(scenes=50, seed=6, category_weights={})) == documents(CorpusSpec(scenes=50, seed=6))
    with pytest.raises(ValueError, match="colour"):
        CorpusSpec(category_weights={"colour": 2.0})
    with pytest.raises(ValueError, match="every category weighs 0"):
        CorpusSpec(category_weights=dict.fromkeys(("color", "shape", "count", "exist", "position"), 0))


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

    conversations = documents(CorpusSpec(scenes=300, seed=4, paraphrase_fraction=0.5)).conversations
    asked = {turn["value"].split("\n")[-2] if "\n" in turn["value"] else turn["value"]
             for c in conversations for turn in c if turn["from"] == "human" and SHORT_ANSWER_SUFFIX in turn["value"]}
    readings = documents(CorpusSpec(scenes=300, seed=4, paraphrase_fraction=0.5, style="qa")).readings
    asked.update(text.removeprefix("Q: ").removesuffix("\nA:")
                 for segments in readings for text, trained in segments if text.startswith("Q: "))
    for index in range(300):
        asked.update(t["question"].removesuffix(SHORT_ANSWER_SUFFIX)
                     for t in short_answer_turns(scene_record(4, index, 64), Vocabulary(), turns=(8, 10)))
    assert len(asked) > 500
    for kind, templates in eval_templates().items():
        for template in templates:
            pattern = re.compile(".+".join(map(re.escape, re.split(r"\{\w+\}", template))))
            assert not [q for q in asked if pattern.fullmatch(q)], (kind, template)


def test_packing_keeps_documents_whole_and_alone_when_asked():
    """Documents of random lengths (some longer than a block): every packing mode loses no trained token of a document
    that fits, `whole_documents` never splits one, `one_per_block` never puts two in one block."""
    import random

    from stages.base import PackedText

    rng = random.Random(7)
    docs = []
    for k in range(60):
        ids = [1] + [rng.randrange(3, 50) for _ in range(rng.randrange(2, 40))]
        docs.append((ids, [-100 if rng.random() < 0.5 else t for t in ids]))
    for whole, alone in ((True, False), (False, True), (True, True)):
        packed = PackedText(docs, 33, seed=1, whole_documents=whole, pad_id=0, one_per_block=alone)
        starts = (packed.blocks == 1).sum(1)  # id 1 only opens a document
        assert int(starts.sum()) == len(docs)
        if alone:
            assert starts.tolist() == [1] * len(docs)
        kept = sorted(t for block in packed.labels.tolist() for t in block if t != -100)
        expected = sorted(t for ids, labels in docs for t in labels[:33] if t != -100)
        assert kept == expected


def test_the_next_token_loss_is_the_same_without_the_padding_columns_no_label_needs():
    from llava.model.llama import Llama, LlamaConfig
    from stages.base import NextTokenObjective

    config = LlamaConfig.from_name("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=50)
    objective = NextTokenObjective(Llama(config).init_weights(seed=0))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (3, 20), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[0, 4:9], labels[1, 2:12], labels[2, 6] = ids[0, 4:9], ids[1, 2:12], ids[2, 6]
    ids[:, 12:] = 0  # padding after the last trained label
    logits = objective.llm(ids[:, :-1])
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    out = objective(ids, labels)
    assert out["logits"].shape[1] == 11  # positions 0..10 predict the labels up to position 11
    torch.testing.assert_close(out["loss"], full, rtol=1e-5, atol=1e-6)


def test_the_reading_curve_bench_trains_and_probes(capsys):
    """bench/reading_curve.py end to end on a tiny shape: its training rows and its probe line per category."""
    import importlib.util

    path = Path(__file__).parents[2] / "bench" / "reading_curve.py"
    spec = importlib.util.spec_from_file_location("reading_curve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--steps", "2", "--every", "2", "--batch", "2", "--questions", "2", "--dim", "32", "--layers", "1",
                 "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--answers-only"])
    out = capsys.readouterr().out
    assert "probe at step 2: " in out
    assert all(f"'{c}': " in out for c in ("color", "count", "exist", "position", "shape"))


def test_the_binding_bench_recomputes_each_layers_own_attention():
    """bench/binding.py's recorder: its weights, applied to the layer's own values and output projection, give the
    layer's output (computed by the model's fused kernel), for grouped-query heads; rows are causal and sum to 1."""
    import importlib.util

    from llava.model.llama import Attention, Llama, LlamaConfig

    path = Path(__file__).parents[2] / "bench" / "binding.py"
    spec = importlib.util.spec_from_file_location("binding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = LlamaConfig.from_name("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=50,
                                   max_seq_len=64)
    llm = Llama(config).init_weights(std=0.3, seed=0).eval()  # large weights: attention far from uniform
    recorder = module.AttentionRecorder(llm)
    seen = []
    for attention in (m for m in llm.modules() if isinstance(m, Attention)):
        attention.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
    weights = recorder.run(lambda: llm(torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))))
    assert len(weights) == len(seen) == 2
    for w, (attention, x, out) in zip(weights, seen):
        assert w.shape == (4, 12, 12) and torch.allclose(w.sum(-1), torch.ones(4, 12))
        assert float(w.triu(1).abs().max()) == 0.0 and float(w.max()) > 0.5
        v = attention.v_proj(x)[0].view(12, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)  # [heads, T, head_dim]
        mixed = (w @ v).transpose(0, 1).reshape(12, 32)
        torch.testing.assert_close(attention.o_proj(mixed), out[0], rtol=1e-4, atol=1e-5)
    # a noun of the scene text is a shape word or, with one word per object, the object's word
    assert [module.shape_of(p) for p in ("triangle", "large_red_triangle", "small_blue_circle", "red", "_triangle",
                                         "huge_red_triangle", "large_red")] == \
        ["triangle", "triangle", "circle", None, None, None, None]
