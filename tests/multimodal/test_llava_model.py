"""LlavaModel: the image splice, labels, loss, gradients, projector files, save/load and LLaVA-1.5 directories."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG
from llava.model.llama import CheckpointError, Llama, LlamaConfig
from llava.model.llava import LlavaConfig, LlavaModel
from llava.model.projector import build_projector

TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 8}  # 16 patches


def tiny_model(**overrides) -> LlavaModel:
    torch.manual_seed(0)
    config = LlavaConfig(**{"vision_tower": TINY_VISION, "llm": LlamaConfig.from_name("tiny"), "max_len": 256,
                            **overrides})
    return LlavaModel(config)


def padded_batch():
    """Rows with 0, 1 and 2 images, right-padded with pad id 0."""
    rows = [[1, 5, 6, 7], [1, 5, IMG, 9, 10], [1, IMG, 11, IMG, 12, 13]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.where(mask.bool() & (ids != IMG), ids, torch.full_like(ids, IGNORE_INDEX))
    labels[:, :2] = IGNORE_INDEX  # a prompt prefix
    torch.manual_seed(1)
    return rows, ids, mask, labels, torch.randn(3, 3, 32, 32)


def test_splice_puts_features_where_the_placeholders_were():
    model = tiny_model()
    rows, ids, mask, labels, images = padded_batch()
    embeds, label_rows = model.prepare_inputs_embeds(ids, images, mask, labels)
    features = model.encode_images(images)
    table = model.llm.embed_tokens.weight
    n = model.num_image_tokens
    expected = [
        table[[1, 5, 6, 7]],
        torch.cat([table[[1, 5]], features[0], table[[9, 10]]]),
        torch.cat([table[[1]], features[1], table[[11]], features[2], table[[12, 13]]]),
    ]
    for got, want in zip(embeds, expected):
        torch.testing.assert_close(got, want)
    ignore = [IGNORE_INDEX] * n
    assert [r.tolist() for r in label_rows] == [
        [IGNORE_INDEX, IGNORE_INDEX, 6, 7],
        [IGNORE_INDEX, IGNORE_INDEX] + ignore + [9, 10],
        [IGNORE_INDEX] + ignore + [11] + ignore + [12, 13],  # labels[:, 1] was the placeholder: masked anyway
    ]
    # The same rows left-padded (generation) or as a list of tensors give the same embeddings.
    width = ids.shape[1]
    left = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    left_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    for variant in (model.prepare_inputs_embeds(left, images, left_mask)[0],
                    model.prepare_inputs_embeds([torch.tensor(r) for r in rows], images)[0]):
        for got, want in zip(variant, expected):
            torch.testing.assert_close(got, want)


def test_forward_loss_is_mean_fp32_cross_entropy_over_supervised_tokens():
    model = tiny_model()
    _, ids, mask, labels, images = padded_batch()
    out = model(ids, labels, images, mask, return_logits=True)
    embeds, label_rows = model.prepare_inputs_embeds(ids, images, mask, labels)
    logits = model.llm(inputs_embeds=nn.utils.rnn.pad_sequence(embeds, batch_first=True))
    targets = nn.utils.rnn.pad_sequence(label_rows, batch_first=True, padding_value=IGNORE_INDEX)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out["loss"], expected)
    assert out["num_tokens"] == (targets[:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(out["logits"], logits)
    # Right padding never reaches real tokens: row 0 alone gives the same logits as inside the batch.
    alone = model(ids[:1, :4])["logits"]
    torch.testing.assert_close(out["logits"][0, :4], alone[0])
    assert model(ids, labels, images, mask)["logits"] is None  # not materialised unless asked for


def test_bf16_model_computes_the_loss_in_fp32():
    model = tiny_model().to(torch.bfloat16)
    _, ids, mask, labels, images = padded_batch()
    assert model(ids, labels, images, mask)["loss"].dtype == torch.float32


def test_sequences_are_cut_to_max_len_after_the_splice():
    model = tiny_model(max_len=20)
    _, ids, mask, labels, images = padded_batch()
    embeds, label_rows = model.prepare_inputs_embeds(ids, images, mask, labels, max_len=20)
    assert [len(e) for e in embeds] == [4, 20, 20] and [len(r) for r in label_rows] == [4, 20, 20]
    assert label_rows[1][-2:].tolist() == [9, 10]  # 2 + 16 + 2 = 20: the row fits exactly, labels aligned
    out = model(ids, labels, images, mask, return_logits=True)
    assert out["logits"].shape[1] == 20


def test_placeholder_and_image_counts_must_match():
    model = tiny_model()
    _, ids, mask, labels, images = padded_batch()
    with pytest.raises(ValueError, match="3 image placeholders .* but 2 images"):
        model(ids, labels, images[:2], mask)


def test_gradients_reach_the_projector_and_not_the_frozen_tower():
    model = tiny_model()
    model.train()
    _, ids, mask, labels, images = padded_batch()
    model(ids, labels, images, mask)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.vision.parameters())
    assert model.llm.layers[0].self_attn.q_proj.weight.grad is not None
    assert not model.vision.training


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_text_only_batch_keeps_the_projector_in_the_graph(freeze_vision):
    model = tiny_model(freeze_vision=freeze_vision)
    model.train()
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    out = model(ids, labels, None, mask)
    out["loss"].backward()
    for p in model.projector.parameters():  # present (all zero), so DeepSpeed/DDP reduce the same set on every rank
        assert p.grad is not None and p.grad.abs().sum() == 0
    if not freeze_vision:
        assert model.vision.visual.conv1.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels, None, mask)["loss"], out["loss"])  # the zero term changes nothing


def test_projector_types_and_key_names():
    assert set(build_projector("linear", 8, 16).state_dict()) == {"weight", "bias"}
    mlp = build_projector("mlp3x_gelu", 8, 16)
    assert set(mlp.state_dict()) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert isinstance(mlp[1], nn.GELU) and mlp[0].in_features == 8 and mlp[4].out_features == 16
    assert isinstance(build_projector("identity", 16, 16), nn.Identity)
    with pytest.raises(ValueError, match="linear, mlp\\{N\\}x_gelu .*identity"):
        build_projector("mlp2x_relu", 8, 16)
    with pytest.raises(ValueError, match="vision width \\(8\\) to equal the LLM width \\(16\\)"):
        build_projector("identity", 8, 16)


@pytest.mark.parametrize("file_name", ["mm_projector.safetensors", "mm_projector.bin"])
def test_projector_file_round_trip_with_llava_names(tmp_path, file_name):
    model = tiny_model()
    model.save_projector(tmp_path / file_name)
    if file_name.endswith(".bin"):
        keys = set(torch.load(tmp_path / file_name, weights_only=True))
    else:
        from safetensors.torch import load_file

        keys = set(load_file(tmp_path / file_name))
    assert keys == {"model.mm_projector.0.weight", "model.mm_projector.0.bias",
                    "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
    other = tiny_model()
    with torch.no_grad():
        for p in other.projector.parameters():
            p.zero_()
    other.load_projector(tmp_path / file_name)
    for a, b in zip(model.projector.parameters(), other.projector.parameters()):
        torch.testing.assert_close(a, b)


def test_llava_linear_projector_bin_loads(tmp_path):
    model = tiny_model(projector_type="linear")
    weight, bias = torch.randn(64, 32), torch.randn(64)
    torch.save({"model.mm_projector.weight": weight, "model.mm_projector.bias": bias}, tmp_path / "mm_projector.bin")
    model.load_projector(tmp_path / "mm_projector.bin")
    torch.testing.assert_close(model.projector.weight, weight)


def test_projector_files_that_do_not_fit_are_refused(tmp_path):
    tiny_model(projector_type="linear").save_projector(tmp_path / "linear.safetensors")
    with pytest.raises(CheckpointError, match="projector_type='mlp2x_gelu'"):
        tiny_model().load_projector(tmp_path / "linear.safetensors")
    torch.save({"model.mm_projector.weight": nn.Linear(2, 2)}, tmp_path / "pickled_module.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        tiny_model(projector_type="linear").load_projector(tmp_path / "pickled_module.bin")


def test_save_and_load_without_repeating_options(tmp_path, tokenizer):
    model = tiny_model(select_layer=-1, select_feature="cls_patch", image_aspect_ratio="crop", template="llama_2")
    _, ids, mask, labels, images = padded_batch()
    model.save(tmp_path / "model", tokenizer=tokenizer)
    loaded = LlavaModel.load(tmp_path / "model")
    assert loaded.config == model.config
    assert (tmp_path / "model" / "tokenizer.model").read_bytes() == tokenizer.model_file.read_bytes()
    assert loaded.load_tokenizer().encode("a cat") == tokenizer.encode("a cat")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, labels, images, mask, return_logits=True)["logits"],
                                   model(ids, labels, images, mask, return_logits=True)["logits"])
    assert loaded.num_image_tokens == 17
    from transformers import LlamaForCausalLM  # the LLM part is a plain Hugging Face directory

    assert LlamaForCausalLM.from_pretrained(tmp_path / "model" / "llm").config.hidden_size == 64


def test_a_failed_save_over_an_older_one_does_not_load(tmp_path, tokenizer, monkeypatch):
    import safetensors.torch

    path = tmp_path / "model"
    tiny_model().save(path, tokenizer=tokenizer)
    LlavaModel.load(path)  # complete
    original = safetensors.torch.save_file

    def disk_full_at_the_projector(tensors, filename, metadata=None):
        if "mm_projector" in str(filename):
            raise OSError(28, "No space left on device", filename)
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_the_projector)
    newer = tiny_model(projector_type="linear")
    newer.llm.init_weights(seed=5)
    with pytest.raises(OSError):
        newer.save(path, tokenizer=tokenizer)  # llm/ and vision.safetensors already new, the projector still old
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="llava_config.json: not found"):
        LlavaModel.load(path)
    newer.save(path, tokenizer=tokenizer)  # the retry completes the directory
    assert LlavaModel.load(path).config == newer.config


def test_save_needs_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        tiny_model().save(tmp_path / "m")


# ---- released LLaVA-1.5 directory layout ----------------------------------------------------------------------------

CLIP_NAME = "openai/clip-vit-large-patch14-336"


def write_llava_15_dir(tmp_path, tokenizer):
    """A tiny directory in the LLaVA-1.5 release layout: llava_llama config with mm_* keys, two .bin shards + index
    holding model.* LLaMA weights, model.mm_projector.* and model.vision_tower.* weights; and a HF CLIP directory."""
    from transformers import CLIPModel, CLIPConfig

    torch.manual_seed(3)
    clip_config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1), projection_dim=16)
    clip = CLIPModel(clip_config)
    clip.save_pretrained(tmp_path / "clip")
    llm = Llama(LlamaConfig.from_name("tiny")).init_weights(seed=4)
    llm.save_hf(tmp_path / "llava")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "llava" / "model.safetensors")
    (tmp_path / "llava" / "model.safetensors").unlink()
    projector = {"model.mm_projector.0.weight": torch.randn(64, 32), "model.mm_projector.0.bias": torch.randn(64),
                 "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64)}
    tower = {f"model.vision_tower.vision_tower.{k}": v for k, v in clip.state_dict().items() if "vision_model" in k}
    keys = sorted(state)
    shards = [{k: state[k] for k in keys[:len(keys) // 2]}, {**{k: state[k] for k in keys[len(keys) // 2:]},
                                                             **projector, **tower}]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save(shard, tmp_path / "llava" / name)
        weight_map.update(dict.fromkeys(shard, name))
    (tmp_path / "llava" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    config.update({
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": CLIP_NAME,
        "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "tokenizer_model_max_length": 2048,
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True})
    (tmp_path / "llava" / "config.json").write_text(json.dumps(config))
    shutil.copyfile(tokenizer.model_file, tmp_path / "llava" / "tokenizer.model")
    return llm, projector


def test_llava_15_directory_loads_as_our_model(tmp_path, tokenizer):
    from transformers import CLIPVisionModel

    llm, projector = write_llava_15_dir(tmp_path, tokenizer)
    model = LlavaModel.from_llava_hf(tmp_path / "llava", vision_tower_dir={CLIP_NAME: tmp_path / "clip"})
    c = model.config
    assert (c.select_layer, c.select_feature, c.projector_type, c.image_aspect_ratio, c.template, c.max_len) == (
        -2, "patch", "mlp2x_gelu", "pad", "vicuna_v1", 2048)
    for name, p in llm.named_parameters():
        torch.testing.assert_close(model.llm.get_parameter(name), p)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = CLIPVisionModel.from_pretrained(tmp_path / "clip")(images, output_hidden_states=True).hidden_states
        x = hidden[-2][:, 1:] @ projector["model.mm_projector.0.weight"].t() + projector["model.mm_projector.0.bias"]
        expected = F.gelu(x) @ projector["model.mm_projector.2.weight"].t() + projector["model.mm_projector.2.bias"]
        torch.testing.assert_close(model.encode_images(images), expected, atol=1e-4, rtol=1e-4)
    assert model.load_tokenizer().encode("a cat") == tokenizer.encode("a cat")


def test_llava_15_directory_errors_explain_the_fix(tmp_path, tokenizer):
    write_llava_15_dir(tmp_path, tokenizer)
    with pytest.raises(CheckpointError, match="pass vision_tower_dir="):
        LlavaModel.from_llava_hf(tmp_path / "llava")
    config_file = tmp_path / "llava" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "mm_use_im_start_end": True}))
    with pytest.raises(CheckpointError, match="mm_use_im_start_end=True is not supported"):
        LlavaModel.from_llava_hf(tmp_path / "llava", vision_tower_dir=tmp_path / "clip")
    with pytest.raises(CheckpointError, match="llava_config.json: not found .*LlavaModel.from_llava_hf"):
        LlavaModel.load(tmp_path / "llava")


def test_build_loads_the_pretrained_llm_and_tower(tmp_path, tokenizer):
    from open_clip import CLIP
    from safetensors.torch import save_file

    llm = Llama(LlamaConfig.from_name("tiny")).init_weights(seed=5)
    llm.save_hf(tmp_path / "llm")
    shutil.copyfile(tokenizer.model_file, tmp_path / "llm" / "tokenizer.model")
    clip = CLIP(embed_dim=16, vision_cfg=TINY_VISION,
                text_cfg={"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1})
    save_file(clip.state_dict(), tmp_path / "clip.safetensors")
    config = LlavaConfig(vision_tower={"embed_dim": 16, "vision_cfg": TINY_VISION},
                         vision_pretrained=str(tmp_path / "clip.safetensors"), llm_path=str(tmp_path / "llm"))
    model = LlavaModel.build(config, dtype=torch.bfloat16)
    torch.testing.assert_close(model.llm.embed_tokens.weight, llm.embed_tokens.weight.to(torch.bfloat16))
    torch.testing.assert_close(model.vision.visual.conv1.weight, clip.visual.conv1.weight.to(torch.bfloat16))
    assert model.projector[0].weight.dtype == torch.bfloat16
    assert model.config.llm == llm.config and model.tokenizer_path == tmp_path / "llm" / "tokenizer.model"


def test_config_files_with_unknown_keys_are_rejected(tmp_path, tokenizer):
    tiny_model().save(tmp_path / "m", tokenizer=tokenizer)
    config_file = tmp_path / "m" / "llava_config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "projector": "linear"}))
    with pytest.raises(ValueError, match="unknown key 'projector' \\(did you mean 'projector_type'\\?\\)"):
        LlavaModel.load(tmp_path / "m")
    config_file.write_text(json.dumps({**data, "llm": {**data["llm"], "n_layer": 2}}))
    with pytest.raises(ValueError, match="llm: unknown key 'n_layer' \\(did you mean 'n_layers'\\?\\)"):
        LlavaModel.load(tmp_path / "m")
