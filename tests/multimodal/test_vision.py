"""Vision tower: parity with transformers' CLIP hidden states and open_clip's own intermediates, freezing, weights,
preprocessing."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava.model.vision import ImageProcessor, VisionTowerError, build_vision_tower, hf_clip_arch

TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 8}


def tiny_hf_clip(tmp_path, act: str, full_clip: bool):
    """A random HF CLIP directory (CLIPVisionModel, or CLIPModel like openai/clip-vit-large-patch14-336)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, hidden_act=act, layer_norm_eps=1e-6, projection_dim=16)
    if full_clip:
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=16))
    else:
        model = CLIPVisionModel(vision)
    with torch.no_grad():  # make the norms non-trivial so a swapped or missing norm is visible
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path)
    vision_model = CLIPVisionModel.from_pretrained(tmp_path) if full_clip else model
    return vision_model.eval()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("full_clip", [False, True])
def test_hf_clip_conversion_matches_transformers_hidden_states(tmp_path, act, full_clip):
    hf = tiny_hf_clip(tmp_path, act, full_clip)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden_states = hf(images, output_hidden_states=True).hidden_states
    for select_layer in (-2, -1, 0, 2):
        for feature in ("patch", "cls_patch"):
            tower = build_vision_tower(tmp_path, select_layer=select_layer, select_feature=feature)
            expected = hidden_states[select_layer][:, 1:] if feature == "patch" else hidden_states[select_layer]
            torch.testing.assert_close(tower(images), expected, atol=1e-5, rtol=0)
    assert tower.arch["quick_gelu"] == (act == "quick_gelu")
    if full_clip:  # the CLIPModel's projection becomes open_clip's proj (transposed)
        from transformers import CLIPModel

        proj = CLIPModel.from_pretrained(tmp_path).visual_projection.weight
        torch.testing.assert_close(tower.visual.proj, proj.t())


def test_hf_clip_preprocessing_comes_from_preprocessor_config(tmp_path):
    tiny_hf_clip(tmp_path, "quick_gelu", False)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2],
         "resample": 3}))
    _, preprocess = hf_clip_arch(tmp_path)
    assert preprocess == {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "interpolation": "bicubic"}


