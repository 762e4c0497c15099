"""Micro data and micro runs shared by the stage tests: 24 scenes of 32 px, their offline instruction data (plus a few
text-only samples), and one run of each stage on tiny models, made once per session and read by several tests."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from stage_helpers import MICRO_BASE, MICRO_TRAIN, bound, snapshot  # noqa: E402


@pytest.fixture(scope="session")
def scene_data(tmp_path_factory):
    from data_gen.driver import generate
    from data_gen.scenes import render_scenes

    root = tmp_path_factory.mktemp("scene_data")
    render_scenes(root / "scenes", 24, seed=0, size=32, shards_per=12)
    generate(root / "scenes" / "captions.jsonl", root / "train.json", backend="offline",
             types=["short_answer", "conversation"], progress=False, workers=1)
    samples = json.loads((root / "train.json").read_text())
    samples += [{"id": f"text_{i}", "conversations": [
        {"from": "human", "value": f"Name {i + 1} shape kinds a scene can hold."},
        {"from": "gpt", "value": "Circles, squares and triangles."}]} for i in range(4)]
    (root / "train.json").write_text(json.dumps(samples))
    questions = [{"question_id": f"q{i}", "image": s["image"], "category": "color",
                  "text": s["conversations"][0]["value"].replace("<image>\n", ""),
                  "answer": s["conversations"][1]["value"]}
                 for i, s in enumerate(x for x in samples if x["id"].endswith("short_answer"))][:4]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return SimpleNamespace(root=root, captions=root / "scenes" / "captions.jsonl", images=root / "scenes" / "images",
                           shards=root / "scenes" / "shards", instruct=root / "train.json",
                           questions=root / "questions.jsonl", samples=samples)


@pytest.fixture(scope="session")
def base_run(scene_data, tmp_path_factory):
    from stages import base

    out = tmp_path_factory.mktemp("base")
    cfg = bound(base, {**MICRO_BASE, "output_dir": str(out), "captions": str(scene_data.captions),
                       "instruct_data": [str(scene_data.instruct)]})
    return SimpleNamespace(out=out, cfg=cfg, outputs=base.run(cfg))


def align_config(base_run, scene_data, out, **train):
    from stages import align

    return bound(align, {
        "output_dir": str(out), "shards": str(scene_data.shards), "max_len": 128, "shuffle_buffer": 8,
        "model": {"llm": base_run.outputs["llm"], "vision_tower": base_run.outputs["vision_tower"]},
        "train": {**MICRO_TRAIN, "max_steps": 8, "micro_batch_size": 6, "lr": 1e-2, "zero_stage": 2, **train}})


@pytest.fixture(scope="session")
def align_run(base_run, scene_data, tmp_path_factory):
    """Stage 1 built, snapshotted, trained: the model object and its weights before training stay available."""
    from stages import align

    cfg = align_config(base_run, scene_data, tmp_path_factory.mktemp("align"))
    model, tokenizer, llava_config = align.build(cfg)
    before = snapshot(model)
    probe = caption_batch(cfg, model, tokenizer)
    loss_before = probe_loss(model, probe)
    outputs = align.train(cfg, model, tokenizer, llava_config)
    return SimpleNamespace(cfg=cfg, model=model, before=before, outputs=outputs, out=Path(cfg.output_dir),
                           loss_before=loss_before, loss_after=probe_loss(model, probe))


def caption_batch(cfg, model, tokenizer) -> dict:
    """The first 12 pairs of the shards, collated as training collates them."""
    from llava.data.collate import Collator
    from llava.data.pairs import PairDataset

    dataset = PairDataset(cfg.shards, tokenizer, model.image_processor(), max_len=cfg.max_len, shuffle_buffer=1,
                          rank=0, world_size=1)
    batch = Collator(tokenizer.pad_id)([sample for sample, _ in zip(dataset, range(12))])
    return {k: v for k, v in batch.items() if k not in ("ids", "num_skipped")}


def probe_loss(model, batch) -> float:
    with torch.no_grad():
        return float(model(**batch)["loss"])


@pytest.fixture()
def probe_batch(scene_data):
    """Builds a fixed two-sample batch (one with an image, one text-only) for logits comparisons."""
    def make(model, tokenizer):
        from llava.conversation import tokenize_conversation
        from llava.data.collate import Collator
        from llava.data.images import open_rgb

        processor = model.image_processor()
        with_image = next(s for s in scene_data.samples if "image" in s)
        text_only = next(s for s in scene_data.samples if "image" not in s)
        samples = []
        for sample in (with_image, text_only):
            ids, labels = tokenize_conversation(sample["conversations"], tokenizer, model.config.template)
            images = [processor(open_rgb(scene_data.images / sample["image"]))] if "image" in sample else []
            samples.append({"id": sample["id"], "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                            "images": images})
        batch = Collator(tokenizer.pad_id)(samples)
        return {k: v for k, v in batch.items() if k not in ("ids", "num_skipped")}

    return make
