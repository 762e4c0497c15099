"""The demo foundation stage: tokenizer, CLIP and LLaMA come out loadable by their own libraries."""
import json
from pathlib import Path

import torch

from stage_helpers import losses


def test_tokenizer_is_trained_on_the_scene_text_and_shipped_with_the_llm(base_run):
    from llava.tokenizer import Tokenizer

    tokenizer = Tokenizer(base_run.outputs["tokenizer"])
    assert 256 < tokenizer.vocab_size <= 400
    text = "USER: What color is the small triangle? ASSISTANT: red"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("triangle")) == 1  # a scene word is one piece, not bytes
    copied = Path(base_run.outputs["llm"]) / "tokenizer.model"
    assert copied.read_bytes() == Path(base_run.outputs["tokenizer"]).read_bytes()


def test_clip_loads_through_open_clip_and_as_the_llava_vision_tower(base_run):
    import open_clip
    from safetensors.torch import load_file

    from stages.common import ModelSpec, build_model, llava_config

    clip_dir = base_run.outputs["vision_tower"]
    saved = load_file(str(Path(clip_dir) / "open_clip_model.safetensors"))
    reference = open_clip.create_model(f"local-dir:{clip_dir}")  # open_clip's own reader of the layout
    assert all(torch.equal(saved[k], v) for k, v in reference.state_dict().items())
    assert saved["logit_scale"].shape == ()
    config = json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["model_cfg"]
    assert config["vision_cfg"]["image_size"] == 32 and config["text_cfg"]["pool_type"] == "eos"
    fresh = open_clip.CLIP(**config)  # same architecture, untrained: the saved weights must differ from an init
    assert not torch.equal(fresh.visual.conv1.weight, reference.visual.conv1.weight)

    as_dir = ModelSpec(llm=base_run.outputs["llm"], vision_tower=clip_dir, projector_type="linear")
    as_files = ModelSpec(llm=base_run.outputs["llm"], vision_tower=f"{clip_dir}/open_clip_config.json",
                         vision_weights=f"{clip_dir}/open_clip_model.safetensors", projector_type="linear")
    for spec in (as_dir, as_files):
        model, _ = build_model(*llava_config(spec, template="plain", max_len=64), torch.float32)
        assert all(torch.equal(saved[f"visual.{k}"], v) for k, v in model.vision.visual.state_dict().items())
        assert model.num_image_tokens == 16  # 32 px / patch 8