def test_hf_clip_with_missing_weights_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_hf_clip(tmp_path, "quick_gelu", False)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("encoder.layers.1.mlp.fc2.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(VisionTowerError, match="missing CLIP vision weight 'encoder.layers.1.mlp.fc2.weight'"):
        build_vision_tower(tmp_path)


def open_clip_checkpoint(path, quick_gelu=False):
    from open_clip import CLIP

    torch.manual_seed(1)
    model = CLIP(embed_dim=16, vision_cfg=TINY_VISION, quick_gelu=quick_gelu,
                 text_cfg={"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}).eval()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(model.state_dict(), path)
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return model


@pytest.mark.parametrize("file_name", ["clip.safetensors", "clip.pt"])
def test_open_clip_checkpoint_features_match_open_clip_intermediates(tmp_path, file_name):
    reference = open_clip_checkpoint(tmp_path / file_name)
    images = torch.randn(2, 3, 32, 32)
    tower = build_vision_tower({"embed_dim": 16, "vision_cfg": TINY_VISION}, str(tmp_path / file_name),
                               select_layer=-2, select_feature="cls_patch")
    with torch.no_grad():  # open_clip's intermediates: output of block i (0-based) = hidden_states[i + 1]
        out = reference.visual.forward_intermediates(images, indices=[1], output_fmt="NLC", intermediates_only=True,
                                                     output_extra_tokens=True)
    expected = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    torch.testing.assert_close(tower(images), expected, atol=1e-5, rtol=0)


def test_pretrained_tag_resolves_from_local_cache_only(tmp_path, monkeypatch):
    import open_clip
    from open_clip import pretrained

    (tmp_path / "Tiny-ViT.json").write_text(json.dumps(
        {"embed_dim": 16, "vision_cfg": TINY_VISION,
         "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(tmp_path / "Tiny-ViT.json")
    monkeypatch.setitem(pretrained._PRETRAINED, "Tiny-ViT", {"mine": pretrained._pcfg(
        hf_hub="someone/tiny-vit/", quick_gelu=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))})
    with pytest.raises(VisionTowerError, match="not in the local cache"):
        build_vision_tower("Tiny-ViT", "mine", cache_dir=str(tmp_path / "empty"))
    # The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/file}.
    repo = tmp_path / "hub" / "models--someone--tiny-vit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    reference = open_clip_checkpoint(repo / "snapshots" / "abc123" / "open_clip_model.safetensors", quick_gelu=True)
    tower = build_vision_tower("Tiny-ViT", "mine", cache_dir=str(tmp_path / "hub"), select_layer=-1)
    assert tower.arch["quick_gelu"] is True  # the tag's activation wins over the config's default GELU
    assert tower.preprocess["mean"] == [0.5, 0.5, 0.5]
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = reference.visual.forward_intermediates(images, indices=[2], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(tower(images), out["image_intermediates"][0], atol=1e-5, rtol=0)


def test_frozen_tower_has_no_grad_and_stays_in_eval():
    tower = build_vision_tower(TINY_VISION)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.visual.training
    assert not tower(torch.randn(1, 3, 32, 32)).requires_grad


def test_unfrozen_tower_trains_only_the_path_to_the_selected_layer():
    tower = build_vision_tower(TINY_VISION, select_layer=-2, trainable=True)
    tower.train()
    assert tower.training
    tower(torch.randn(2, 3, 32, 32)).sum().backward()
    blocks = tower.visual.transformer.resblocks
    assert all(p.grad is not None for p in blocks[1].parameters())
    assert all(not p.requires_grad and p.grad is None for p in blocks[2].parameters())
    assert not tower.visual.proj.requires_grad and tower.visual.conv1.weight.grad is not None


def test_named_open_clip_model_builds_offline():
    tower = build_vision_tower("ViT-B-16")
    assert (tower.hidden_size, tower.num_tokens, tower.image_size) == (768, 196, (224, 224))


@pytest.mark.parametrize("spec,kwargs,message", [
    ("ViT-L-14-33", {}, "did you mean ViT-L-14-336"),
    ({**TINY_VISION, "widht": 3}, {}, "did you mean 'width'"),
    (TINY_VISION, {"select_layer": 4}, "out of range"),
    (TINY_VISION, {"select_feature": "cls"}, "valid: patch, cls_patch"),
    ({**TINY_VISION, "layers": [1, 1, 1, 1]}, {}, "only open_clip ViT towers"),
])
def test_bad_tower_specs_explain_themselves(spec, kwargs, message):
    with pytest.raises(VisionTowerError, match=message):
        build_vision_tower(spec, **kwargs)


def test_wrong_image_size_is_an_error():
    with pytest.raises(VisionTowerError, match="preprocess them"):
        build_vision_tower(TINY_VISION)(torch.randn(1, 3, 64, 64))


def test_pad_mode_fills_with_the_mean_colour():
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.2, 0.2)
    red = Image.new("RGB", (64, 32), (255, 0, 0))  # wide: padded above and below
    padded = ImageProcessor(32, mean, std, aspect_mode="pad")(red)
    assert padded.shape == (3, 32, 32)
    background = (torch.tensor([int(m * 255) / 255 for m in mean]) - torch.tensor(mean)) / torch.tensor(std)
    top_band = padded[:, :6, 16]  # padding: the mean colour
    torch.testing.assert_close(top_band, background[:, None].expand(3, 6), atol=0.02, rtol=0)
    colour = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(padded[:, 16, 16], colour, atol=0.02, rtol=0)
    cropped = ImageProcessor(32, mean, std, aspect_mode="crop")(red)
    squashed = ImageProcessor(32, mean, std, aspect_mode="resize")(red)
    for full in (cropped, squashed):  # no background anywhere: the red fills the square
        torch.testing.assert_close(full[:, 0, 0], colour, atol=0.02, rtol=0)
    with pytest.raises(VisionTowerError, match="valid: pad, resize, crop"):
        ImageProcessor(32, aspect_mode="anyres")


def test_pad_matches_llava_expand2square_then_transform():
    from llava.model.vision import expand_to_square

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 50, 3), dtype=np.uint8))
    square = expand_to_square(image, (122, 116, 104))
    assert square.size == (50, 50)
    assert square.getpixel((0, 0)) == (122, 116, 104)
    assert square.getpixel((10, 15)) == image.getpixel((10, 0))  # pasted at (50 - 20) // 2 = 15