def test_llm_is_a_hugging_face_llama_that_transformers_loads(base_run):
    from transformers import LlamaForCausalLM

    from llava.model.llama import Llama
    from llava.tokenizer import Tokenizer

    ours = Llama.from_hf(base_run.outputs["llm"])
    theirs = LlamaForCausalLM.from_pretrained(base_run.outputs["llm"]).eval()
    assert ours.config.vocab_size == Tokenizer(base_run.outputs["tokenizer"]).vocab_size
    ids = torch.tensor([Tokenizer(base_run.outputs["tokenizer"]).encode("There is a red circle.", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_both_trainings_ran_on_the_trainer_and_the_lm_learned(base_run):
    lm = losses(base_run.out / "lm_train")
    assert len(lm) == 12 and lm[-1] < lm[0] - 1.0  # from ~ln(vocab) down
    assert len(losses(base_run.out / "clip_train")) == 3
    for sub in ("clip_train", "lm_train"):
        assert list((base_run.out / sub / "checkpoints").glob("step_*/complete.json"))
    assert (base_run.out / "config.yaml").is_file()


def test_box_weights_average_exactly_the_patches_a_box_touches():
    from stages.base import box_weights

    weights = box_weights((0.0781, 0.5, 0.25, 0.6719), 8).view(8, 8)
    assert weights.nonzero().tolist() == [[4, 0], [4, 1], [5, 0], [5, 1]]
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    assert box_weights((0.9, 0.9, 1.0, 1.0), 8).view(8, 8).nonzero().tolist() == [[7, 7]]  # the edge stays inside
    assert box_weights((0.5, 0.5, 0.5001, 0.5002), 8).nonzero().flatten().tolist() == [36]  # a sliver: one patch


def _tiny_clip():
    import open_clip

    from stages.base import ClipSpec, clip_model_config

    spec = ClipSpec(image_size=32, patch_size=8, width=32, layers=2, head_width=16, embed_dim=16, text_width=32,
                    text_layers=1, context_length=12)
    torch.manual_seed(0)
    return open_clip.CLIP(**clip_model_config(spec, vocab_size=50, eos_id=2, pad_id=0), output_dict=True)


def _clip_inputs(n: int):
    """A tiny CLIP, `n` random images and captions (</s> at 6, then padding) and 4 one-piece phrases."""
    clip = _tiny_clip()
    images = torch.randn(n, 3, 32, 32)
    texts = torch.randint(3, 50, (n, 12))
    texts[:, 6], texts[:, 7:] = 2, 0
    phrases = torch.zeros(4, 12, dtype=torch.long)
    phrases[:, 0], phrases[:, 1] = torch.tensor([5, 6, 7, 8]), 2
    return clip, images, texts, phrases


def test_contrastive_objective_is_open_clips_loss_plus_the_region_phrase_term():
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from stages.base import ContrastiveObjective, box_weights

    clip, images, texts, phrases = _clip_inputs(3)
    boxes = [[(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], [(0.2, 0.2, 0.9, 0.6)], []]
    labels = [[3, 1], [3], []]
    regions = torch.zeros(3, 2, 16)
    region_labels = torch.full((3, 2), -1)
    for i, (bs, ls) in enumerate(zip(boxes, labels)):
        for k, (box, label) in enumerate(zip(bs, ls)):
            regions[i, k], region_labels[i, k] = box_weights(box, 4), label

    out = clip(images, texts)
    contrastive = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    plain = ContrastiveObjective(clip, 0, 1)(images, texts)["loss"]
    torch.testing.assert_close(plain, contrastive)  # weight 0 / no boxes: exactly open_clip's CLIP + ClipLoss

    objective = ContrastiveObjective(clip, 0, 1, phrases, region_weight=0.5)
    loss = objective(images, texts, regions, region_labels)["loss"]
    assert clip.visual.output_tokens is False  # the saved model stays a plain CLIP
    # by hand: mean of the patch tokens under each box, CLIP's projection, cosine to the present labels (1 and 3)
    clip.visual.output_tokens = True
    _, tokens = clip.visual(images)
    clip.visual.output_tokens = False
    feats, targets = [], []
    for i, (bs, ls) in enumerate(zip(boxes, labels)):
        for box, label in zip(bs, ls):
            feats.append(tokens[i][box_weights(box, 4) > 0].mean(0) @ clip.visual.proj)
            targets.append([1, 3].index(label))
    phrase_features = clip.encode_text(phrases[[1, 3]], normalize=True)
    logits = clip.logit_scale.exp() * F.normalize(torch.stack(feats), dim=-1) @ phrase_features.T
    torch.testing.assert_close(loss, contrastive + 0.5 * F.cross_entropy(logits, torch.tensor(targets)))


def test_the_patch_region_term_classifies_every_patch_a_box_overlaps_on_its_own():
    """region_pool "patch": each grid cell a box overlaps (worked out here from the cell edges, not box_weights) is
    one sample of the region term, labelled with its box; a cell two boxes overlap counts once per box."""
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from stages.base import ContrastiveObjective, box_weights

    torch.manual_seed(0)
    clip, images, texts, phrases = _clip_inputs(2)
    boxes = [[(0.1, 0.1, 0.6, 0.3), (0.5, 0.2, 0.8, 0.9)], [(0.0, 0.75, 0.2, 1.0)]]
    labels = [[2, 0], [2]]
    regions = torch.zeros(2, 2, 16)
    region_labels = torch.full((2, 2), -1)
    for i, (bs, ls) in enumerate(zip(boxes, labels)):
        for k, (box, label) in enumerate(zip(bs, ls)):
            regions[i, k], region_labels[i, k] = box_weights(box, 4), label

    loss = ContrastiveObjective(clip, 0, 1, phrases, region_weight=2.0, region_pool="patch")(
        images, texts, regions, region_labels)["loss"]
    out = clip(images, texts)
    contrastive = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    clip.visual.output_tokens = True
    _, tokens = clip.visual(images)
    clip.visual.output_tokens = False
    feats, targets = [], []
    for i, (bs, ls) in enumerate(zip(boxes, labels)):
        for (x0, y0, x1, y1), label in zip(bs, ls):
            for row in range(4):
                for col in range(4):
                    if col / 4 < x1 and (col + 1) / 4 > x0 and row / 4 < y1 and (row + 1) / 4 > y0:
                        feats.append(tokens[i][row * 4 + col] @ clip.visual.proj)
                        targets.append([0, 2].index(label))
    assert len(feats) == 6 + 8 + 1  # 3x2 cells, 2x4 cells (two of them shared with the first box), 1 cell
    phrase_features = clip.encode_text(phrases[[0, 2]], normalize=True)
    logits = clip.logit_scale.exp() * F.normalize(torch.stack(feats), dim=-1) @ phrase_features.T
    torch.testing.assert_close(loss, contrastive + 2.0 * F.cross_entropy(logits, torch.tensor(targets)))


def test_the_place_term_asks_each_region_token_for_its_boxs_column_and_row():
    """place_weight: a linear head on the region tokens (here per patch, before CLIP's projection) classifies their
    box's column among 3 and row among 3; a box with an ambiguous row trains no row. The places and the patches
    under each box are written down by hand, not computed by the code under test."""
    import torch.nn.functional as F

    from stages.base import ContrastiveObjective, box_places, box_weights

    torch.manual_seed(1)
    clip, images, texts, phrases = _clip_inputs(2)
    # box 1: centre (0.125, 0.125) -> left, top. box 2: centre (0.8, 0.5) -> right, middle. box 3: centre y 0.35,
    # within 0.04 of the line at 1/3 -> no row; centre x 0.5 -> center.
    boxes = [[(0.0, 0.0, 0.25, 0.25), (0.7, 0.4, 0.9, 0.6)], [(0.4, 0.3, 0.6, 0.4)]]
    hand = [[(0, 0), (2, 1)], [(1, -1)]]
    assert [[box_places(b) for b in bs] for bs in boxes] == hand
    regions, region_labels = torch.zeros(2, 2, 16), torch.full((2, 2), -1)
    region_places = torch.full((2, 2, 2), -1)
    for i, bs in enumerate(boxes):
        for k, box in enumerate(bs):
            regions[i, k], region_labels[i, k], region_places[i, k] = box_weights(box, 4), 1, torch.tensor(hand[i][k])

    objective = ContrastiveObjective(clip, 0, 1, phrases, region_weight=1.0, region_pool="patch", place_weight=0.5)
    loss = objective(images, texts, regions, region_labels, region_places)["loss"]
    without = ContrastiveObjective(clip, 0, 1, phrases, region_weight=1.0, region_pool="patch")(
        images, texts, regions, region_labels, region_places)["loss"]
    clip.visual.output_tokens = True
    _, tokens = clip.visual(images)
    clip.visual.output_tokens = False
    # the 4x4 cells under each box: box 1 covers cell 0; box 2 columns 2-3 of rows 1-2; box 3 columns 1-2 of row 1
    cells = [[[0], [6, 7, 10, 11]], [[5, 6]]]
    weight, bias = objective.place_head.weight, objective.place_head.bias
    column_logits, column_y, row_logits, row_y = [], [], [], []
    for i in range(2):
        for k, patches in enumerate(cells[i]):
            for patch in patches:
                logits = weight @ tokens[i][patch] + bias
                column_logits.append(logits[:3])
                column_y.append(hand[i][k][0])
                if hand[i][k][1] >= 0:
                    row_logits.append(logits[3:])
                    row_y.append(hand[i][k][1])
    assert len(column_logits) == 7 and len(row_logits) == 5
    columns = F.cross_entropy(torch.stack(column_logits), torch.tensor(column_y))
    rows = F.cross_entropy(torch.stack(row_logits), torch.tensor(row_y))
    torch.testing.assert_close(loss, without + 0.5 * (columns + rows))
    assert not any(k.startswith("place_head") for k in clip.state_dict())  # the saved tower stays a plain CLIP


def test_clip_spec_names_a_bad_region_or_place_setting():
    import pytest

    from stages.base import ClipSpec
    from stages.config import ConfigError

    for kwargs, match in (({"region_weight": -1.0}, "region_weight must be >= 0"),
                          ({"region_pool": "max"}, "region_pool must be 'mean' or 'patch', got 'max'"),
                          ({"place_weight": -0.5}, "place_weight must be >= 0"),
                          ({"place_weight": 1.0, "region_weight": 0.0}, "needs region_weight > 0")):
        with pytest.raises(ConfigError, match=match):
            ClipSpec(**kwargs)
    assert ClipSpec(place_weight=1.0, region_pool="patch").place_weight == 1.0


def test_bad_boxes_in_the_captions_file_are_named(tmp_path):
    import pytest

    from llava.data.errors import DataError
    from stages.base import read_captions

    good = {"image": "a.png", "captions": ["A red circle."], "boxes": [{"label": "red circle", "bbox": [0, 0, .5, .5]}]}
    path = tmp_path / "captions.jsonl"
    for box, match in (({"bbox": [0, 0, .5, .5]}, r"captions.jsonl:2: boxes\[0\]: a box must be an object with "
                                                  r"keys 'label' and 'bbox'"),
                       ({"label": "x", "bbox": [.5, 0, .2, .5]}, r"captions.jsonl:2: boxes\[0\]: key 'bbox' .* is in "
                                                                 r"the wrong order"),
                       ({"label": "x", "bbox": [0, 0, 2, 1]}, r"captions.jsonl:2: boxes\[0\]: key 'bbox' .* is out "
                                                              r"of range")):
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "boxes": [box]}) + "\n")
        with pytest.raises(DataError, match=match):
            read_captions(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "boxes": "none"}) + "\n")
    with pytest.raises(DataError, match=r"captions.jsonl:2: 'boxes' must be a list"):
        read_captions(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_captions(path)[0]["boxes"] == [("red circle", (0.0, 0.0, 0.5, 0.5))]


def test_the_micro_base_run_trained_clip_with_the_scene_boxes(base_run, scene_data):
    from llava.model.vision import ImageProcessor
    from llava.tokenizer import Tokenizer
    from stages.base import CaptionPairs, read_captions

    records = read_captions(scene_data.captions)
    dataset = CaptionPairs(records, scene_data.images, Tokenizer(base_run.outputs["tokenizer"]), ImageProcessor(32),
                           context_length=48, grid=4)
    item = dataset[0]
    n_boxes = len(records[0]["boxes"])
    assert item["regions"].shape == (dataset.max_boxes, 16) and 1 <= n_boxes <= dataset.max_boxes
    torch.testing.assert_close(item["regions"][:n_boxes].sum(1), torch.ones(n_boxes))
    assert (item["region_labels"][:n_boxes] >= 0).all() and (item["region_labels"][n_boxes:] == -1).all()
    assert [dataset.phrases[i] for i in item["region_labels"][:n_boxes]] == [b[0] for b in records[0]["boxes"]]
    assert item["region_places"].shape == (dataset.max_boxes, 2) and (item["region_places"][n_boxes:] == -1).all()
    assert ((item["region_places"] >= -1) & (item["region_places"] <= 2)).all()
    assert base_run.cfg.clip.region_weight > 0


def test_a_batch_without_boxes_adds_nothing_but_still_runs_the_phrase_tower_and_place_head():
    from open_clip.loss import ClipLoss

    from stages.base import ContrastiveObjective

    clip = _tiny_clip()
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(3, 50, (2, 12))
    texts[:, 5], texts[:, 6:] = 2, 0
    phrases = torch.zeros(2, 12, dtype=torch.long)
    phrases[:, 0], phrases[:, 1] = torch.tensor([5, 6]), 2
    calls = []
    clip.token_embedding.register_forward_hook(lambda *_: calls.append(1))
    objective = ContrastiveObjective(clip, 0, 1, phrases, region_weight=1.0)
    loss = objective(images, texts, torch.zeros(2, 1, 16), torch.full((2, 1), -1))["loss"]
    assert len(calls) == 2  # captions and one phrase: every rank makes the same ZeRO-3 gathers
    out = clip(images, texts)
    torch.testing.assert_close(loss, ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]))
    head_calls = []
    objective = ContrastiveObjective(clip, 0, 1, phrases, region_weight=1.0, place_weight=1.0)
    objective.place_head.register_forward_hook(lambda *_: head_calls.append(1))
    with_places = objective(images, texts, torch.zeros(2, 1, 16), torch.full((2, 1), -1),
                            torch.full((2, 1, 2), -1))["loss"]
    assert head_calls == [1]  # the place head runs too, adding nothing
    torch.testing.assert_close(with_places, loss)


def test_lm_init_std_reaches_the_llama_init_and_is_checked(monkeypatch):
    import pytest

    from llava.model.llama import Llama
    from stages import base
    from stages.config import ConfigError

    for bad in (0, -0.02, True, "0.08"):
        with pytest.raises(ConfigError, match="base.lm.init_std must be a number > 0"):
            base.LMSpec(init_std=bad)

    class Stop(Exception):
        pass

    seen = []

    def init_weights(self, std=0.02, seed=None):  # record what train_lm asks for, then stop before training
        seen.append((std, seed))
        raise Stop

    monkeypatch.setattr(Llama, "init_weights", init_weights)
    lm = base.LMSpec(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64, init_std=0.08)
    cfg = base.BaseConfig(output_dir="unused", captions="unused", seed=3, lm=lm)
    tokenizer = type("Tok", (), {"vocab_size": 50, "bos_id": 1, "eos_id": 2})()
    with pytest.raises(Stop):
        base.train_lm(cfg, [], tokenizer, None)
    assert seen == [(0.08, 3)]
